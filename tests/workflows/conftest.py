"""Workflow tests on the real time-skipping test server with fake activities.

The fakes share the real activities' names and keep what they were asked in memory; the payment
fake enforces idempotency keys and declines like the real provider does.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.models import (
    OUT_OF_STOCK,
    PAYMENT_DECLINED,
    PAYMENT_EVENT_CONFLICT,
    IncomingPayment,
    InvoiceRequest,
    InvoiceResult,
    Notification,
    NotificationResult,
    PaymentRequest,
    PaymentResult,
    PolicyDocument,
    PolicyRequest,
    ProjectionBatch,
    RefundRequest,
    ShipmentRequest,
    ShipmentResult,
    StockRequest,
    StockResult,
)
from core.temporal import register_search_attributes
from tests.support import binary, start_dev_server
from workflows.human_task import Actor
from workflows.sales_order import (
    Customer,
    OrderLine,
    SalesOrderInput,
    SalesOrderWorkflow,
    sales_order_workflow_id,
)


@pytest_asyncio.fixture(scope="session")
async def ts_env():
    """The time-skipping server; the dev server when recording histories, because histories
    with updates written by the time-skipping server do not replay (its update events differ)."""
    if os.environ.get("PROCFLOW_RECORD_HISTORIES"):
        env = await start_dev_server()
    else:
        env = await start_time_skipping()
    try:
        yield env
    finally:
        await env.shutdown()


async def start_time_skipping() -> WorkflowEnvironment:
    """A time-skipping test server with this project's search attributes (shut it down)."""
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=binary("temporal-test-server"),
    )
    await register_search_attributes(env.client, check_existing=False)
    return env


@dataclass
class Fakes:
    policy: PolicyDocument | None = None
    batches: list[ProjectionBatch] = field(default_factory=list)
    mails: list[Notification] = field(default_factory=list)
    charges: dict[str, Decimal] = field(default_factory=dict)
    charge_calls: int = 0
    refunds: dict[str, Decimal] = field(default_factory=dict)
    refund_of: dict[str, str] = field(default_factory=dict)  # refund key -> payment key
    incoming: dict[str, Decimal] = field(default_factory=dict)
    incoming_orders: dict[str, str] = field(default_factory=dict)  # event id -> order no
    refunds_declined: int = 0  # the provider refuses this many refunds
    declined_customers: set[str] = field(default_factory=set)
    lost_answers: int = 0  # charge succeeds at the provider, the answer is lost (retry follows)
    out_of_stock: set[str] = field(default_factory=set)
    reserved: dict[str, int] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    shipped: list[str] = field(default_factory=list)
    invoiced: list[str] = field(default_factory=list)

    def activities(self) -> list:
        f = self

        @activity.defn(name="load_policy")
        async def load_policy(req: PolicyRequest) -> PolicyDocument:
            return f.policy or PolicyDocument(process_type=req.process_type, version=0, document={})

        @activity.defn(name="project")
        async def project(batch: ProjectionBatch) -> None:
            f.batches.append(batch)
            f.mails.extend(batch.mails)  # queued in the outbox by the real activity

        @activity.defn(name="notify")
        async def notify(n: Notification) -> NotificationResult:
            f.mails.append(n)
            return NotificationResult(recipients=n.to_emails, sent=True)

        @activity.defn(name="capture_payment")
        async def capture_payment(req: PaymentRequest) -> PaymentResult:
            f.charge_calls += 1
            if req.customer_id in f.declined_customers:
                raise ApplicationError("card declined", type=PAYMENT_DECLINED, non_retryable=True)
            duplicate = req.idempotency_key in f.charges
            f.charges.setdefault(req.idempotency_key, req.amount)
            if f.lost_answers > 0:
                f.lost_answers -= 1
                raise RuntimeError("connection reset after the provider charged")
            return PaymentResult(
                idempotency_key=req.idempotency_key,
                provider_ref="ch-1",
                amount=req.amount,
                status="captured",
                duplicate=duplicate,
            )

        @activity.defn(name="refund_payment")
        async def refund_payment(req: RefundRequest) -> PaymentResult:
            if req.idempotency_key not in f.refunds:
                if f.refunds_declined > 0:
                    f.refunds_declined -= 1
                    raise ApplicationError(
                        "refund refused by the provider", type=PAYMENT_DECLINED, non_retryable=True
                    )
                original = f.charges.get(req.original_key) or f.incoming.get(
                    req.original_key.removeprefix("incoming:")
                )
                given_back = sum(
                    a for k, a in f.refunds.items() if f.refund_of.get(k) == req.original_key
                )
                if original is None or req.amount > original - given_back:
                    raise ApplicationError(
                        f"refund {req.amount} exceeds what {req.original_key} can give back",
                        type=PAYMENT_DECLINED,
                        non_retryable=True,
                    )
                f.refund_of[req.idempotency_key] = req.original_key
            f.refunds.setdefault(req.idempotency_key, req.amount)
            return PaymentResult(
                idempotency_key=req.idempotency_key,
                provider_ref="rf-1",
                amount=req.amount,
                status="refunded",
            )

        @activity.defn(name="record_incoming_payment")
        async def record_incoming_payment(p: IncomingPayment) -> PaymentResult:
            known = f.incoming.get(p.event_id)
            if known is not None and (
                known != p.amount or f.incoming_orders[p.event_id] != p.order_no
            ):
                raise ApplicationError(
                    f"payment event {p.event_id} is already booked for another order or amount",
                    type=PAYMENT_EVENT_CONFLICT,
                    non_retryable=True,
                )
            f.incoming.setdefault(p.event_id, p.amount)
            f.incoming_orders.setdefault(p.event_id, p.order_no)
            return PaymentResult(
                idempotency_key=f"incoming:{p.event_id}",
                provider_ref="in-1",
                amount=p.amount,
                status="received",
                duplicate=known is not None,
            )

        @activity.defn(name="reserve_stock")
        async def reserve_stock(req: StockRequest) -> StockResult:
            missing = [x.sku for x in req.lines if x.sku in f.out_of_stock]
            if missing:
                raise ApplicationError(
                    f"out of stock: {missing}", type=OUT_OF_STOCK, non_retryable=True
                )
            f.reserved[req.order_no] = f.reserved.get(req.order_no, 0) + 1
            return StockResult(
                order_no=req.order_no, reserved={x.sku: x.quantity for x in req.lines}
            )

        @activity.defn(name="release_stock")
        async def release_stock(req: StockRequest) -> None:
            f.released.append(req.order_no)

        @activity.defn(name="ship_order")
        async def ship_order(req: ShipmentRequest) -> ShipmentResult:
            f.shipped.append(req.order_no)
            return ShipmentResult(order_no=req.order_no, tracking_no=f"TRK-{req.order_no}")

        @activity.defn(name="issue_invoice")
        async def issue_invoice(req: InvoiceRequest) -> InvoiceResult:
            f.invoiced.append(req.order_no)
            return InvoiceResult(
                invoice_no=f"INV-{req.order_no}", order_no=req.order_no, amount=req.amount
            )

        return [
            load_policy,
            project,
            notify,
            capture_payment,
            refund_payment,
            record_incoming_payment,
            reserve_stock,
            release_stock,
            ship_order,
            issue_invoice,
        ]

    def subjects(self) -> list[str]:
        return [m.subject for m in self.mails]

    def audit_actions(self) -> list[str]:
        return [a.action for b in self.batches for a in b.audit]


