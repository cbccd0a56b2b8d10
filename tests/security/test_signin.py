"""Sign-in behind proxies, per-account throttling, bounded hashing, the production secret,
bounded token lifetimes and tokens of users who are gone.

The app is driven through httpx ASGITransport with a chosen socket peer (`client=(ip, port)`),
so one test plays an untrusted client, a trusted proxy and the clients behind it; the repro of
the X-Forwarded-For bypass also runs the real uvicorn command lines of docker-compose.yml and
scripts/run_stack.py, with the real socket peer.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client

from api.app import create_app
from api.security import (
    HashSlots,
    create_access_token,
    resolve_client_address,
    verify_password,
)
from core.db import User
from core.settings import DEV_JWT_SECRET, Settings
from scripts import run_stack
from scripts.seed import DEMO_PASSWORD
from tests.security.conftest import bearer, role_user
from tests.support import free_port, started_commands

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "/auth/token"
ME = "/auth/me"
WRONG = "not-the-password"
UNTRUSTED = "203.0.113.7"  # a client on the internet, talking to the API directly
PROXY = "10.1.2.3"  # our load balancer
PROXIES = "10.0.0.0/8"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def configured(settings: Settings, **overrides: Any) -> Settings:
    """settings with overrides, validated like the environment would be."""
    return Settings(**{**settings.model_dump(), **overrides})


Peers = Callable[[str], httpx.AsyncClient]


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[Peers]:
    """The app inside its lifespan; peers(ip) is an httpx client whose socket peer is ip."""
    clients: dict[str, httpx.AsyncClient] = {}

    def peers(ip: str) -> httpx.AsyncClient:
        if ip not in clients:
            transport = httpx.ASGITransport(app=app, client=(ip, 40000))
            clients[ip] = httpx.AsyncClient(transport=transport, base_url="http://test")
        return clients[ip]

    async with app.router.lifespan_context(app):
        try:
            yield peers
        finally:
            for http in clients.values():
                await http.aclose()


async def sign_in(
    http: httpx.AsyncClient, username: str, password: str = WRONG, xff: str | None = None
) -> httpx.Response:
    headers = {"X-Forwarded-For": xff} if xff is not None else {}
    return await http.post(
        TOKEN, data={"username": username, "password": password}, headers=headers
    )


# ------------------------------------------------------------------------------ proxies
async def test_forged_forwarded_for_from_an_untrusted_peer_is_throttled_on_the_peer(
    settings: Settings, client: Client
):
    config = configured(
        settings, api_auth_rate_limit_per_minute=5, api_auth_account_rate_limit_per_minute=100
    )
    app = create_app(config, temporal_client=client)
    app.state.signin_rate.clock = FakeClock()
    async with serving(app) as peers:
        attacker = peers(UNTRUSTED)
        codes = [
            (await sign_in(attacker, "alice", xff=f"198.51.100.{i}")).status_code for i in range(40)
        ]
        assert codes == [401] * 5 + [429] * 35
        # the real address is throttled, with or without a header
        r = await sign_in(attacker, "alice", DEMO_PASSWORD)
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        # another client is not
        assert (await sign_in(peers("203.0.113.8"), "alice", DEMO_PASSWORD)).status_code == 200


async def test_behind_a_trusted_proxy_the_forwarded_address_is_the_key(
    settings: Settings, client: Client
):
    config = configured(
        settings,
        trusted_proxies=PROXIES,
        api_auth_rate_limit_per_minute=3,
        api_auth_account_rate_limit_per_minute=100,
    )
    app = create_app(config, temporal_client=client)
    app.state.signin_rate.clock = FakeClock()
    async with serving(app) as peers:
        proxy = peers(PROXY)
        for _ in range(3):
            assert (await sign_in(proxy, "alice", xff="198.51.100.1")).status_code == 401
        assert (await sign_in(proxy, "alice", xff="198.51.100.1")).status_code == 429
        # the client forges hops to the left of what our proxy appended: still the same client
        r = await sign_in(proxy, "alice", xff="192.0.2.99, 198.51.100.1")
        assert r.status_code == 429
        # two trusted proxies in a row (the inner one is 10.9.9.9): the client is left of both
        r = await sign_in(proxy, "alice", xff="192.0.2.99, 198.51.100.1, 10.9.9.9")
        assert r.status_code == 429
        # another client behind the same proxy has its own budget
        r = await sign_in(proxy, "alice", DEMO_PASSWORD, xff="198.51.100.2")
        assert r.status_code == 200
        # the proxy itself (no header) is one more client
        assert (await sign_in(proxy, "alice", DEMO_PASSWORD)).status_code == 200
        # the header of a peer outside PROCFLOW_TRUSTED_PROXIES is ignored
        outsider = peers(UNTRUSTED)
        for _ in range(3):
            assert (await sign_in(outsider, "alice", xff="198.51.100.3")).status_code == 401
        r = await sign_in(outsider, "alice", DEMO_PASSWORD, xff="198.51.100.4")
        assert r.status_code == 429


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        pytest.param("10.1.2.3", [], "10.1.2.3", id="trusted peer without header"),
        pytest.param("203.0.113.7", ["198.51.100.1"], "203.0.113.7", id="untrusted peer"),
        pytest.param("10.1.2.3", ["1.1.1.1, 198.51.100.1"], "198.51.100.1", id="right-most"),
        pytest.param("10.1.2.3", ["1.1.1.1", "198.51.100.1"], "198.51.100.1", id="two headers"),
        pytest.param("10.1.2.3", ["198.51.100.1:5555"], "198.51.100.1", id="hop with port"),
        pytest.param("10.1.2.3", ["[2001:db8::1]:443"], "2001:db8::1", id="ipv6 with port"),
        pytest.param("10.1.2.3", ["1.1.1.1, 10.7.7.7, 10.8.8.8"], "1.1.1.1", id="proxy chain"),
        pytest.param("10.1.2.3", ["10.7.7.7, 10.8.8.8"], "10.7.7.7", id="all trusted"),
        pytest.param("10.1.2.3", ["1.1.1.1, bogus, 10.8.8.8"], "10.8.8.8", id="garbage hop"),
        pytest.param("::ffff:10.1.2.3", ["198.51.100.1"], "198.51.100.1", id="mapped peer"),
        pytest.param(None, ["198.51.100.1"], "unknown", id="no peer"),
    ],
)
def test_the_client_address_is_the_right_most_untrusted_hop(
    peer: str | None, forwarded: list[str], expected: str
):
    assert resolve_client_address(peer, forwarded, [ip_network(PROXIES)]) == expected


def test_trusted_proxies_are_read_as_a_list_of_networks_and_bad_ones_are_named():
    config = Settings(trusted_proxies="10.0.0.0/8, 192.168.1.5")
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "192.168.1.5/32"]
    assert Settings(trusted_proxies='["::1"]').trusted_proxies == [ip_network("::1")]
    assert Settings(trusted_proxies="").trusted_proxies == []
    assert Settings().trusted_proxies == []  # nobody is trusted by default
    with pytest.raises(ValidationError, match="trusted_proxies"):
        Settings(trusted_proxies="10.0.0.0/8, not-an-address")


# --- the tester's repro against the real uvicorn command lines ------------------------------
def compose_api_command() -> tuple[list[str], dict[str, str]]:
    """The api service's command and the PROCFLOW_* values it sets beyond the shared ones."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    shared = compose["x-procflow-env"]
    env = {}
    for key, value in compose["services"]["api"]["environment"].items():
        text = str(value)
        if key.startswith("PROCFLOW_") and key not in shared:
            if text.startswith("${") and ":-" in text:  # ${VAR:-default}
                text = text.split(":-", 1)[1].rstrip("}")
            env[key] = text
    return [str(arg) for arg in compose["services"]["api"]["command"]], env


