"""Sales order (order to cash): validated -> approval chain -> payment -> stock -> shipment ->
invoice -> closed, with prepaid variants, installments, special changes and compensation.

Public contract (used by the API): the models below, `sales_order_workflow_id`,
`input_fingerprint`, and the handler names of `SalesOrderWorkflow`:
updates `settle`, `decide`, `claim`, `release`, `delegate`, `reassign`, `amend`, `cancel`;
signal `payment_received`; query `status`.
"""

from __future__ import annotations

import unicodedata
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from email_validator import EmailNotValidError, validate_email

    from activities.models import (
        PAYMENT_EVENT_CONFLICT,
        IncomingPayment,
        InvoiceRequest,
        OrderLineRecord,
        OrderRecord,
        PaymentRequest,
        RefundRequest,
        ShipmentRequest,
        StageChange,
        StockRequest,
    )
    from activities.payments import PaymentActivities
    from activities.warehouse import WarehouseActivities
    from core.temporal import AMOUNT, CUSTOMER_ID
    from core.temporal import PROCESS_TYPE as PROCESS_TYPE_SA

from workflows.approval import APPROVED, approval_chain
from workflows.errors import CONFLICT, NOT_PERMITTED, refuse
from workflows.errors import DUPLICATE_EVENT as DUPLICATE_EVENT
from workflows.errors import NOT_CANCELLABLE as NOT_CANCELLABLE
from workflows.human_task import MANAGER_ROLE, SYSTEM_ACTOR, TIMED_OUT, WITHDRAWN, Actor, HumanTask
from workflows.kernel import HARDENING as HARDENING
from workflows.kernel import DecideResult as DecideResult
from workflows.kernel import DecisionRecord as DecisionRecord
from workflows.kernel import (
    HumanProcess,
    ProcessCarry,
    ProcessStatus,
    Stop,
    business_retry,
    cause_of,
)
from workflows.kernel import StageEntry as StageEntry
from workflows.kernel import TaskView as TaskView
from workflows.kernel import input_fingerprint as input_fingerprint
from workflows.policy import SalesOrderPolicy

PROCESS_TYPE = "sales_order"
# one spelling everywhere: ProcessType, policy type, workflow ids ("sales_order-1001")
WORKFLOW_ID_PREFIX = f"{PROCESS_TYPE}-"
# instances started before 2026-12 are "sales-order-<no>"; the API finds them by the read model
LEGACY_WORKFLOW_ID_PREFIX = "sales-order-"
# memo key holding the fingerprint of the input that started an instance
MEMO_FINGERPRINT = "input_fingerprint"
ACKNOWLEDGED = "acknowledged"
SETTLED = "settled"
CANCEL_ROLES = frozenset({MANAGER_ROLE})
AMEND_ROLES = frozenset({"sales", MANAGER_ROLE})


class Stage(StrEnum):
    RECEIVED = "received"
    VALIDATED = "validated"
    AWAITING_PAYMENT = "awaiting_payment"  # prepaid: gate at entry or before shipment
    APPROVAL = "approval"
    PAYMENT = "payment"  # capturing an installment
    PAID = "paid"
    STOCK_RESERVED = "stock_reserved"
    SHIPPED = "shipped"
    INVOICED = "invoiced"
    CLOSED = "closed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    FAILED = "failed"
    # money could not be given back automatically: a finance task settles it by hand
    NEEDS_ATTENTION = "needs_attention"


TERMINAL_STAGES = frozenset({Stage.CLOSED, Stage.REJECTED, Stage.CANCELLED, Stage.FAILED})
# after shipment an order can no longer be cancelled or changed
SHIPPED_OR_LATER = frozenset({Stage.SHIPPED, Stage.INVOICED}) | TERMINAL_STAGES

Variant = Literal["standard", "prepaid_entry", "prepaid_warehouse"]

# The largest amount an order, a line or a payment may carry (16 digits, as the money columns).
MAX_AMOUNT = Decimal("99999999999999.99")
# Validation context of a new submission: the checks below that came after instances were
# started run only then, so that the input of an older instance always decodes on replay.
SUBMISSION = MappingProxyType({"submission": True})


def _submitting(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("submission"))


