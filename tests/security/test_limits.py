"""Limits: body size (413), request rate per user and sign-ins per address (429 with
Retry-After, recovering after the window), requests in flight to Temporal (503)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest_asyncio
from fastapi import FastAPI
from temporalio.client import Client

from api.app import create_app
from core.settings import Settings
from scripts.seed import DEMO_PASSWORD
from tests.api.conftest import order_body
from tests.security.conftest import ROOT, Api, bearer, running

LIMITS = {
    "api_max_body_bytes": 4096,
    "api_rate_limit_per_minute": 5,
    "api_auth_rate_limit_per_minute": 3,
    "temporal_max_concurrency": 1,
    "temporal_rpc_timeout_s": 0.5,
}


@pytest_asyncio.fixture
async def limited(settings: Settings, client: Client, role_users: dict) -> AsyncIterator[Api]:
    app = create_app(settings.model_copy(update=LIMITS), temporal_client=client)
    async for a in running(app):
        yield a


def _app(api: Api) -> FastAPI:
    return api.http._transport.app  # type: ignore[attr-defined]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_body_over_the_declared_limit_is_413_before_anything_else(
    limited: Api, settings: Settings
):
    body = order_body(100, lines=[{"sku": "X", "quantity": "1", "unit_price": "1"}] * 200)
    raw = json.dumps(body).encode()
    assert len(raw) > LIMITS["api_max_body_bytes"]
    for headers in ({}, bearer(settings, ROOT)):  # refused before authentication too
        r = await limited.http.post(
            "/orders", content=raw, headers={"Content-Type": "application/json", **headers}
        )
        assert r.status_code == 413, r.text
        assert r.json() == {"detail": "request body too large: the limit is 4096 bytes"}
    # a body within the limit goes through to validation as before
    r = await limited.http.post("/orders", json={"x": 1}, headers=bearer(settings, ROOT))
    assert r.status_code == 422


async def test_a_chunked_body_is_cut_off_at_the_limit_without_reading_the_rest(
    limited: Api, settings: Settings
):
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(10_000):  # 10 MB if it were all read
            sent += 1
            yield b"x" * 1024

    r = await limited.http.post(
        "/orders/X1/amend",
        content=endless(),
        headers={"Content-Type": "application/json", **bearer(settings, ROOT)},
    )
    assert r.status_code == 413, r.text
    assert "content-length" not in r.request.headers  # chunked: no declared size
    assert sent <= LIMITS["api_max_body_bytes"] // 1024 + 2


async def test_a_user_over_the_rate_is_429_with_retry_after_and_recovers(
    limited: Api, settings: Settings
):
    clock = FakeClock()
    _app(limited).state.user_rate.clock = clock
    me = bearer(settings, ROOT)
    for _ in range(LIMITS["api_rate_limit_per_minute"]):
        assert (await limited.http.get("/auth/me", headers=me)).status_code == 200
    r = await limited.http.get("/auth/me", headers=me)
    assert r.status_code == 429, r.text
    retry_after = int(r.headers["Retry-After"])
    assert 1 <= retry_after <= 60 // LIMITS["api_rate_limit_per_minute"]
    assert "too many requests" in r.json()["detail"]
    # the limit is per user: another user is not affected
    r = await limited.http.get("/auth/me", headers=bearer(settings, "only-admin"))
    assert r.status_code == 200
    # half the wait is not enough; the whole wait is
    clock.now += retry_after / 2
    assert (await limited.http.get("/auth/me", headers=me)).status_code == 429
    clock.now += retry_after / 2
    assert (await limited.http.get("/auth/me", headers=me)).status_code == 200
    # after the whole window the full burst is back
    clock.now += 60
    for _ in range(LIMITS["api_rate_limit_per_minute"]):
        assert (await limited.http.get("/auth/me", headers=me)).status_code == 200


async def test_sign_in_attempts_are_limited_per_client_address(limited: Api):
    clock = FakeClock()
    _app(limited).state.signin_rate.clock = clock
    wrong = {"username": "alice", "password": "guess"}
    for _ in range(LIMITS["api_auth_rate_limit_per_minute"]):
        assert (await limited.http.post("/auth/token", data=wrong)).status_code == 401
    right = {"username": "alice", "password": DEMO_PASSWORD}
    r = await limited.http.post("/auth/token", data=right)  # even the right password waits
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    assert "sign-in attempts" in r.json()["detail"]
    clock.now += 60
    assert (await limited.http.post("/auth/token", data=right)).status_code == 200


async def test_no_free_slot_towards_temporal_is_503_with_retry_after(
    limited: Api, settings: Settings
):
    app = _app(limited)
    me = bearer(settings, ROOT)
    async with app.state.temporal_slots.slot():  # the only slot, held by another request
        r = await limited.http.get("/orders/X1", headers=me)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"].isdigit()
        assert "in flight to Temporal" in r.json()["detail"]
        # what does not call Temporal is not affected
        assert (await limited.http.get("/orders", headers=me)).status_code == 200
    r = await limited.http.get("/orders/X1", headers=me)
    assert r.status_code == 404, r.text  # the slot is free again (no such order)
