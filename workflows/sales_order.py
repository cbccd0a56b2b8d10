"""Sales order (order to cash): validated -> approval chain -> payment -> stock -> shipment ->
invoice -> closed, with prepaid variants, installments, special changes and compensation.

Public contract (used by the API): the models below, `sales_order_workflow_id`,
`input_fingerprint`, and the handler names of `SalesOrderWorkflow`:
updates `settle`, `decide`, `claim`, `release`, `delegate`, `reassign`, `amend`, `cancel`,
`pay`; signal `payment_received`; query `status`. The money (ledger, `pay`, captures, refunds,
payment gates, settlement by hand) is the block of workflows/money.py, the rest the kernel's.
"""

from __future__ import annotations

import unicodedata
from datetime import timedelta
from decimal import Decimal
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
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from email_validator import EmailNotValidError, validate_email

    from activities.models import (
        InvoiceRequest,
        OrderLineRecord,
        OrderRecord,
        ShipmentRequest,
        StageChange,
        StockRequest,
    )
    from activities.warehouse import WarehouseActivities
    from core.temporal import AMOUNT, CUSTOMER_ID
    from core.temporal import PROCESS_TYPE as PROCESS_TYPE_SA

from workflows.approval import APPROVED, approval_chain
from workflows.errors import CONFLICT, NOT_PERMITTED, refuse
from workflows.errors import DUPLICATE_EVENT as DUPLICATE_EVENT
from workflows.errors import NOT_CANCELLABLE as NOT_CANCELLABLE
from workflows.human_task import MANAGER_ROLE, TIMED_OUT, WITHDRAWN, Actor, HumanTask, TaskTimes
from workflows.kernel import HARDENING as HARDENING
from workflows.kernel import CancelInput as CancelInput
from workflows.kernel import DecideResult as DecideResult
from workflows.kernel import DecisionRecord as DecisionRecord
from workflows.kernel import StageEntry as StageEntry
from workflows.kernel import Stop, cause_of
from workflows.kernel import TaskView as TaskView
from workflows.kernel import input_fingerprint as input_fingerprint
from workflows.money import MAX_AMOUNT as MAX_AMOUNT
from workflows.money import SETTLED as SETTLED
from workflows.money import Ledger, MoneyCarry, MoneyProcess, MoneyStatus, Overpayment, money
from workflows.money import PaymentEvent as PaymentEvent
from workflows.money import PaymentOutcome as PaymentOutcome
from workflows.money import PaymentView as PaymentView
from workflows.policy import SalesOrderPolicy

PROCESS_TYPE = "sales_order"
# one spelling everywhere: ProcessType, policy type, workflow ids ("sales_order-1001")
WORKFLOW_ID_PREFIX = f"{PROCESS_TYPE}-"
# instances started before 2026-12 are "sales-order-<no>"; the API finds them by the read model
LEGACY_WORKFLOW_ID_PREFIX = "sales-order-"
# memo key holding the fingerprint of the input that started an instance
MEMO_FINGERPRINT = "input_fingerprint"
ACKNOWLEDGED = "acknowledged"
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


class AmendInput(BaseModel):
    description: str = Field(min_length=1, max_length=2000)
    actor: Actor


class SalesOrderStatus(MoneyStatus):
    order_no: str
    stage: Stage
    variant: Variant
    customer_id: str
    amount: Decimal
    special_change: bool
    amendments: list[str]
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


class SalesOrderCarry(MoneyCarry):
    """Everything an instance carries into its next run when it continues as new: the kernel's
    part (tasks with their absolute due times, stages, steps done), money (the ledger's part),
    its pinned policy and how far the process map got."""

    policy: dict
    amendments: list[str]
    ack_tasks: list[str]
    special_changes: list[list[str]]
    levels_done: int
    stock_reserved: bool = False
    tracking_no: str | None = None
    invoice_no: str | None = None


SalesOrderInput.model_rebuild()


