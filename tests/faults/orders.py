"""Orders for the fault tests, and the checks that nothing was lost or done twice."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowHandle

from core.db import AuditEntry, Invoice, LedgerEntry, Order, Shipment
from tests.support import record_figure
from workflows.sales_order import (
    Customer,
    OrderLine,
    SalesOrderInput,
    SalesOrderResult,
    SalesOrderWorkflow,
    sales_order_workflow_id,
)

CUSTOMER = Customer(
    id="CUST-FAULT",
    company_name="Umbrella Ltd",
    contact_phone="+40 21 555 0199",
    email="ap@umbrella.example",
)


def order(order_no: str, amount: int = 100, requester: str = "alice") -> SalesOrderInput:
    """One printer line; 100 needs no approval, 600,000 waits for a vice-president."""
    return SalesOrderInput(
        order_no=order_no,
        customer=CUSTOMER,
        lines=[OrderLine(sku="SKU-PRINTER", quantity=Decimal(1), unit_price=Decimal(amount))],
        requester=requester,
    )


def order_body(order_no: str, amount: int = 600_000) -> dict:
    """The same order as the API's request body."""
    return order(order_no, amount).model_dump(mode="json", exclude={"requester", "carry"})


async def start(
    client: Client, inp: SalesOrderInput, task_queue: str
) -> WorkflowHandle[SalesOrderWorkflow, SalesOrderResult]:
    return await client.start_workflow(
        SalesOrderWorkflow.run,
        inp,
        id=sales_order_workflow_id(inp.order_no),
        task_queue=task_queue,
    )


async def charges(sessions: async_sessionmaker, order_no: str) -> int:
    async with sessions() as s:
        return (
            await s.execute(
                select(func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.order_no == order_no, LedgerEntry.kind == "charge")
            )
        ).scalar_one()


async def capture_running(handle: WorkflowHandle) -> bool:
    """A worker has picked up the capture_payment activity and not answered yet."""
    desc = await handle.describe()
    return any(
        pa.activity_type.name == "capture_payment"
        and pa.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        for pa in desc.raw_description.pending_activities
    )


async def capture_attempts(handle: WorkflowHandle) -> list[int]:
    """The attempt number of every started capture_payment, from the instance's history."""
    captures: set[int] = set()
    attempts: list[int] = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == "capture_payment":
                captures.add(event.event_id)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            if started.scheduled_event_id in captures:
                attempts.append(started.attempt)
    return attempts


async def check_nothing_lost_or_doubled(
    sessions: async_sessionmaker, order_nos: list[str]
) -> tuple[int, int]:
    """Per order: one order row, closed; exactly one charge, shipment, invoice and
    payment_captured audit entry. Records and returns (duplicates found, lost instances)."""
    duplicates = lost = 0
    async with sessions() as s:

        async def per_order(model, column) -> dict[str, int]:
            rows = await s.execute(
                select(column, func.count()).where(column.in_(order_nos)).group_by(column)
            )
            return {key: n for key, n in rows.all()}

        ledger = await s.execute(
            select(LedgerEntry.order_no, func.count())
            .where(LedgerEntry.order_no.in_(order_nos), LedgerEntry.kind == "charge")
            .group_by(LedgerEntry.order_no)
        )
        charged = {key: n for key, n in ledger.all()}
        shipped = await per_order(Shipment, Shipment.order_no)
        invoiced = await per_order(Invoice, Invoice.order_no)
        order_rows = await per_order(Order, Order.order_no)
        audit = await s.execute(
            select(AuditEntry.workflow_id, func.count())
            .where(
                AuditEntry.workflow_id.in_([sales_order_workflow_id(n) for n in order_nos]),
                AuditEntry.action == "payment_captured",
            )
            .group_by(AuditEntry.workflow_id)
        )
        captured_audit = {key: n for key, n in audit.all()}
        rows = await s.execute(
            select(Order.order_no, Order.stage).where(Order.order_no.in_(order_nos))
        )
        stages = {no: stage for no, stage in rows.all()}
    for no in order_nos:
        counts = [
            charged.get(no, 0),
            shipped.get(no, 0),
            invoiced.get(no, 0),
            order_rows.get(no, 0),
            captured_audit.get(sales_order_workflow_id(no), 0),
        ]
        duplicates += sum(max(0, n - 1) for n in counts)
        if stages.get(no) != "closed" or 0 in counts:
            lost += 1
    record_figure("duplicates found", duplicates, add=True)
    record_figure("lost instances", lost, add=True)
    return duplicates, lost
