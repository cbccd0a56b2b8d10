"""The worker's health endpoint (issue 14): GET /healthz says whether its parts run (the Temporal
worker, the mail dispatcher, the reconciler) and GET /readyz adds whether Temporal answers and
the database takes a write; each answers 503 naming the part that is not. The worker as its
own process (`python worker.py`) is in tests/integration/test_worker_health.py."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from core.db import make_engine, make_session_factory
from core.health import HealthServer
from core.settings import Settings
from scripts.mailsink import MailSink
from tests.support import free_port
from worker import ProcflowWorker, build_worker, health_server

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


@pytest_asyncio.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def _worker(dev_env: WorkflowEnvironment, engine: AsyncEngine, sink: MailSink) -> ProcflowWorker:
    """The real worker (not started) on a fresh task queue."""
    sessions = make_session_factory(engine)
    return build_worker(
        dev_env.client,
        task_queue=f"health-{uuid.uuid4()}",
        session_factory=sessions,
        sender=SmtpSender(sink.host, sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )


@pytest_asyncio.fixture
async def running(
    dev_env: WorkflowEnvironment, engine: AsyncEngine, mail_sink: MailSink
) -> AsyncIterator[ProcflowWorker]:
    async with _worker(dev_env, engine, mail_sink) as worker:
        yield worker


async def get(server: HealthServer, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
        return await http.get(path)


PARTS = {"worker", "mail_dispatcher", "reconciler"}


async def test_a_running_worker_is_live_and_ready(
    running: ProcflowWorker, dev_env: WorkflowEnvironment, engine: AsyncEngine
):
    server = health_server(running, dev_env.client, engine, "127.0.0.1:0", 5)
    assert await server.start()
    try:
        live = await get(server, "/healthz")
        assert live.status_code == 200, live.text
        assert live.json() == {"status": "ok"} | {part: "ok" for part in PARTS}
        ready = await get(server, "/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ok"} | {
            part: "ok" for part in (*PARTS, "temporal", "database")
        }
    finally:
        await server.stop()
    with pytest.raises(httpx.ConnectError):  # stopped: the port is closed
        await get(server, "/healthz")


async def test_a_dead_loop_makes_the_worker_unhealthy_naming_it(
    running: ProcflowWorker, dev_env: WorkflowEnvironment, engine: AsyncEngine
):
    server = health_server(running, dev_env.client, engine, "127.0.0.1:0", 5)
    assert await server.start()
    try:
        await running.dispatcher.stop()  # as if its loop had ended
        live = await get(server, "/healthz")
        assert live.status_code == 503
        assert live.headers["retry-after"] == "5"
        assert live.json() == {
            "status": "unavailable",
            "worker": "ok",
            "mail_dispatcher": "unavailable",
            "reconciler": "ok",
        }
        ready = await get(server, "/readyz")  # not live: not ready either
        assert ready.status_code == 503 and ready.json()["mail_dispatcher"] == "unavailable"
    finally:
        await server.stop()
        running.dispatcher.start()  # the fixture's exit stops it again


async def test_a_stopped_temporal_worker_is_unhealthy(
    dev_env: WorkflowEnvironment, engine: AsyncEngine, mail_sink: MailSink
):
    worker = _worker(dev_env, engine, mail_sink)
    server = health_server(worker, dev_env.client, engine, "127.0.0.1:0", 5)
    assert await server.start()
    try:
        before = await get(server, "/healthz")  # not started yet
        assert before.status_code == 503
        assert set(before.json().values()) == {"unavailable"}
        async with worker:
            assert (await get(server, "/healthz")).status_code == 200
        after = await get(server, "/healthz")  # shut down
        assert after.status_code == 503 and after.json()["worker"] == "unavailable"
    finally:
        await server.stop()


async def test_unreachable_temporal_makes_the_worker_not_ready(
    running: ProcflowWorker, engine: AsyncEngine
):
    nowhere = await Client.connect(f"127.0.0.1:{free_port()}", lazy=True)
    server = health_server(running, nowhere, engine, "127.0.0.1:0", 2)
    assert await server.start()
    try:
        assert (await get(server, "/healthz")).status_code == 200  # live all the same
        ready = await get(server, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["temporal"] == "unavailable"
        assert ready.json()["database"] == "ok"
    finally:
        await server.stop()


async def test_a_database_that_takes_no_write_makes_the_worker_not_ready(
    running: ProcflowWorker, dev_env: WorkflowEnvironment, engine: AsyncEngine, db_url: str
):
    server = health_server(running, dev_env.client, engine, "127.0.0.1:0", 1)
    assert await server.start()
    holder = sqlite3.connect(db_url.split("///", 1)[1], isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        ready = await get(server, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["database"] == "unavailable"
        assert ready.json()["temporal"] == "ok"
        holder.execute("ROLLBACK")
        assert (await get(server, "/readyz")).status_code == 200
    finally:
        holder.close()
        await server.stop()


@pytest.mark.parametrize("address", ["taken", "no-port", "127.0.0.1:http"])
async def test_an_address_that_cannot_be_served_is_logged_and_the_worker_goes_on(
    address: str, caplog: pytest.LogCaptureFixture
):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if address == "taken":
            address = f"127.0.0.1:{busy.getsockname()[1]}"
        server = HealthServer(address, dict, _never_ready)
        with caplog.at_level(logging.ERROR, logger="procflow.health"):
            assert await server.start() is False
    assert address in caplog.text and "no health endpoint" in caplog.text
    await server.stop()  # nothing to stop: no error


async def _never_ready() -> dict[str, bool]:
    raise AssertionError("not called")


def test_the_health_address_is_a_setting_served_by_default_on_loopback() -> None:
    assert Settings.model_fields["worker_health_address"].default == "127.0.0.1:9465"
    assert Settings(worker_health_address="").worker_health_address == ""


def _compose_healthcheck(service: str) -> list[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python", test
    return [sys.executable, *test[2:]]


async def test_the_compose_healthcheck_of_the_worker_asks_its_health_endpoint():
    """The worker service's healthcheck command, run against a real HealthServer on the port
    the service gives PROCFLOW_WORKER_HEALTH_ADDRESS: it passes on 200 and fails on 503."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    address = compose["services"]["worker"]["environment"]["PROCFLOW_WORKER_HEALTH_ADDRESS"]
    port = address.rsplit(":", 1)[1]
    cmd = _compose_healthcheck("worker")
    assert f"127.0.0.1:{port}/healthz" in cmd[-1]
    parts = {"worker": True}
    server = HealthServer("127.0.0.1:0", lambda: parts, _never_ready)
    assert await server.start()
    try:
        local = [*cmd[:-1], cmd[-1].replace(f":{port}/", f":{server.port}/")]
        passed = await asyncio.to_thread(subprocess.run, local, capture_output=True, timeout=30)
        assert passed.returncode == 0, passed.stderr
        parts["worker"] = False
        failed = await asyncio.to_thread(subprocess.run, local, capture_output=True, timeout=30)
        assert failed.returncode != 0 and b"503" in failed.stderr
    finally:
        await server.stop()