def sales_order_workflow_id(order_no: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{order_no}"


def amount_of(lines: list[OrderLine]) -> Decimal:
    return money(sum((line.quantity * line.unit_price for line in lines), Decimal(0)))


@workflow.defn
class SalesOrderWorkflow(MoneyProcess):
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
    CANCELLED_STAGE = Stage.CANCELLED
    CANCEL_ROLES = CANCEL_ROLES
    AWAITING_PAYMENT_STAGE = Stage.AWAITING_PAYMENT
    ATTENTION_STAGE = Stage.NEEDS_ATTENTION

    @workflow.init
    def __init__(self, inp: SalesOrderInput) -> None:
        self.inp = inp
        self.policy = SalesOrderPolicy()
        self.amount = amount_of(inp.lines)
        self.amendments: list[str] = []
        super().__init__(
            ledger=Ledger(inp.currency, self.amount),
            business_key=inp.order_no,
            requester=inp.requester,
            initial_stage=Stage.RECEIVED,
            carry=inp.carry,
        )
        self.ack_tasks: list[HumanTask] = []
        self.tracking_no: str | None = None
        self.invoice_no: str | None = None
        self.stock_reserved = False
        self.special_changes: list[list[HumanTask]] = []  # the acknowledgements of each change
        self.levels_done = 0
        if inp.carry is not None:
            self._restore(inp.carry)

    def _restore(self, c: SalesOrderCarry) -> None:
        self.policy = SalesOrderPolicy.model_validate(c.policy)
        self.rt.board.max_actions = self.policy.max_actions_per_task
        self.restore_money(c)
        self.amendments = list(c.amendments)
        tasks = self.rt.board.tasks
        self.ack_tasks = [tasks[t] for t in c.ack_tasks]
        self.special_changes = [[tasks[t] for t in ts] for ts in c.special_changes]
        self.levels_done = c.levels_done
        self.stock_reserved = c.stock_reserved
        self.tracking_no = c.tracking_no
        self.invoice_no = c.invoice_no

    def next_run_input(self, carry: dict[str, Any]) -> SalesOrderInput:
        own = SalesOrderCarry(
            **carry,
            **self.money_carry(),
            policy=self.policy.model_dump(mode="json"),
            amendments=self.amendments,
            ack_tasks=[t.task_id for t in self.ack_tasks],
            special_changes=[[t.task_id for t in ts] for ts in self.special_changes],
            levels_done=self.levels_done,
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
        await self.handlers_finished()
        ledger = self.ledger
        return SalesOrderResult(
            order_no=inp.order_no,
            stage=Stage(self.stage),
            amount_due=ledger.amount_due,
            paid=ledger.paid,
            refunded=ledger.refunded,
            balance=ledger.balance,
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
            self.ledger.amount_due = money(self.amount * factor)

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
            amount = min(amount, target - self.ledger.net_paid)
        if amount <= 0:
            return
        await self.set_stage(Stage.PAYMENT)
        n, what = len(self.inp.installments), self.ledger.text(amount)
        try:
            await self.capture(
                f"installment-{index + 1}",
                amount,
                self.inp.customer.id,
                f"capture installment {index + 1} of {n}: {what}",
            )
        except ActivityError as err:
            raise Stop(Stage.CANCELLED, f"payment failed: {cause_of(err)}") from err
        await self.set_stage(Stage.PAID)

    async def _await_payment(self, needed: Decimal, what: str) -> None:
        """Prepaid gate: wait until the provider reported `needed` in total, or the deadline."""
        if not await self.await_payment(needed, what, self.policy.payment_timers().task_times()):
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
        self.ledger.stopped = True
        await self.rt.quiesce()  # a payment being recorded right now is refunded too
        for t in self.rt.board.open_tasks():
            self.close_task(t, WITHDRAWN, comment="process ended")
        if not self.rt.batched:  # newer instances write it before an activity or at the end
            await self.rt.flush()
        if self.stock_reserved:
            await self.rt.before_activity()
            await workflow.execute_activity_method(
                WarehouseActivities.release_stock,
                StockRequest(order_no=self.inp.order_no, lines=self._line_records()),
                start_to_close_timeout=timedelta(seconds=60),
                summary="release reserved stock",
            )
            self.stock_reserved = False
        await self.refund_all("compensation")

    # ================================================================== kernel hooks
    def cancel_reason(self, request: CancelInput) -> str:
        # the kernel's `interrupted` / `checkpoint` end a cancelled order with this reason
        return f"cancelled by {request.actor.username}: {request.reason}"

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

    async def ask_for_payment(self, needed: Decimal, what: str) -> None:
        no, text = self.inp.order_no, self.ledger.text(needed)
        await self._notify_customer(
            f"Order {no}: payment of {text} expected", f"Please pay {text} ({what}) for order {no}."
        )

    def overpayment(self) -> Overpayment:
        return self.policy.overpayment

    def settlement_times(self) -> TaskTimes:
        return self.policy.approval_timers.task_times()

    # ================================================================== derived values
    def _installment_amount(self, index: int) -> Decimal:
        shares = [money(self.amount_due * p / Decimal(100)) for p in self.inp.installments]
        shares[-1] = self.amount_due - sum(shares[:-1], Decimal(0))  # rounding goes to the last
        return shares[index]

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
            amount=self.amount,
            special_change=bool(self.amendments),
            amendments=list(self.amendments),
            tracking_no=self.tracking_no,
            invoice_no=self.invoice_no,
        )

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

    # its own `cancel` (not the kernel's): it answers once compensated or needing attention,
    # and refuses once shipped; the SDK's update descriptor is invariant in its owner
    @workflow.update
    async def cancel(self, inp: CancelInput) -> SalesOrderStatus:  # type: ignore[override]
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
        if not self.may_cancel(inp.actor):
            raise refuse(NOT_PERMITTED, "only the requester or a manager may cancel an order")

    def _refuse_if_shipped(self, what: str) -> None:
        if self.stage in SHIPPED_OR_LATER or self.rt.done:
            raise refuse(NOT_CANCELLABLE, f"the order is {self.stage} and can no longer be {what}")
