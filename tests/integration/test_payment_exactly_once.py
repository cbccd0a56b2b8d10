"""The real workflow, activities and sandbox provider: one charge, whatever the retries."""

from __future__ import annotations

import uuid
from decimal import Decimal

from sqlalchemy import select

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from core.db import LedgerEntry, StockItem
from worker import build_worker
from workflows.sales_order import (
    Customer,
    OrderLine,
    SalesOrderInput,
    SalesOrderWorkflow,
    Stage,
    sales_order_workflow_id,
)


def _order(no: str, sku: str = "SKU-MUG", qty: int = 2) -> SalesOrderInput:
    return SalesOrderInput(
        order_no=no,
        customer=Customer(
            id="CUST-9",
            company_name="Initech",
            contact_phone="+1 555 0100",
            email="ap@initech.example",
        ),
        lines=[OrderLine(sku=sku, quantity=Decimal(qty), unit_price=Decimal("12.50"))],
        requester="bob",
        installments=[Decimal(50), Decimal(50)],
    )


async def _run(dev_env, sessions, mail_sink, provider, inp):
    task_queue = f"pay-{uuid.uuid4()}"
    sender = SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost")
    async with build_worker(
        dev_env.client,
        task_queue=task_queue,
        session_factory=sessions,
        sender=sender,
        provider=provider,
    ):
        handle = await dev_env.client.start_workflow(
            SalesOrderWorkflow.run,
            inp,
            id=sales_order_workflow_id(inp.order_no),
            task_queue=task_queue,
        )
        return await handle.result()


async def _ledger(sessions, order_no):
    async with sessions() as s:
        rows = (
            (
                await s.execute(
                    select(LedgerEntry)
                    .where(LedgerEntry.order_no == order_no)
                    .order_by(LedgerEntry.id)
                )
            )
            .scalars()
            .all()
        )
    return [(r.kind, r.amount) for r in rows]


async def test_charge_whose_answer_was_lost_is_not_charged_again(dev_env, database, mail_sink):
    _, sessions = database
    provider = SandboxPaymentProvider(sessions, crash_after_charge=2, outages=1)
    no = f"P-{uuid.uuid4().hex[:8]}"
    result = await _run(dev_env, sessions, mail_sink, provider, _order(no))
    assert result.stage == Stage.CLOSED
    assert provider.crash_after_charge == 0 and provider.outages == 0  # the faults happened
    assert await _ledger(sessions, no) == [
        ("charge", Decimal("12.50")),
        ("charge", Decimal("12.50")),
    ]


async def test_out_of_stock_after_payment_refunds_through_the_ledger(dev_env, database, mail_sink):
    _, sessions = database
    async with sessions.begin() as s:
        s.add(StockItem(sku="SKU-RARE", description="rare", on_hand=Decimal(1)))
    no = f"P-{uuid.uuid4().hex[:8]}"
    provider = SandboxPaymentProvider(sessions)
    result = await _run(dev_env, sessions, mail_sink, provider, _order(no, "SKU-RARE", qty=3))
    assert result.stage == Stage.FAILED and "not enough stock" in result.reason
    assert await _ledger(sessions, no) == [
        ("charge", Decimal("18.75")),
        ("refund", Decimal("18.75")),
    ]
    assert any(m["Subject"] == f"Order {no}: failed" for m in mail_sink.messages)