@dataclass
class Harness:
    client: Client
    env: WorkflowEnvironment
    task_queue: str
    fakes: Fakes
    started: list[WorkflowHandle] = field(default_factory=list)

    async def start(self, inp: SalesOrderInput) -> WorkflowHandle:
        handle = await self.client.start_workflow(
            SalesOrderWorkflow.run,
            inp,
            id=sales_order_workflow_id(inp.order_no),
            task_queue=self.task_queue,
        )
        self.started.append(handle)
        return handle

    async def record_histories(self, test_name: str, directory: str) -> None:
        """Save each instance's history for the replay tests (PROCFLOW_RECORD_HISTORIES=dir)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for i, handle in enumerate(self.started):
            history = await handle.fetch_history()
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
            document = {
                "workflow_id": history.workflow_id,
                "history": json.loads(history.to_json()),
            }
            (out / f"sales_order__{name}__{i}.json").write_text(json.dumps(document))

    async def terminate_leftovers(self) -> None:
        """An instance left running would hold the shared server's clock: end it."""
        for handle in self.started:
            desc = await handle.describe()
            if desc.status == WorkflowExecutionStatus.RUNNING:
                await handle.terminate("test ended")


@pytest_asyncio.fixture
async def harness(ts_env: WorkflowEnvironment, request):
    fakes = Fakes()
    task_queue = f"tq-{uuid.uuid4()}"
    async with Worker(
        ts_env.client,
        task_queue=task_queue,
        workflows=[SalesOrderWorkflow],
        activities=fakes.activities(),
    ):
        harness = Harness(ts_env.client, ts_env, task_queue, fakes)
        try:
            yield harness
            if os.environ.get("PROCFLOW_RECORD_HISTORIES"):
                await harness.record_histories(
                    request.node.name, os.environ["PROCFLOW_RECORD_HISTORIES"]
                )
        finally:
            await harness.terminate_leftovers()


def order(
    amount: int | str = 100, *, order_no: str | None = None, requester: str = "alice", **kw
) -> SalesOrderInput:
    """An order of one line whose amount is `amount`."""
    return SalesOrderInput(
        order_no=order_no or f"T{uuid.uuid4().hex[:10]}",
        customer=kw.pop("customer", None)
        or Customer(
            id="CUST-1",
            company_name="ACME Ltd",
            contact_phone="+40 21 123 4567",
            email="buyer@acme.example",
        ),
        lines=[OrderLine(sku="SKU-MUG", quantity=Decimal(1), unit_price=Decimal(amount))],
        requester=requester,
        **kw,
    )


VP = Actor(username="victor", roles=["vice-president"])
SD = Actor(username="diana", roles=["sales-director"])
MANAGER = Actor(username="mike", roles=["manager"])


@pytest.fixture
def anyio_backend():
    return "asyncio"
