"""Probes, and 503 with Retry-After when Temporal is unreachable."""

from __future__ import annotations

import time

import pytest

from tests.api.conftest import Api, order_body


async def test_healthz_needs_no_auth(api: Api):
    r = await api.http.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


async def test_readyz_reports_database_and_temporal(api: Api):
    r = await api.http.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "database": "ok", "temporal": "ok"}


@pytest.mark.timeout(60)
async def test_unreachable_temporal_is_503_quickly_and_the_app_still_serves(
    dead_temporal_api: Api,
):
    api = dead_temporal_api
    assert (await api.http.get("/healthz")).status_code == 200
    # the database side works: sign-in and read-model endpoints answer
    assert (await api.get("/tasks", "victor")).status_code == 200
    for call in (
        lambda: api.get("/orders/ANY1", "mike"),
        lambda: api.post("/orders", "alice", json=order_body()),
        lambda: api.get("/orders/search", "mike"),
    ):
        started = time.monotonic()
        r = await call()
        assert time.monotonic() - started < 10
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
    r = await api.http.get("/readyz")
    assert r.status_code == 503
    assert r.json()["temporal"] == "unavailable"
    assert r.json()["database"] == "ok"


async def test_openapi_documents_every_endpoint(api: Api):
    spec = (await api.http.get("/openapi.json")).json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("description"), f"{method} {path} has no description"
            assert {"200", "201", "202", "204"} & set(op["responses"]), (path, method)
    assert "503" in spec["paths"]["/orders"]["post"]["responses"]