def _plain_name(value: str) -> str:
    """Refuse control, format (bidi overrides, zero-width) and separator characters."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise ValueError(f"must not contain the control or format character U+{ord(ch):04X}")
    return value


class Customer(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=64, description="customer number")
    company_name: str = Field(min_length=1, max_length=200)
    contact_phone: str = Field(min_length=5, max_length=40, pattern=r"^\+?[0-9 ()./-]{5,40}$")
    email: str = Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

    @field_validator("id", "company_name")
    @classmethod
    def _names(cls, v: str, info: ValidationInfo) -> str:
        return _plain_name(v) if _submitting(info) else v

    @field_validator("email")
    @classmethod
    def _email(cls, v: str, info: ValidationInfo) -> str:
        if not _submitting(info):
            return v
        try:
            return validate_email(v, check_deliverability=False).normalized
        except EmailNotValidError as err:
            raise ValueError(f"not a valid e-mail address: {err}") from None


class OrderLine(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    sku: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=400)
    quantity: Decimal = Field(gt=0, max_digits=15, decimal_places=3)
    unit_price: Decimal = Field(gt=0, max_digits=16, decimal_places=2)

    @field_validator("sku", "description")
    @classmethod
    def _names(cls, v: str, info: ValidationInfo) -> str:
        return _plain_name(v) if _submitting(info) else v


class OrderDetails(BaseModel):
    """What a requester submits (the API's request body). The requester is not part of it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    order_no: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    customer: Customer
    lines: list[OrderLine] = Field(min_length=1, max_length=500)
    currency: str = Field("EUR", pattern=r"^[A-Z]{3}$")
    variant: Variant = Field(
        "standard",
        description="standard: approval chain, then capture; prepaid_entry: nothing proceeds "
        "until paid; prepaid_warehouse: proceeds, shipment blocked until paid",
    )
    installments: list[Decimal] = Field(
        default_factory=lambda: [Decimal(100)],
        min_length=1,
        max_length=12,
        description="percent of the amount due per installment; the first is the advance, "
        "the rest are due before shipment; must add up to 100",
    )
    loyalty_discount: bool = Field(False, description="5% off the amount due (policy)")

    @field_validator("installments")
    @classmethod
    def _installments_add_up(cls, v: list[Decimal]) -> list[Decimal]:
        if any(p <= 0 for p in v):
            raise ValueError("every installment must be a positive percentage")
        if sum(v) != 100:
            raise ValueError("installments must add up to 100")
        return v

    @field_validator("lines")
    @classmethod
    def _bounded_total(cls, v: list[OrderLine], info: ValidationInfo) -> list[OrderLine]:
        if _submitting(info):
            for i, line in enumerate(v):
                if line.quantity * line.unit_price > MAX_AMOUNT:
                    raise ValueError(f"line {i + 1}: quantity x unit_price exceeds {MAX_AMOUNT}")
            if amount_of(v) > MAX_AMOUNT:
                raise ValueError(f"the order's total exceeds {MAX_AMOUNT}")
        return v

    @field_validator("installments")
    @classmethod
    def _installment_cents(cls, v: list[Decimal], info: ValidationInfo) -> list[Decimal]:
        if _submitting(info) and any(p != p.quantize(Decimal("0.01")) for p in v):
            raise ValueError("installments are percentages with at most 2 decimals")
        return v

    @model_validator(mode="after")
    def _unique_lines(self) -> OrderDetails:
        skus = [line.sku for line in self.lines]
        if len(skus) != len(set(skus)):
            raise ValueError("lines: each sku may appear only once")
        return self


class SalesOrderInput(OrderDetails):
    requester: str = Field(min_length=1, description="username from the caller's credentials")
    carry: SalesOrderCarry | None = Field(
        None, description="set by the workflow itself when it continues as new; never by callers"
    )


def submission(details: OrderDetails, requester: str) -> SalesOrderInput:
    """The start input of a new order, with every submission check (raises ValidationError)."""
    return SalesOrderInput.model_validate(
        {**details.model_dump(), "requester": requester}, context=dict(SUBMISSION)
    )


class PaymentEvent(BaseModel):
    """An incoming payment reported by the provider; redelivery of an event_id changes nothing."""

    event_id: str = Field(min_length=1, max_length=200)
    amount: Decimal = Field(gt=0, le=MAX_AMOUNT, max_digits=16, decimal_places=2)


class AmendInput(BaseModel):
    description: str = Field(min_length=1, max_length=2000)
    actor: Actor


class CancelInput(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)
    actor: Actor


class PaymentView(BaseModel):
    key: str
    kind: Literal["charge", "incoming", "refund"]
    amount: Decimal
    provider_ref: str
    original_key: str | None = Field(None, description="for a refund: the payment it gives back")


class PaymentOutcome(BaseModel):
    """What a reported payment did to the order; `duplicate`: the event was known already."""

    event_id: str
    duplicate: bool = False
    paid: Decimal
    refunded: Decimal
    balance: Decimal


class SalesOrderStatus(ProcessStatus):
    order_no: str
    stage: Stage
    variant: Variant
    customer_id: str
    currency: str
    amount: Decimal
    amount_due: Decimal
    paid: Decimal
    refunded: Decimal
    due: Decimal = Field(
        Decimal(0), description="what the customer owes now: amount_due, 0 once stopped"
    )
    balance: Decimal = Field(
        Decimal(0),
        description="due - (paid - refunded): still owed (> 0) or owed back to the customer (< 0)",
    )
    special_change: bool
    amendments: list[str]
    payments: list[PaymentView]
    tracking_no: str | None = None
    invoice_no: str | None = None


class SalesOrderResult(BaseModel):
    order_no: str
    stage: Stage
    amount_due: Decimal
    paid: Decimal
    refunded: Decimal
    balance: Decimal = Decimal(0)
    reason: str = ""
    tracking_no: str | None = None
    invoice_no: str | None = None


class SalesOrderCarry(ProcessCarry):
    """Everything an instance carries into its next run when it continues as new: the kernel's
    part (tasks with their absolute due times, stages, steps done), its pinned policy, money,
    and how far the process map got."""

    policy: dict
    amount_due: Decimal
    payments: list[PaymentView]
    seen_payment_events: dict[str, Decimal]
    amendments: list[str]
    ack_tasks: list[str]
    special_changes: list[list[str]]
    settlements: list[str]
    levels_done: int
    stopped: bool = False
    stock_reserved: bool = False
    tracking_no: str | None = None
    invoice_no: str | None = None


SalesOrderInput.model_rebuild()


def sales_order_workflow_id(order_no: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{order_no}"


def _money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def amount_of(lines: list[OrderLine]) -> Decimal:
    return _money(sum((line.quantity * line.unit_price for line in lines), Decimal(0)))


@workflow.defn
class SalesOrderWorkflow(HumanProcess):
    """One sales order from receipt to closing; its timers, tasks and payments."""

    PROCESS_TYPE = PROCESS_TYPE
    TASK_KINDS = frozenset({"approval", "acknowledgement", "payment", "settlement"})
    END_STATUS = MappingProxyType(
        {
            Stage.CLOSED.value: "completed",
            Stage.REJECTED.value: "completed",
            Stage.CANCELLED.value: "cancelled",
            Stage.FAILED.value: "failed",
        }
    )
    NOUN = "order"
    FAILED_STAGE = Stage.FAILED

    @workflow.init
    def __init__(self, inp: SalesOrderInput) -> None:
        self.inp = inp
        self.policy = SalesOrderPolicy()
        self.amount = amount_of(inp.lines)
        self.amount_due = self.amount
        self.amendments: list[str] = []
        self.payments: list[PaymentView] = []
        self.seen_payment_events: dict[str, Decimal] = {}  # event id -> amount reported
        super().__init__(
            business_key=inp.order_no,
            requester=inp.requester,
            initial_stage=Stage.RECEIVED,
            carry=inp.carry,
        )
        self.ack_tasks: list[HumanTask] = []
        self.cancel_request: CancelInput | None = None
        self.tracking_no: str | None = None
        self.invoice_no: str | None = None
        self.stock_reserved = False
        self.special_changes: list[list[HumanTask]] = []  # the acknowledgements of each change
        self.settlements: list[HumanTask] = []  # finance tasks for money to settle by hand
        self.stopped = False  # rejected, cancelled or failed: nothing is due any more
        self.levels_done = 0
        if inp.carry is not None:
            self._restore(inp.carry)

    def _restore(self, c: SalesOrderCarry) -> None:
        self.policy = SalesOrderPolicy.model_validate(c.policy)
        self.rt.board.max_actions = self.policy.max_actions_per_task
        self.amount_due = c.amount_due
        self.payments = list(c.payments)
        self.seen_payment_events = dict(c.seen_payment_events)
        self.amendments = list(c.amendments)
        tasks = self.rt.board.tasks
        self.ack_tasks = [tasks[t] for t in c.ack_tasks]
        self.special_changes = [[tasks[t] for t in ts] for ts in c.special_changes]
        self.settlements = [tasks[t] for t in c.settlements]
        self.levels_done = c.levels_done
        self.stopped = c.stopped
        self.stock_reserved = c.stock_reserved
        self.tracking_no = c.tracking_no
        self.invoice_no = c.invoice_no

    def next_run_input(self, carry: dict[str, Any]) -> SalesOrderInput:
        own = SalesOrderCarry(
            **carry,
            policy=self.policy.model_dump(mode="json"),
            amount_due=self.amount_due,
            payments=self.payments,
            seen_payment_events=self.seen_payment_events,
            amendments=self.amendments,
            ack_tasks=[t.task_id for t in self.ack_tasks],
            special_changes=[[t.task_id for t in ts] for ts in self.special_changes],
            settlements=[t.task_id for t in self.settlements],
            levels_done=self.levels_done,
            stopped=self.stopped,
            stock_reserved=self.stock_reserved,
            tracking_no=self.tracking_no,
            invoice_no=self.invoice_no,
        )
        return self.inp.model_copy(update={"carry": own})

    # ================================================================== the process map
    @workflow.run
    async def run(self, inp: SalesOrderInput) -> SalesOrderResult:
        if inp.carry is None:
            self.policy = await self.load_policy(SalesOrderPolicy, SalesOrderPolicy())
            if self.hardened:
                self.rt.board.max_actions = self.policy.max_actions_per_task
            self._apply_discount()
            self._record_order()
            await self.set_stage(Stage.VALIDATED)
        if self.finishing is not None:  # continued as new while ending
            await self.finish(*self.finishing)
        else:
            await self._process_map(inp)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return SalesOrderResult(
            order_no=inp.order_no,
            stage=Stage(self.stage),
            amount_due=self.amount_due,
            paid=self._paid(),
            refunded=self._refunded(),
            balance=self._balance(),
            reason=self.outcome_reason,
            tracking_no=self.tracking_no,
            invoice_no=self.invoice_no,
        )

    async def _process_map(self, inp: SalesOrderInput) -> None:
        step = self.step
        try:
            if inp.variant == "prepaid_entry":
                advance = self._installment_amount(0)
                await step("entry-gate", self._await_payment, advance, "advance payment")
            if self._needs_approval():
                await step("approval", self._approval_chain)
            if inp.variant == "standard":
                await step("capture-1", self._capture_installment, 0)
            await step("acks-1", self._await_acknowledgements)
            await step("stock", self._reserve_stock)
            await step("acks-2", self._await_acknowledgements)
            await step("balance", self._settle_before_shipment)
            await step("acks-3", self._await_acknowledgements)
            await step("ship", self._ship)
            await step("invoice", self._invoice)
            await self.finish(Stage.CLOSED, "order closed")
        except Stop as stop:
            await self._compensate()
            await self.finish(stop.stage, stop.reason)

    # ================================================================== steps
    def _apply_discount(self) -> None:
        if self.inp.loyalty_discount:
            factor = (Decimal(100) - self.policy.loyalty_discount_pct) / Decimal(100)
            self.amount_due = _money(self.amount * factor)

    def _needs_approval(self) -> bool:
        prepaid = self.inp.variant != "standard"
        return not (prepaid and self.policy.prepaid_exempt_from_approval) and bool(
            approval_chain(self.policy.approval_tiers, self.amount_due)
        )

    def _record_order(self) -> None:
        c = self.inp.customer
        self.rt.batch.order = OrderRecord(
            order_no=self.inp.order_no,
            workflow_id=self.rt.workflow_id,
            customer_id=c.id,
            customer_name=c.company_name,
            customer_email=c.email,
            requester=self.inp.requester,
            variant=self.inp.variant,
            currency=self.inp.currency,
            amount=self.amount,
            amount_due=self.amount_due,
            stage=self.stage,
            policy_version=self.policy_version,
            lines=self._line_records(),
        )
        self.rt.upsert(
            PROCESS_TYPE_SA.value_set(PROCESS_TYPE),
            CUSTOMER_ID.value_set(c.id),
            AMOUNT.value_set(float(self.amount_due)),
        )

    async def _approval_chain(self) -> None:
        await self.set_stage(Stage.APPROVAL)
        times = self.policy.approval_timers.task_times()
        subject = f"Approval needed: order {self.inp.order_no}"
        for index, level in enumerate(approval_chain(self.policy.approval_tiers, self.amount_due)):
            if index < self.levels_done:
                continue
            outcome = await self.approval_level(level, f"level:{index}", times, subject)
            if outcome == TIMED_OUT:
                raise Stop(Stage.CANCELLED, f"{level.name} was not decided in time")
            if outcome != APPROVED:
                raise Stop(Stage.REJECTED, f"{level.name}: rejected")
            self.levels_done = index + 1

    async def _capture_installment(self, index: int) -> None:
        amount = self._installment_amount(index)
        if self.hardened:  # only what is still due after this installment (the ledger says)
            target = sum((self._installment_amount(i) for i in range(index + 1)), Decimal(0))
            amount = min(amount, target - self._net_paid())
        if amount <= 0:
            return
        await self.set_stage(Stage.PAYMENT)
        n = len(self.inp.installments)
        key = f"{self.rt.workflow_id}:installment-{index + 1}"
        try:
            result = await workflow.execute_activity_method(
                PaymentActivities.capture_payment,
                PaymentRequest(
                    idempotency_key=key,
                    order_no=self.inp.order_no,
                    customer_id=self.inp.customer.id,
                    amount=amount,
                    currency=self.inp.currency,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=business_retry(),
                summary=f"capture installment {index + 1} of {n}: {amount} {self.inp.currency}",
            )
        except ActivityError as err:
            raise Stop(Stage.CANCELLED, f"payment failed: {cause_of(err)}") from err
        self.payments.append(
            PaymentView(key=key, kind="charge", amount=amount, provider_ref=result.provider_ref)
        )
        what = f"{amount} {self.inp.currency}"
        self.rt.audit(SYSTEM_ACTOR, "payment_captured", what, {"idempotency_key": key})
        await self.set_stage(Stage.PAID)

    async def _await_payment(self, needed: Decimal, what: str) -> None:
        """Prepaid gate: wait until the provider reported `needed` in total, or the deadline."""
        paid = self._net_paid if self.hardened else self._paid
        if paid() >= needed:
            return
        await self.set_stage(Stage.AWAITING_PAYMENT)
        slot = f"gate:{what}"
        found = self.slot_tasks(slot)  # continued as new while waiting
        task = found[0] if found else None
        if task is None:
            task = self.open_task(
                name=f"await {what}: {needed} {self.inp.currency}",
                kind="payment",
                roles=["finance"],
                outcomes=[],
                times=self.policy.payment_timers().task_times(),
                four_eyes=False,
            )
            self.slots[slot] = [task.task_id]
            await self._notify_customer(
                f"Order {self.inp.order_no}: payment of {needed} {self.inp.currency} expected",
                f"Please pay {needed} {self.inp.currency} ({what}) for order {self.inp.order_no}.",
            )
        gate = task
        await self.wait(lambda: paid() >= needed or not gate.is_open, what)
        if gate.is_open:
            self.close_task(gate, "paid")
            await self.rt.flush()
        elif gate.outcome == TIMED_OUT:
            raise Stop(Stage.CANCELLED, f"{what} not received in time")

    async def _await_acknowledgements(self) -> None:
        """A special change holds the order until every notified department acknowledged it."""
        if not self.ack_tasks:
            return
        await self.wait(
            lambda: all(not t.is_open for t in self.ack_tasks),
            "acknowledgements of the special change",
        )
        late = [t for t in self.ack_tasks if t.outcome == TIMED_OUT]
        if late:
            raise Stop(Stage.CANCELLED, f"special change not acknowledged in time: {late[0].name}")

    async def _reserve_stock(self) -> None:
        request = StockRequest(order_no=self.inp.order_no, lines=self._line_records())
        await self.business_step(WarehouseActivities.reserve_stock, request, "reserve stock")
        self.stock_reserved = True
        await self.set_stage(Stage.STOCK_RESERVED)

    async def _settle_before_shipment(self) -> None:
        if self.inp.variant == "standard":
            for i in range(1, len(self.inp.installments)):
                await self._capture_installment(i)
        else:
            await self._await_payment(self.amount_due, "payment before shipment")

    async def _ship(self) -> None:
        request = ShipmentRequest(order_no=self.inp.order_no)
        shipment = await self.business_step(
            WarehouseActivities.ship_order, request, "ship the order"
        )
        self.tracking_no = shipment.tracking_no
        self.stock_reserved = False
        await self.set_stage(Stage.SHIPPED, f"tracking {self.tracking_no}")

    async def _invoice(self) -> None:
        request = InvoiceRequest(
            order_no=self.inp.order_no, amount=self.amount_due, currency=self.inp.currency
        )
        invoice = await self.business_step(
            WarehouseActivities.issue_invoice, request, "issue the invoice"
        )
        self.invoice_no = invoice.invoice_no
        await self.set_stage(Stage.INVOICED, f"invoice {self.invoice_no}")

    # ================================================================== compensation and end
    async def _compensate(self) -> None:
        """Undo what the order did: withdraw open tasks, release stock, refund payments."""
        self.stopped = True
        await self.rt.quiesce()  # a payment being recorded right now is refunded too
        for t in self.rt.board.open_tasks():
            self.close_task(t, WITHDRAWN, comment="process ended")
        await self.rt.flush()
        if self.stock_reserved:
            await workflow.execute_activity_method(
                WarehouseActivities.release_stock,
                StockRequest(order_no=self.inp.order_no, lines=self._line_records()),
                start_to_close_timeout=timedelta(seconds=60),
                summary="release reserved stock",
            )
            self.stock_reserved = False
        for p in [p for p in self.payments if p.kind in ("charge", "incoming")]:
            refund_key = f"{self.rt.workflow_id}:refund:{p.key}"
            if any(r.key == refund_key for r in self.payments):
                continue
            amount = self._refundable(p) if self.hardened else p.amount
            if amount > 0:
                await self._refund(p, amount, refund_key, "compensation")

    def _refundable(self, p: PaymentView) -> Decimal:
        given_back = sum(
            (r.amount for r in self.payments if r.kind == "refund" and r.original_key == p.key),
            Decimal(0),
        )
        return p.amount - given_back

    async def _refund(self, p: PaymentView, amount: Decimal, key: str, why: str) -> None:
        """Give amount of payment p back; a refund the provider refuses is settled by hand."""
        money = f"{amount} {self.inp.currency}"
        try:
            result = await workflow.execute_activity_method(
                PaymentActivities.refund_payment,
                RefundRequest(
                    idempotency_key=key,
                    order_no=self.inp.order_no,
                    original_key=p.key,
                    amount=amount,
                    currency=self.inp.currency,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=business_retry() if self.hardened else None,
                summary=f"refund {money}" + (f" ({why})" if self.hardened else ""),
            )
        except ActivityError as err:
            # never a failed workflow (older instances too: this path had no commands after it)
            await self._settle_by_hand(
                f"refund {money} of payment {p.key} by hand ({why}): {cause_of(err)}"
            )
            return
        self.payments.append(
            PaymentView(
                key=key,
                kind="refund",
                amount=amount,
                provider_ref=result.provider_ref,
                original_key=p.key,
            )
        )
        self.rt.audit(
            SYSTEM_ACTOR, "payment_refunded", f"{money} ({why})", {"idempotency_key": key}
        )

    async def _settle_by_hand(self, what: str) -> None:
        """Money the process cannot move itself: a finance task, and the stage says so."""
        self.rt.audit(SYSTEM_ACTOR, "needs_attention", what)
        task = self.open_task(
            name=what[:200],
            kind="settlement",
            roles=["finance"],
            outcomes=[SETTLED],
            times=self.policy.approval_timers.task_times(),
            required_fields={SETTLED: ["comment"]},
            four_eyes=False,
        )
        task.deadline_at = None  # settled by a person, never timed out
        self.settlements.append(task)
        await self.set_stage(Stage.NEEDS_ATTENTION, what)

    async def before_end(self) -> None:
        """Wait (not interruptible: the process is ending) until finance settled by hand."""
        while any(t.is_open for t in self.settlements):
            await self.wait(
                lambda: all(not t.is_open for t in self.settlements),
                "finance to settle money by hand",
                interruptible=False,
            )

    async def _refund_excess(self) -> None:
        """Money received beyond the amount due goes back (or, by policy, to a finance task)."""
        excess = -self._balance()
        if excess <= 0:
            return
        if self.policy.overpayment == "finance_task":
            await self._settle_by_hand(f"overpayment of {excess} {self.inp.currency}")
            return
        for p in reversed([p for p in self.payments if p.kind == "incoming"]):
            amount = min(excess, self._refundable(p))
            if amount <= 0:
                continue
            n = sum(1 for r in self.payments if r.kind == "refund") + 1
            await self._refund(p, amount, f"{self.rt.workflow_id}:refund-excess:{n}", "overpayment")
            excess -= amount
            if excess <= 0:
                break

    # ================================================================== kernel hooks
    def interrupted(self) -> bool:
        return self.cancel_request is not None

    def checkpoint(self) -> None:
        if self.cancel_request is not None:
            actor, reason = self.cancel_request.actor.username, self.cancel_request.reason
            raise Stop(Stage.CANCELLED, f"cancelled by {actor}: {reason}")

    def label(self) -> str:
        return f"order {self.inp.order_no}"

    def summary(self) -> dict[str, Any]:
        c = self.inp.customer
        return {
            "customer_id": c.id,
            "customer_name": c.company_name,
            "amount": str(self.amount_due),
            "currency": self.inp.currency,
            "special_change": bool(self.amendments),
        }

    def task_mail_body(self, t: HumanTask) -> str:
        return (
            f"Task {t.task_id} '{t.name}' for order {self.inp.order_no} "
            f"({self.amount_due} {self.inp.currency}) waits for {t.who_may_act()}."
        )

    def stage_changed(self, stage: str, note: str) -> None:
        self._stage_record(stage, special_change=bool(self.amendments))

    def _stage_record(self, stage: str, special_change: bool) -> None:
        """Today's StageChange, still read by the read model beside the InstanceRecord."""
        self.rt.stage = StageChange(
            order_no=self.inp.order_no,
            stage=stage,
            revision=len(self.stages),
            special_change=special_change,
            at=workflow.now(),
        )

    async def stage_mail(self, stage: str, note: str) -> None:
        words = stage.replace("_", " ")
        await self._notify_customer(
            f"Order {self.inp.order_no}: {words}",
            f"Dear {self.inp.customer.company_name},\n\nyour order {self.inp.order_no} is "
            f"now '{words}'." + (f"\n{note}" if note else ""),
            key=f"stage:{len(self.stages)}:{stage}",
        )

    async def _notify_customer(self, subject: str, body: str, key: str | None = None) -> None:
        key = key or f"customer:{self.rt.audit_count}"
        await self.notify(key, subject, body, to_emails=[self.inp.customer.email])

    # ================================================================== derived values
    def _installment_amount(self, index: int) -> Decimal:
        shares = [_money(self.amount_due * p / Decimal(100)) for p in self.inp.installments]
        shares[-1] = self.amount_due - sum(shares[:-1], Decimal(0))  # rounding goes to the last
        return shares[index]

    def _paid(self) -> Decimal:
        return _money(sum((p.amount for p in self.payments if p.kind != "refund"), Decimal(0)))

    def _refunded(self) -> Decimal:
        return _money(sum((p.amount for p in self.payments if p.kind == "refund"), Decimal(0)))

    def _net_paid(self) -> Decimal:
        return self._paid() - self._refunded()

    def _due(self) -> Decimal:
        return Decimal(0) if self.stopped else self.amount_due

    def _balance(self) -> Decimal:
        return self._due() - self._net_paid()

    def _line_records(self) -> list[OrderLineRecord]:
        return [
            OrderLineRecord(
                line_no=i + 1,
                sku=x.sku,
                description=x.description,
                quantity=x.quantity,
                unit_price=x.unit_price,
            )
            for i, x in enumerate(self.inp.lines)
        ]

    # ================================================================== handlers
    @workflow.query
    def status(self) -> SalesOrderStatus:
        """The order's live status: stage, pending tasks with who may act, decisions, policy."""
        return SalesOrderStatus(
            **self.status_fields(),
            order_no=self.inp.order_no,
            variant=self.inp.variant,
            customer_id=self.inp.customer.id,
            currency=self.inp.currency,
            amount=self.amount,
            amount_due=self.amount_due,
            paid=self._paid(),
            refunded=self._refunded(),
            due=self._due(),
            balance=self._balance(),
            special_change=bool(self.amendments),
            amendments=list(self.amendments),
            payments=list(self.payments),
            tracking_no=self.tracking_no,
            invoice_no=self.invoice_no,
        )

    # the SDK's update descriptor is invariant in its owner: the narrower return is on purpose
    @workflow.update
    async def settle(self) -> SalesOrderStatus:  # type: ignore[override]
        """Return the status once the instance has processed everything received so far."""
        await self.settled_now()
        return self.status()

    @workflow.update
    async def amend(self, inp: AmendInput) -> SalesOrderStatus:
        """A special change: flag the order; each notified department must acknowledge it."""
        n = len(self.amendments) + 1
        self.amendments.append(inp.description)
        self.rt.audit(inp.actor.username, "special_change", inp.description)
        tasks = [
            self.open_task(
                name=f"acknowledge special change #{n} ({role})",
                kind="acknowledgement",
                roles=[role],
                outcomes=[ACKNOWLEDGED],
                times=self.policy.acknowledgement_timers.task_times(),
            )
            for role in self.policy.special_change_roles
        ]
        self.ack_tasks.extend(tasks)
        self.special_changes.append(tasks)
        self._stage_record(self.stage, special_change=True)
        self.project_instance()
        ticket = self.rt.changed()
        await self.rt.handler_flush()
        await self.notify_candidates(
            tasks, f"SPECIAL CHANGE on order {self.inp.order_no}: acknowledge before it proceeds"
        )
        await self.rt.settled(ticket)
        return self.status()

    @amend.validator
    def _validate_amend(self, inp: AmendInput) -> None:
        self._refuse_if_shipped("changed")
        still_open = sum(1 for ts in self.special_changes if any(t.is_open for t in ts))
        if still_open >= self.policy.max_open_special_changes:
            raise refuse(
                CONFLICT,
                f"{still_open} special changes wait for acknowledgement; the policy allows "
                f"{self.policy.max_open_special_changes} at once",
            )
        if inp.actor.username != self.inp.requester and not AMEND_ROLES & set(inp.actor.roles):
            raise refuse(
                NOT_PERMITTED, "only the requester, sales or a manager may change an order"
            )

    @workflow.update
    async def cancel(self, inp: CancelInput) -> SalesOrderStatus:
        """The requester or a manager cancels the order; what was done is compensated."""
        self.cancel_request = inp
        self.rt.audit(inp.actor.username, "cancel_requested", inp.reason)
        await self.settled_now()
        await workflow.wait_condition(lambda: self.rt.done or self.stage == Stage.NEEDS_ATTENTION)
        return self.status()

    @cancel.validator
    def _validate_cancel(self, inp: CancelInput) -> None:
        self._refuse_if_shipped("cancelled")
        if self.cancel_request is not None:
            raise refuse(CONFLICT, "the order is already being cancelled")
        if inp.actor.username != self.inp.requester and not CANCEL_ROLES & set(inp.actor.roles):
            raise refuse(NOT_PERMITTED, "only the requester or a manager may cancel an order")

    @workflow.signal(unfinished_policy=workflow.HandlerUnfinishedPolicy.ABANDON)
    async def payment_received(self, event: PaymentEvent) -> None:
        """The provider reports a payment; a redelivered event id changes nothing (instances
        started before 2026-12 are told through this signal; newer callers use `pay`)."""
        if event.event_id in self.seen_payment_events or self.rt.done:
            return
        await self._receive_payment(event)

    @workflow.update
    async def pay(self, event: PaymentEvent) -> PaymentOutcome:
        """The provider reports a payment; refused (Conflict) when the event belongs to another
        order or was reported with another amount; its money then counts nowhere."""
        refusal = await self._receive_payment(event)
        if refusal:
            raise refuse(CONFLICT, refusal)
        return PaymentOutcome(
            event_id=event.event_id,
            paid=self._paid(),
            refunded=self._refunded(),
            balance=self._balance(),
        )

    @pay.validator
    def _validate_pay(self, event: PaymentEvent) -> None:
        self.refuse_if_ended()
        known = self.seen_payment_events.get(event.event_id)
        if known is not None and known != event.amount:
            raise refuse(
                CONFLICT,
                f"payment event {event.event_id} was reported with {known} "
                f"{self.inp.currency}, not {event.amount}",
            )
        if known is not None:  # redelivery: nothing to do, nothing written to history
            raise refuse(DUPLICATE_EVENT, f"payment event {event.event_id} is already recorded")

    async def _receive_payment(self, event: PaymentEvent) -> str:
        """Book a reported payment in the ledger; returns why it was refused ('' if booked)."""
        self.seen_payment_events[event.event_id] = event.amount
        async with self.rt.event():
            key = f"incoming:{event.event_id}"
            try:
                result = await workflow.execute_activity_method(
                    PaymentActivities.record_incoming_payment,
                    IncomingPayment(
                        event_id=event.event_id,
                        order_no=self.inp.order_no,
                        amount=event.amount,
                        currency=self.inp.currency,
                    ),
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=business_retry() if self.hardened else None,
                    summary=f"record incoming payment {event.amount} {self.inp.currency}",
                )
            except ActivityError as err:
                cause = err.cause
                if not (
                    isinstance(cause, ApplicationError) and cause.type == PAYMENT_EVENT_CONFLICT
                ):
                    raise
                del self.seen_payment_events[event.event_id]  # it is not this order's
                refused = {"event_id": event.event_id}
                self.rt.audit("provider", "payment_refused", cause.message, refused)
                return cause.message
            if any(p.key == key for p in self.payments):
                return ""
            self.payments.append(
                PaymentView(
                    key=key, kind="incoming", amount=result.amount, provider_ref=result.provider_ref
                )
            )
            self.rt.audit(
                "provider",
                "payment_received",
                f"{result.amount} {self.inp.currency}",
                {"event_id": event.event_id},
            )
            if self.hardened and not self.stopped and self.cancel_request is None:
                await self._refund_excess()
        return ""

    def _refuse_if_shipped(self, what: str) -> None:
        if self.stage in SHIPPED_OR_LATER or self.rt.done:
            raise refuse(NOT_CANCELLABLE, f"the order is {self.stage} and can no longer be {what}")
