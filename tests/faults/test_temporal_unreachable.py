"""Temporal is unreachable: the API answers 503 quickly and writes nothing; once a server
listens at the configured address, the same API process recovers by itself."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from api.app import create_app
from core.db import AuditEntry, LedgerEntry, Order, TaskRow
from core.settings import Settings
from scripts.seed import DEMO_PASSWORD
from tests.faults.orders import check_nothing_lost_or_doubled, order_body
from tests.faults.processes import DevServer, until
from tests.support import free_port, record_figure
from worker import build_worker
from workflows.sales_order import SalesOrderWorkflow, Stage, sales_order_workflow_id

MAX_ANSWER_S = 5.0


@asynccontextmanager
async def _api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, inside its lifespan (which tries Temporal once and goes on)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield http


async def _rows(sessions: async_sessionmaker) -> dict[str, int]:
    async with sessions() as s:
        return {
            model.__tablename__: (
                await s.execute(select(func.count()).select_from(model))
            ).scalar_one()
            for model in (Order, AuditEntry, TaskRow, LedgerEntry)
        }


@pytest.mark.timeout(90)
async def test_api_answers_503_while_temporal_is_down_and_recovers_without_restart(
    database, mail_sink, processes, tmp_path
):
    db_url, sessions = database
    port = free_port()
    queue = f"faults-down-{uuid.uuid4()}"
    settings = Settings(
        database_url=db_url,
        temporal_address=f"127.0.0.1:{port}",
        task_queue=queue,
        temporal_rpc_timeout_s=2.0,
        update_wait_s=20.0,
    )
    async with _api(settings) as http:
        token = (
            await http.post("/auth/token", data={"username": "alice", "password": DEMO_PASSWORD})
        ).json()["access_token"]
        alice = {"Authorization": f"Bearer {token}"}
        before = await _rows(sessions)

        calls = [
            ("POST", "/orders", order_body("U-1", 100)),
            ("POST", "/orders", order_body("U-1", 100)),  # the client's retry
            ("GET", "/orders/U-1", None),
            ("GET", "/orders/search?stage=approval", None),
        ]
        answered: list[tuple[str, str, httpx.Response, float]] = []
        for method, url, body in calls:
            began = time.monotonic()
            r = await http.request(method, url, json=body, headers=alice)
            answered.append((method, url, r, time.monotonic() - began))
        # instances the API reports as started while Temporal is away: counted, recorded, checked
        started = sum(m == "POST" and r.status_code in (200, 201) for m, _, r, _ in answered)
        slowest = max(took for *_, took in answered)
        record_figure("Temporal unreachable: slowest 503 (s)", round(slowest, 2))
        record_figure("Temporal unreachable: instances in flight", started)
        for _, url, r, took in answered:
            assert r.status_code == 503, (url, r.status_code, r.text)
            assert r.headers.get("Retry-After"), url
            assert took < MAX_ANSWER_S, (url, took)
        assert await _rows(sessions) == before, "nothing may be written while Temporal is down"

        # a server comes up at the configured address; the API is not restarted
        server = DevServer(tmp_path / "temporal", tmp_path / "temporal.log", port=port)
        processes.start(server)
        up = time.monotonic()
        client = await server.ready()
        worker = build_worker(
            client,
            task_queue=queue,
            session_factory=sessions,
            sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
            provider=SandboxPaymentProvider(sessions),
        )
        async with worker:
            answers: list[httpx.Response] = []

            async def accepted() -> bool:
                r = await http.post("/orders", json=order_body("U-1", 100), headers=alice)
                assert r.status_code in (200, 201, 503), r.text
                answers.append(r)
                return r.status_code in (200, 201)

            await until(accepted, 30, "the API accepts the order again", every_s=0.5)
            record_figure(
                "Temporal unreachable: seconds to recover once the server starts",
                round(time.monotonic() - up, 1),
            )
            assert answers[-1].json()["workflow_id"] == sales_order_workflow_id("U-1")
            handle = client.get_workflow_handle_for(
                SalesOrderWorkflow.run, sales_order_workflow_id("U-1")
            )
            result = await handle.result()
    assert result.stage == Stage.CLOSED
    assert await check_nothing_lost_or_doubled(sessions, ["U-1"]) == (0, 0)