def run_stack_api_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The command scripts/run_stack.py starts the API with (the other children not started)."""
    config = run_stack.StackConfig(data_dir=tmp_path / "stack")
    started = started_commands(monkeypatch, config)
    return started["api"]


def on_free_port(cmd: list[str], port: int) -> list[str]:
    """cmd as a uvicorn run of this interpreter on 127.0.0.1:port."""
    if cmd[0] == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", *cmd[1:]]
    out = list(cmd)
    out[out.index("--host") + 1] = "127.0.0.1"
    out[out.index("--port") + 1] = str(port)
    return out


@pytest.fixture
def uvicorn_app(
    db_url: str, client: Client, tmp_path: Path
) -> Iterator[Callable[[list[str], dict[str, str]], str]]:
    """start(cmd, env) runs the API command as a real process; returns its base URL."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], env: dict[str, str]) -> str:
        port = free_port()
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PROCFLOW_")},
            "PYTHONPATH": str(ROOT),
            "PROCFLOW_DATABASE_URL": db_url,
            "PROCFLOW_TEMPORAL_ADDRESS": client.service_client.config.target_host,
            **env,
        }
        log = (tmp_path / f"uvicorn-{port}.log").open("wb")
        process = subprocess.Popen(
            on_free_port(cmd, port), env=full_env, cwd=tmp_path, stdout=log, stderr=log
        )
        processes.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / f"uvicorn-{port}.log").read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    return base
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"uvicorn did not answer within 60 s: {cmd}")

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("deployment", ["docker-compose.yml", "run_stack"])
async def test_forty_forged_forwarded_for_values_are_throttled_by_the_real_server(
    deployment: str,
    uvicorn_app: Callable[[list[str], dict[str, str]], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    limit = 3
    if deployment == "docker-compose.yml":
        cmd, env = compose_api_command()
        env["PROCFLOW_JWT_SECRET"] = secrets.token_hex(32)  # compose demands one from outside
    else:
        cmd, env = run_stack_api_command(tmp_path, monkeypatch), {}
    env["PROCFLOW_API_AUTH_RATE_LIMIT_PER_MINUTE"] = str(limit)
    base = await asyncio.to_thread(uvicorn_app, cmd, env)
    codes = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for i in range(40):  # each a fresh username, so only the address throttle can hold
            r = await sign_in(http, f"nobody-{i}", xff=f"198.51.100.{i}")
            codes.append(r.status_code)
    assert codes[:limit] == [401] * limit
    # one sign-in per 20 s refills; anything near 40 evaluations would be the bypass
    assert codes.count(429) >= 30, codes
    assert codes[-1] == 429


# ------------------------------------------------------------------------------ per account
async def test_the_account_throttle_holds_across_addresses(settings: Settings, client: Client):
    config = configured(
        settings, api_auth_rate_limit_per_minute=100, api_auth_account_rate_limit_per_minute=3
    )
    app = create_app(config, temporal_client=client)
    clock = FakeClock()
    app.state.signin_account_rate.clock = clock
    async with serving(app) as peers:
        for i in range(3):
            assert (await sign_in(peers(f"203.0.113.{i}"), "alice")).status_code == 401
        # a fourth address, even with the right password, and the name in other case
        for username, password in (("alice", DEMO_PASSWORD), ("ALICE", WRONG)):
            r = await sign_in(peers("203.0.113.50"), username, password)
            assert r.status_code == 429, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert "sign-in attempts for this account" in r.json()["detail"]
        # other accounts are not affected, from the same address
        assert (await sign_in(peers("203.0.113.50"), "bob", DEMO_PASSWORD)).status_code == 200
        clock.now += 60
        assert (await sign_in(peers("203.0.113.50"), "alice", DEMO_PASSWORD)).status_code == 200


async def test_an_overlong_username_is_422_naming_the_field(api):
    r = await api.http.post(TOKEN, data={"username": "a" * 65, "password": "x"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "username"]


# ------------------------------------------------------------------------------ hash slots
class GatedHashes:
    """verify_password, held in its thread until the gate opens; records who ran it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.threads: list[int] = []
        self.finished = 0
        self._lock = threading.Lock()

    def __call__(self, password_hash: str | None, password: str) -> bool:
        with self._lock:
            self.threads.append(threading.get_ident())
        self.gate.wait(60)
        try:
            return verify_password(password_hash, password)
        finally:
            with self._lock:
                self.finished += 1


async def eventually(condition: Callable[[], bool], what: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.01)


async def test_hashes_run_in_threads_at_most_n_at_once_then_503(settings: Settings, client: Client):
    config = configured(settings, auth_max_concurrent_hashes=2, auth_hash_wait_s=0.2)
    app = create_app(config, temporal_client=client)
    hashes: HashSlots = app.state.hash_slots
    gated = hashes.verify = GatedHashes()
    async with serving(app) as peers:
        held = [
            asyncio.create_task(sign_in(peers("203.0.113.1"), "alice", DEMO_PASSWORD)),
            asyncio.create_task(sign_in(peers("203.0.113.2"), "bob")),
        ]
        # both are hashing in threads while this event loop keeps running
        await eventually(lambda: len(gated.threads) == 2, "two hashes started")
        assert threading.get_ident() not in gated.threads
        r = await sign_in(peers("203.0.113.3"), "vera", DEMO_PASSWORD)
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert "at once" in r.json()["detail"]
        assert len(gated.threads) == 2  # the refused one never hashed
        gated.gate.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 401]
        assert (await sign_in(peers("203.0.113.3"), "vera", DEMO_PASSWORD)).status_code == 200


async def test_a_request_that_goes_away_keeps_its_hash_slot_until_the_hash_ends(
    settings: Settings, client: Client
):
    config = configured(settings, auth_max_concurrent_hashes=1, auth_hash_wait_s=0.2)
    app = create_app(config, temporal_client=client)
    gated = app.state.hash_slots.verify = GatedHashes()
    async with serving(app) as peers:
        gone = asyncio.create_task(sign_in(peers("203.0.113.1"), "alice"))
        await eventually(lambda: len(gated.threads) == 1, "the hash started")
        gone.cancel()  # the client disconnects; its thread is still hashing
        with pytest.raises(asyncio.CancelledError):
            await gone
        r = await sign_in(peers("203.0.113.2"), "bob", DEMO_PASSWORD)
        assert r.status_code == 503, r.text
        gated.gate.set()
        await eventually(lambda: gated.finished == 1, "the abandoned hash finished")

        async def signed_in() -> int:
            return (await sign_in(peers("203.0.113.2"), "bob", DEMO_PASSWORD)).status_code

        # the slot comes back once the thread is done (the done-callback runs on the loop)
        codes = [await signed_in()]
        while codes[-1] == 503 and len(codes) < 100:
            await asyncio.sleep(0.05)
            codes.append(await signed_in())
        assert codes[-1] == 200, codes


# ------------------------------------------------------------------------------ environment
def test_production_with_the_default_secret_refuses_to_start():
    with pytest.raises(ValidationError, match="PROCFLOW_JWT_SECRET is the built-in development"):
        Settings(environment="production")
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        Settings(environment="production", jwt_secret="s" * 31)
    # the secret is not echoed into the startup log
    with pytest.raises(ValidationError) as refused:
        Settings(environment="production", jwt_secret="hush-hush-hush-hush")
    assert "hush" not in str(refused.value)
    assert Settings(environment="production", jwt_secret="s" * 32).environment == "production"
    assert Settings().jwt_secret == DEV_JWT_SECRET  # embedded (the default) keeps working
    with pytest.raises(ValidationError, match="environment"):
        Settings(environment="staging")


def test_the_api_process_exits_with_the_reason_when_production_has_the_default_secret(
    db_url: str, tmp_path: Path
):
    cmd, env = compose_api_command()
    assert env["PROCFLOW_ENVIRONMENT"] == "production"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROCFLOW_")}
    result = subprocess.run(
        on_free_port(cmd, free_port()),
        env={**clean, **env, "PYTHONPATH": str(ROOT), "PROCFLOW_DATABASE_URL": db_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "PROCFLOW_JWT_SECRET is the built-in development secret" in result.stderr


# ------------------------------------------------------------------------------ token lifetime
def _token(config: Settings, *, iat: datetime, exp: datetime, sub: str = "alice") -> str:
    claims = {"sub": sub, "iat": iat, "exp": exp}
    return jwt.encode(claims, config.jwt_secret, algorithm=config.jwt_algorithm)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_tokens_with_a_huge_lifetime_or_an_iat_in_the_future_are_401(api, settings):
    now = datetime.now(UTC)
    refused = {
        "a year": _token(settings, iat=now, exp=now + timedelta(days=365)),
        "one minute too long": _token(settings, iat=now, exp=now + timedelta(minutes=61)),
        "issued in an hour": _token(
            settings, iat=now + timedelta(hours=1), exp=now + timedelta(hours=1, minutes=5)
        ),
        "iat as text": jwt.encode(
            {"sub": "alice", "iat": str(int(now.timestamp())), "exp": now + timedelta(minutes=5)},
            settings.jwt_secret,
            algorithm=settings.jwt_algorithm,
        ),
    }
    for name, token in refused.items():
        r = await api.http.get(ME, headers=_auth(token))
        assert r.status_code == 401, (name, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    # the configured lifetime exactly, and a clock a few seconds ahead, are fine
    for token in (
        _token(settings, iat=now, exp=now + timedelta(minutes=60)),
        _token(settings, iat=now + timedelta(seconds=10), exp=now + timedelta(minutes=5)),
    ):
        r = await api.http.get(ME, headers=_auth(token))
        assert r.status_code == 200, r.text


async def test_lowering_the_ttl_refuses_tokens_issued_for_longer(
    settings: Settings, client: Client
):
    token, _ = create_access_token(settings, "alice", [])  # 60 minutes
    strict = create_app(configured(settings, jwt_ttl_minutes=30), temporal_client=client)
    async with serving(strict) as peers:
        r = await peers("203.0.113.1").get(ME, headers=_auth(token))
        assert r.status_code == 401, r.text
        assert "30 minutes" in r.json()["detail"]


@pytest.mark.parametrize("minutes", [0, 1441])
def test_the_token_lifetime_setting_is_bounded(minutes: int):
    with pytest.raises(ValidationError, match="jwt_ttl_minutes"):
        Settings(jwt_ttl_minutes=minutes)


# ------------------------------------------------------------------------------ gone users
@pytest.mark.parametrize("change", ["disabled", "deleted"])
async def test_a_token_of_a_disabled_or_deleted_user_is_401(
    api, settings: Settings, sessions: async_sessionmaker, role_users: dict, change: str
):
    username = role_user("admin")
    headers = bearer(settings, username)
    assert (await api.http.get(ME, headers=headers)).status_code == 200
    async with sessions.begin() as session:
        if change == "disabled":
            await session.execute(
                update(User).where(User.username == username).values(active=False)
            )
        else:
            await session.execute(delete(User).where(User.username == username))
    r = await api.http.get(ME, headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"detail": "unknown or inactive user"}
    # and with it every protected endpoint
    assert (await api.http.get("/orders", headers=headers)).status_code == 401
