"""The Temporal dev server restarts (same SQLite file, same port) while 50 orders wait for a
vice-president: all 50 are still running, visibility lists them at their stage, the worker
reconnects by itself, and every order completes once approved."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from tests.faults.orders import check_nothing_lost_or_doubled, order, start
from tests.faults.processes import DevServer, until
from tests.support import record_figure
from worker import build_worker
from workflows.human_task import Actor, DecideInput
from workflows.sales_order import SalesOrderWorkflow, Stage

ORDERS = 50
WAITING = "ProcessType = 'sales_order' AND Stage = 'approval'"
VICTOR = Actor(username="victor", roles=["vice-president"])


@pytest.mark.timeout(170)
async def test_dev_server_restart_keeps_50_orders_waiting_for_approval(
    database, mail_sink, processes, tmp_path
):
    _, sessions = database
    server = DevServer(tmp_path / "temporal", tmp_path / "temporal.log")
    processes.start(server)
    client = await server.ready()
    queue = f"faults-server-{uuid.uuid4()}"
    worker = build_worker(
        client,
        task_queue=queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )
    order_nos = [f"S-{i:03d}" for i in range(ORDERS)]
    async with worker:
        handles = await asyncio.gather(
            *(start(client, order(no, 600_000), queue) for no in order_nos)
        )
        settled = await asyncio.gather(
            *(h.execute_update(SalesOrderWorkflow.settle) for h in handles)
        )
        assert {s.stage for s in settled} == {Stage.APPROVAL}
        task_ids = [s.pending_tasks[0].task_id for s in settled]
        run_ids = [(await h.describe()).run_id for h in handles]

        running = await _running(handles)
        down = time.monotonic()
        server.terminate()
        await server.exited(30)
        record_figure("Temporal restart: instances in flight", running)
        assert running == ORDERS
        server.start()
        await server.ready()
        record_figure("Temporal restart: seconds down", round(time.monotonic() - down, 1))

        # the same client, the same worker: both reconnect by themselves
        described = await asyncio.gather(*(h.describe() for h in handles))
        assert [d.run_id for d in described] == run_ids
        assert await _running(handles) == ORDERS
        listed = await until(lambda: _count(client, WAITING, ORDERS), 30, f"{ORDERS} listed")
        record_figure("Temporal restart: seconds until visibility lists all", round(listed, 1))

        await asyncio.wait_for(
            asyncio.gather(
                *(
                    h.execute_update(
                        SalesOrderWorkflow.decide,
                        DecideInput(task_id=t, outcome="approved", actor=VICTOR),
                    )
                    for h, t in zip(handles, task_ids, strict=True)
                )
            ),
            60,
        )
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 90)
    assert {r.stage for r in results} == {Stage.CLOSED}
    assert await check_nothing_lost_or_doubled(sessions, order_nos) == (0, 0)


async def _running(handles: list) -> int:
    """How many of the instances are running, as the server describes them."""
    described = await asyncio.gather(*(h.describe() for h in handles))
    return sum(d.status == WorkflowExecutionStatus.RUNNING for d in described)


async def _count(client: Client, query: str, expected: int) -> bool:
    return (await client.count_workflows(query)).count == expected
