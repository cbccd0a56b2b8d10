"""Fault: the business database (PostgreSQL) is down while sales orders run. The activities
fail and Temporal retries them; once the server is back every order closes, and nothing is
charged, shipped, invoiced, audited or queued twice. The server goes down either before the
orders start or right after (while their first activities run).

The real worker, activities and sandbox provider run on the Temporal dev server; this test
stops and starts a PostgreSQL server of its own, so the session's server is never touched."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from temporalio.client import WorkflowHandle

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from core.db import (
    AuditEntry,
    Invoice,
    LedgerEntry,
    Order,
    OutboxMessage,
    Shipment,
    make_engine,
    make_session_factory,
)
from scripts.migrate import upgrade
from scripts.seed import seed
from tests.support import PostgresServer, record_figure, require_postgres_bindir
from worker import build_worker
from workflows.sales_order import (
    Customer,
    OrderLine,
    SalesOrderInput,
    SalesOrderResult,
    SalesOrderWorkflow,
    Stage,
    sales_order_workflow_id,
)

IN_FLIGHT = 5
OUTAGE_S = 5.0


@pytest.fixture
async def outage_postgres() -> AsyncIterator[tuple[PostgresServer, str]]:
    """A PostgreSQL server of this test's own, with a migrated database."""
    server = PostgresServer(require_postgres_bindir()).init()
    try:
        await asyncio.to_thread(server.start)
        url = await server.create_database("outage")
        await asyncio.to_thread(upgrade, url)
        yield server, url
    finally:
        await asyncio.to_thread(server.destroy)


def _order(no: str) -> SalesOrderInput:
    # 100 EUR: below every approval threshold, so the order runs through to closed by itself
    return SalesOrderInput(
        order_no=no,
        customer=Customer(
            id="CUST-DB",
            company_name="Umbrella",
            contact_phone="+49 30 555 0199",
            email="buyer@umbrella.example",
        ),
        lines=[OrderLine(sku="SKU-MUG", quantity=Decimal(10), unit_price=Decimal(10))],
        requester="alice",
    )


async def _max_attempt(handle: WorkflowHandle) -> int:
    """The highest attempt any activity of the instance needed (1: none failed), read from its
    history: ActivityTaskStarted for activities, the SDK's marker for local activities (the
    projection), which retry inside the worker."""
    attempts = [0]
    async for e in handle.fetch_history_events():
        if e.HasField("activity_task_started_event_attributes"):
            attempts.append(e.activity_task_started_event_attributes.attempt)
        elif e.marker_recorded_event_attributes.marker_name == "core_local_activity":
            data = e.marker_recorded_event_attributes.details["data"].payloads[0].data
            attempts.append(json.loads(data)["attempt"])
    return max(attempts)


async def _duplicates(sessions, order_nos: list[str]) -> dict[str, int]:
    """Rows beyond the one expected, per kind of record."""

    async def extra(key_column, *where) -> int:
        counts = (
            select(key_column, func.count().label("n"))
            .where(*where)
            .group_by(key_column)
            .having(func.count() > 1)
            .subquery()
        )
        return int(await session.scalar(select(func.coalesce(func.sum(counts.c.n - 1), 0))))

    async with sessions() as session:
        return {
            "charges": await extra(
                LedgerEntry.order_no,
                LedgerEntry.order_no.in_(order_nos),
                LedgerEntry.kind == "charge",
            ),
            "shipments": await extra(Shipment.order_no, Shipment.order_no.in_(order_nos)),
            "invoices": await extra(Invoice.order_no, Invoice.order_no.in_(order_nos)),
            "audit events": await extra(AuditEntry.event_key),
            "outbox messages": await extra(OutboxMessage.idempotency_key),
        }


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stop", ["before_start", "right_after_start"])
async def test_orders_close_exactly_once_after_postgresql_was_down(
    stop, outage_postgres, dev_env, mail_sink
):
    server, url = outage_postgres
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    await seed(sessions)  # leaves connections in the pool: they go stale in the outage
    run = uuid.uuid4().hex[:8]
    order_nos = [f"DB-{run}-{i}" for i in range(IN_FLIGHT)]
    task_queue = f"db-outage-{uuid.uuid4()}"
    client = dev_env.client
    try:
        async with build_worker(
            client,
            task_queue=task_queue,
            session_factory=sessions,
            sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
            provider=SandboxPaymentProvider(sessions),
        ):
            if stop == "before_start":
                await asyncio.to_thread(server.stop, "fast")
            handles = [
                await client.start_workflow(
                    SalesOrderWorkflow.run,
                    _order(no),
                    id=sales_order_workflow_id(no),
                    task_queue=task_queue,
                )
                for no in order_nos
            ]
            if stop == "right_after_start":  # the first activities may be half done
                await asyncio.to_thread(server.stop, "fast")
            record_figure("db outage: instances in flight", len(handles))
            await asyncio.sleep(OUTAGE_S)
            await asyncio.to_thread(server.start)

            outcomes = await asyncio.wait_for(
                asyncio.gather(*(h.result() for h in handles), return_exceptions=True), 150
            )
            attempts = [await _max_attempt(h) for h in handles]
            assert max(attempts) >= 2, f"the outage failed no activity: attempts {attempts}"
        closed = [
            r for r in outcomes if isinstance(r, SalesOrderResult) and r.stage == Stage.CLOSED
        ]
        lost = len(handles) - len(closed)
        record_figure("lost instances", lost, add=True)

        dups = await _duplicates(sessions, order_nos)
        record_figure("duplicates found", sum(dups.values()), add=True)

        async with sessions() as session:
            charges = (
                await session.execute(
                    select(LedgerEntry.order_no, LedgerEntry.kind, LedgerEntry.amount)
                    .where(LedgerEntry.order_no.in_(order_nos))
                    .order_by(LedgerEntry.order_no)
                )
            ).all()
            shipped = set(
                (
                    await session.execute(
                        select(Shipment.order_no).where(Shipment.order_no.in_(order_nos))
                    )
                ).scalars()
            )
            invoiced = set(
                (
                    await session.execute(
                        select(Invoice.order_no).where(Invoice.order_no.in_(order_nos))
                    )
                ).scalars()
            )
            stages = dict(
                (
                    await session.execute(
                        select(Order.order_no, Order.stage).where(Order.order_no.in_(order_nos))
                    )
                ).all()
            )
            audited = set(
                (
                    await session.execute(
                        select(AuditEntry.workflow_id).where(
                            AuditEntry.workflow_id.in_(
                                [sales_order_workflow_id(n) for n in order_nos]
                            )
                        )
                    )
                ).scalars()
            )
            outbox = await session.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(
                    OutboxMessage.workflow_id.in_([sales_order_workflow_id(n) for n in order_nos])
                )
            )
    finally:
        await engine.dispose()

    assert lost == 0, f"not closed: {[r for r in outcomes if r not in closed]}"
    assert dups == dict.fromkeys(dups, 0)
    assert charges == [(no, "charge", Decimal("100.00")) for no in order_nos]
    assert shipped == invoiced == set(order_nos)
    assert stages == dict.fromkeys(order_nos, Stage.CLOSED.value)
    assert audited == {sales_order_workflow_id(n) for n in order_nos}
    assert outbox and outbox >= IN_FLIGHT
