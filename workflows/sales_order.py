"""Sales order (order to cash): validated -> approval chain -> payment -> stock -> shipment ->
invoice -> closed, with prepaid variants, installments, special changes and compensation.

Public contract (used by the API): the models below, `sales_order_workflow_id`,
`input_fingerprint`, and the handler names of `SalesOrderWorkflow`:
updates `settle`, `decide`, `claim`, `release`, `delegate`, `reassign`, `amend`, `cancel`;
signal `payment_received`; query `status`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from email_validator import EmailNotValidError, validate_email

from workflows.human_task import (
    Actor,
    DecideInput,
    TaskActionInput,
    TaskEvent,
)
from workflows.runtime import RuntimeCarry

PROCESS_TYPE = "sales_order"
# one spelling everywhere: ProcessType, policy type, workflow ids ("sales_order-1001")
WORKFLOW_ID_PREFIX = f"{PROCESS_TYPE}-"
# instances started before 2026-12 are "sales-order-<no>"; the API finds them by the read model
LEGACY_WORKFLOW_ID_PREFIX = "sales-order-"
# memo key holding the fingerprint of the input that started an instance
MEMO_FINGERPRINT = "input_fingerprint"
ACKNOWLEDGED = "acknowledged"


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


VIEW_HISTORY = 10


class TaskView(BaseModel):
    task_id: str
    name: str
    kind: str
    candidate_roles: list[str]
    assignee: str | None
    outcomes: list[str]
    required_fields: dict[str, list[str]]
    status: str
    outcome: str | None
    decided_by: str | None
    comment: str
    created_at: datetime
    due_at: datetime | None
    deadline_at: datetime | None
    escalated: bool
    history: list[TaskEvent] = Field(description=f"the newest {VIEW_HISTORY} events")
    history_total: int = Field(0, description="events in the task's whole life")


class DecisionRecord(BaseModel):
    task_id: str
    name: str
    outcome: str
    actor: str
    comment: str
    at: datetime


class StageEntry(BaseModel):
    stage: Stage
    at: datetime
    note: str = ""


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


class SalesOrderStatus(BaseModel):
    order_no: str
    workflow_id: str
    stage: Stage
    variant: Variant
    requester: str
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
    policy_version: int
    special_change: bool
    amendments: list[str]
    waiting_for: str
    pending_tasks: list[TaskView]
    decisions: list[DecisionRecord]
    stages: list[StageEntry]
    payments: list[PaymentView]
    outcome_reason: str = ""
    tracking_no: str | None = None
    invoice_no: str | None = None
    settled: bool = Field(
        True, description="the instance has acted on everything it received and waits again"
    )


class DecideResult(BaseModel):
    task: TaskView
    stage: Stage


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


class SalesOrderCarry(BaseModel):
    """Everything an instance carries into its next run when it continues as new: its pinned
    policy, money, tasks (with their absolute due times), and how far the process map got."""

    policy: dict
    policy_version: int
    amount_due: Decimal
    stage: Stage
    stages: list[StageEntry]
    payments: list[PaymentView]
    seen_payment_events: dict[str, Decimal]
    amendments: list[str]
    runtime: RuntimeCarry
    ack_tasks: list[str]
    special_changes: list[list[str]]
    settlements: list[str]
    slots: dict[str, list[str]]
    levels_done: int
    done_steps: list[str]
    finishing: tuple[Stage, str] | None = None
    stopped: bool = False
    stock_reserved: bool = False
    outcome_reason: str = ""
    tracking_no: str | None = None
    invoice_no: str | None = None
    runs: int = Field(1, description="runs of this instance so far")


SalesOrderInput.model_rebuild()


def sales_order_workflow_id(order_no: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{order_no}"


def input_fingerprint(inp: SalesOrderInput) -> str:
    """Stable hash of a start request, to tell a client retry from a conflicting reuse."""
    canonical = json.dumps(
        inp.model_dump(mode="json", exclude={"carry"}), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def amount_of(lines: list[OrderLine]) -> Decimal:
    return _money(sum((line.quantity * line.unit_price for line in lines), Decimal(0)))


with workflow.unsafe.imports_passed_through():
    from activities.models import (
        NON_RETRYABLE_ERRORS,
        PAYMENT_EVENT_CONFLICT,
        IncomingPayment,
        InvoiceRequest,
        Notification,
        OrderLineRecord,
        OrderRecord,
        PaymentRequest,
        PaymentResult,
        PolicyDocument,
        PolicyRequest,
        RefundRequest,
        ShipmentRequest,
        StageChange,
        StockRequest,
    )
    from core.temporal import AMOUNT, CUSTOMER_ID
    from core.temporal import PROCESS_TYPE as PROCESS_TYPE_SA
    from core.temporal import STAGE as STAGE_SA

from workflows.approval import (  # noqa: E402
    APPROVAL_OUTCOMES,
    APPROVAL_REQUIRED_FIELDS,
    APPROVED,
    ApprovalLevel,
    approval_chain,
    level_outcome,
)
from workflows.human_task import (  # noqa: E402
    CONFLICT,
    MANAGER_ROLE,
    NOT_PERMITTED,
    SYSTEM_ACTOR,
    TIMED_OUT,
    WITHDRAWN,
    HumanTask,
)
from workflows.policy import SalesOrderPolicy, TaskTimers  # noqa: E402
from workflows.runtime import ProcessRuntime, Stop  # noqa: E402

NOT_CANCELLABLE = "NotCancellable"
# a provider event reported again with the same amount: nothing to do (the API answers 202)
DUPLICATE_EVENT = "DuplicateEvent"
# Since 2026-12: money by the ledger (a capture takes only what is still due, overpayments are
# refunded, a refused refund opens a finance task instead of failing the workflow), strict
# authority on tasks and a cap on task actions. Older instances keep their commands.
HARDENING = "hardening-2026-12"
SETTLED = "settled"
CANCEL_ROLES = frozenset({MANAGER_ROLE})
AMEND_ROLES = frozenset({"sales", MANAGER_ROLE})


def _retry() -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=1),
        maximum_interval=timedelta(seconds=30),
        non_retryable_error_types=NON_RETRYABLE_ERRORS,
    )


def _cause(err: ActivityError) -> str:
    cause = err.cause
    return str(cause.message if isinstance(cause, ApplicationError) else cause or err)


@workflow.defn
class SalesOrderWorkflow:
    """One sales order from receipt to closing; its timers, tasks and payments."""

    @workflow.init
    def __init__(self, inp: SalesOrderInput) -> None:
        self.inp = inp
        self.rt = ProcessRuntime(
            workflow_id=workflow.info().workflow_id,
            process_type=PROCESS_TYPE,
            business_key=inp.order_no,
            requester=inp.requester,
        )
        self.policy = SalesOrderPolicy()
        self.policy_version = 0
        self.amount = amount_of(inp.lines)
        self.amount_due = self.amount
        self.stage = Stage.RECEIVED
        self.stages: list[StageEntry] = [StageEntry(stage=Stage.RECEIVED, at=workflow.now())]
        self.payments: list[PaymentView] = []
        self.seen_payment_events: dict[str, Decimal] = {}  # event id -> amount reported
        self.amendments: list[str] = []
        self.ack_tasks: list[HumanTask] = []
        self.cancel_request: CancelInput | None = None
        self.outcome_reason = ""
        self.tracking_no: str | None = None
        self.invoice_no: str | None = None
        self.stock_reserved = False
        self.special_changes: list[list[HumanTask]] = []  # the acknowledgements of each change
        self.settlements: list[HumanTask] = []  # finance tasks for money to settle by hand
        self.stopped = False  # rejected, cancelled or failed: nothing is due any more
        self.hardened = workflow.patched(HARDENING)
        self.rt.board.strict = self.hardened
        self.slots: dict[str, list[str]] = {}  # where the map opened tasks: reused on resume
        self.levels_done = 0
        self.done_steps: list[str] = []
        self.finishing: tuple[Stage, str] | None = None
        self.runs = 1
        if self.hardened:
            self.rt.continue_as_new = self._continue_as_new
        if inp.carry is not None:
            self._restore(inp.carry)

    def _restore(self, c: SalesOrderCarry) -> None:
        self.policy = SalesOrderPolicy.model_validate(c.policy)
        self.policy_version = c.policy_version
        self.rt.board.max_actions = self.policy.max_actions_per_task
        self.amount_due = c.amount_due
        self.stage = c.stage
        self.stages = list(c.stages)
        self.payments = list(c.payments)
        self.seen_payment_events = dict(c.seen_payment_events)
        self.amendments = list(c.amendments)
        self.rt.restore(c.runtime)
        tasks = self.rt.board.tasks
        self.ack_tasks = [tasks[t] for t in c.ack_tasks]
        self.special_changes = [[tasks[t] for t in ts] for ts in c.special_changes]
        self.settlements = [tasks[t] for t in c.settlements]
        self.slots = {k: list(v) for k, v in c.slots.items()}
        self.levels_done = c.levels_done
        self.done_steps = list(c.done_steps)
        self.finishing = c.finishing
        self.stopped = c.stopped
        self.stock_reserved = c.stock_reserved
        self.outcome_reason = c.outcome_reason
        self.tracking_no = c.tracking_no
        self.invoice_no = c.invoice_no
        self.runs = c.runs + 1

    async def _continue_as_new(self) -> None:
        """Continue in a new run with everything the instance carries (history stays bounded)."""
        carry = SalesOrderCarry(
            policy=self.policy.model_dump(mode="json"),
            policy_version=self.policy_version,
            amount_due=self.amount_due,
            stage=self.stage,
            stages=self.stages,
            payments=self.payments,
            seen_payment_events=self.seen_payment_events,
            amendments=self.amendments,
            runtime=self.rt.carry(),
            ack_tasks=[t.task_id for t in self.ack_tasks],
            special_changes=[[t.task_id for t in ts] for ts in self.special_changes],
            settlements=[t.task_id for t in self.settlements],
            slots=self.slots,
            levels_done=self.levels_done,
            done_steps=self.done_steps,
            finishing=self.finishing,
            stopped=self.stopped,
            stock_reserved=self.stock_reserved,
            outcome_reason=self.outcome_reason,
            tracking_no=self.tracking_no,
            invoice_no=self.invoice_no,
            runs=self.runs,
        )
        workflow.logger.info("continuing as new (run %s)", self.runs + 1)
        workflow.continue_as_new(self.inp.model_copy(update={"carry": carry}))

    # ================================================================== the process map
    @workflow.run
    async def run(self, inp: SalesOrderInput) -> SalesOrderResult:
        if inp.carry is None:
            await self._load_policy()
            self._apply_discount()
            await self._record_order()
            await self._set_stage(Stage.VALIDATED)
        if self.finishing is not None:  # continued as new while ending
            await self._finish(*self.finishing)
        else:
            await self._process_map(inp)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return SalesOrderResult(
            order_no=inp.order_no,
            stage=self.stage,
            amount_due=self.amount_due,
            paid=self._paid(),
            refunded=self._refunded(),
            balance=self._balance(),
            reason=self.outcome_reason,
            tracking_no=self.tracking_no,
            invoice_no=self.invoice_no,
        )

    async def _process_map(self, inp: SalesOrderInput) -> None:
        step = self._step
        try:
            if inp.variant == "prepaid_entry":
                await step(
                    "entry-gate",
                    self._await_payment,
                    self._installment_amount(0),
                    "advance payment",
                )
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
            await self._finish(Stage.CLOSED, "order closed")
        except Stop as stop:
            await self._compensate()
            await self._finish(stop.stage, stop.reason)

    async def _step(self, name: str, fn, *args) -> None:
        """Run a step of the map once: a run continued as new skips the steps done before."""
        if name in self.done_steps:
            return
        await fn(*args)
        self.done_steps.append(name)

    # ================================================================== steps
    async def _load_policy(self) -> None:
        doc: PolicyDocument = await self.rt.bookkeeping(
            "load_policy",
            PolicyRequest(process_type=PROCESS_TYPE),
            result_type=PolicyDocument,
            summary="load the current sales order policy",
        )
        if doc.version > 0:
            try:
                self.policy = SalesOrderPolicy.model_validate(doc.document)
            except ValidationError as err:
                # a version stored before today's checks that breaks them: never a workflow
                # task failing forever; the built-in defaults instead, and the audit says why
                self.rt.audit(
                    SYSTEM_ACTOR,
                    "policy_invalid",
                    f"policy version {doc.version} breaks today's checks; built-in defaults "
                    f"used: {err.error_count()} error(s), first at "
                    f"{'.'.join(map(str, err.errors()[0]['loc']))}",
                )
                doc = doc.model_copy(update={"version": 0})
        self.policy_version = doc.version
        if self.hardened:
            self.rt.board.max_actions = self.policy.max_actions_per_task

    def _apply_discount(self) -> None:
        if self.inp.loyalty_discount:
            factor = (Decimal(100) - self.policy.loyalty_discount_pct) / Decimal(100)
            self.amount_due = (self.amount * factor).quantize(
                Decimal("0.01"), rounding=ROUND_HALF_UP
            )

    def _needs_approval(self) -> bool:
        prepaid = self.inp.variant != "standard"
        return not (prepaid and self.policy.prepaid_exempt_from_approval) and bool(
            approval_chain(self.policy.approval_tiers, self.amount_due)
        )

    async def _record_order(self) -> None:
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
            lines=[
                OrderLineRecord(
                    line_no=i + 1,
                    sku=line.sku,
                    description=line.description,
                    quantity=line.quantity,
                    unit_price=line.unit_price,
                )
                for i, line in enumerate(self.inp.lines)
            ],
        )
        self.rt.upsert(
            PROCESS_TYPE_SA.value_set(PROCESS_TYPE),
            CUSTOMER_ID.value_set(c.id),
            AMOUNT.value_set(float(self.amount_due)),
        )

    async def _approval_chain(self) -> None:
        await self._set_stage(Stage.APPROVAL)
        for index, level in enumerate(approval_chain(self.policy.approval_tiers, self.amount_due)):
            if index < self.levels_done:
                continue
            outcome = await self._approval_level(level, f"level:{index}")
            if outcome == TIMED_OUT:
                raise Stop(Stage.CANCELLED, f"{level.name} was not decided in time")
            if outcome != APPROVED:
                raise Stop(Stage.REJECTED, f"{level.name}: rejected")
            self.levels_done = index + 1

    async def _approval_level(self, level: ApprovalLevel, slot: str) -> str:
        tasks = self._slot(slot)
        if not tasks:  # a run continued as new finds the level's tasks open already
            tasks = self._open_level(level, slot)
            await self._notify_candidates(tasks, f"Approval needed: order {self.inp.order_no}")
        await self._wait(lambda: level_outcome(level, tasks) is not None, f"{level.name}")
        outcome = level_outcome(level, tasks)
        assert outcome is not None
        # close what the quorum made unnecessary (k-of-n, or a rejection in an all-of level)
        for t in tasks:
            if t.is_open:
                self.rt.board.close(
                    t, WITHDRAWN, SYSTEM_ACTOR, workflow.now(), comment=f"level {outcome}"
                )
                self.rt.task_changed(t)
        if not self.rt.local:  # newer instances write it with the next step's projection
            await self.rt.flush()
        return outcome

    def _open_level(self, level: ApprovalLevel, slot: str) -> list[HumanTask]:
        tasks = [
            self._open_task(
                name=level.name if len(level.task_roles()) == 1 else f"{level.name} ({roles[0]})",
                kind="approval",
                roles=roles,
                outcomes=APPROVAL_OUTCOMES,
                timers=self.policy.approval_timers,
                required_fields=APPROVAL_REQUIRED_FIELDS,
            )
            for roles in level.task_roles()
        ]
        self.slots[slot] = [t.task_id for t in tasks]
        return tasks

    def _slot(self, slot: str) -> list[HumanTask]:
        """Tasks this step opened in an earlier run (continue-as-new), if any."""
        return [self.rt.board.tasks[t] for t in self.slots.get(slot, [])]

    async def _capture_installment(self, index: int) -> None:
        amount = self._installment_amount(index)
        if self.hardened:  # only what is still due after this installment (the ledger says)
            target = sum((self._installment_amount(i) for i in range(index + 1)), Decimal(0))
            amount = min(amount, target - self._net_paid())
        if amount <= 0:
            return
        await self._set_stage(Stage.PAYMENT)
        n = len(self.inp.installments)
        key = f"{self.rt.workflow_id}:installment-{index + 1}"
        try:
            result = await workflow.execute_activity(
                "capture_payment",
                PaymentRequest(
                    idempotency_key=key,
                    order_no=self.inp.order_no,
                    customer_id=self.inp.customer.id,
                    amount=amount,
                    currency=self.inp.currency,
                ),
                result_type=PaymentResult,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=_retry(),
                summary=f"capture installment {index + 1} of {n}: {amount} {self.inp.currency}",
            )
        except ActivityError as err:
            raise Stop(Stage.CANCELLED, f"payment failed: {_cause(err)}") from err
        self.payments.append(
            PaymentView(key=key, kind="charge", amount=amount, provider_ref=result.provider_ref)
        )
        self.rt.audit(
            SYSTEM_ACTOR,
            "payment_captured",
            f"{amount} {self.inp.currency}",
            {"idempotency_key": key},
        )
        await self._set_stage(Stage.PAID)

    async def _await_payment(self, needed: Decimal, what: str) -> None:
        """Prepaid gate: wait until the provider reported `needed` in total, or the deadline."""
        paid = self._net_paid if self.hardened else self._paid
        if paid() >= needed:
            return
        await self._set_stage(Stage.AWAITING_PAYMENT)
        slot = f"gate:{what}"
        if self._slot(slot):  # continued as new while waiting
            [task] = self._slot(slot)
            await self._wait(lambda: paid() >= needed or not task.is_open, what)
            await self._payment_gate_passed(task, what)
            return
        task = self._open_task(
            name=f"await {what}: {needed} {self.inp.currency}",
            kind="payment",
            roles=["finance"],
            outcomes=[],
            timers=self.policy.payment_timers(),
            four_eyes=False,
        )
        self.slots[slot] = [task.task_id]
        await self._notify_customer(
            f"Order {self.inp.order_no}: payment of {needed} {self.inp.currency} expected",
            f"Please pay {needed} {self.inp.currency} ({what}) for order {self.inp.order_no}.",
        )
        await self._wait(lambda: paid() >= needed or not task.is_open, what)
        await self._payment_gate_passed(task, what)

    async def _payment_gate_passed(self, task: HumanTask, what: str) -> None:
        if task.is_open:
            self.rt.board.close(task, "paid", SYSTEM_ACTOR, workflow.now())
            self.rt.task_changed(task)
            await self.rt.flush()
        elif task.outcome == TIMED_OUT:
            raise Stop(Stage.CANCELLED, f"{what} not received in time")

    async def _await_acknowledgements(self) -> None:
        """A special change holds the order until every notified department acknowledged it."""
        if not self.ack_tasks:
            return
        await self._wait(
            lambda: all(not t.is_open for t in self.ack_tasks),
            "acknowledgements of the special change",
        )
        late = [t for t in self.ack_tasks if t.outcome == TIMED_OUT]
        if late:
            raise Stop(Stage.CANCELLED, f"special change not acknowledged in time: {late[0].name}")

    async def _reserve_stock(self) -> None:
        await self._run_business_step(
            "reserve_stock",
            StockRequest(order_no=self.inp.order_no, lines=self._line_records()),
            "reserve stock",
        )
        self.stock_reserved = True
        await self._set_stage(Stage.STOCK_RESERVED)

    async def _settle_before_shipment(self) -> None:
        if self.inp.variant == "standard":
            for i in range(1, len(self.inp.installments)):
                await self._capture_installment(i)
        else:
            await self._await_payment(self.amount_due, "payment before shipment")

    async def _ship(self) -> None:
        result = await self._run_business_step(
            "ship_order", ShipmentRequest(order_no=self.inp.order_no), "ship the order"
        )
        self.tracking_no = result["tracking_no"]
        self.stock_reserved = False
        await self._set_stage(Stage.SHIPPED, f"tracking {self.tracking_no}")

    async def _invoice(self) -> None:
        result = await self._run_business_step(
            "issue_invoice",
            InvoiceRequest(
                order_no=self.inp.order_no, amount=self.amount_due, currency=self.inp.currency
            ),
            "issue the invoice",
        )
        self.invoice_no = result["invoice_no"]
        await self._set_stage(Stage.INVOICED, f"invoice {self.invoice_no}")

    async def _run_business_step(self, activity: str, arg: BaseModel, summary: str) -> dict:
        self._checkpoint()
        try:
            return await workflow.execute_activity(
                activity,
                arg,
                result_type=dict,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=_retry(),
                summary=summary,
            )
        except ActivityError as err:
            raise Stop(Stage.FAILED, f"{summary} failed: {_cause(err)}") from err

    # ================================================================== compensation and end
    async def _compensate(self) -> None:
        """Undo what the order did: withdraw open tasks, release stock, refund payments."""
        self.stopped = True
        await self.rt.quiesce()  # a payment being recorded right now is refunded too
        now = workflow.now()
        for t in self.rt.board.open_tasks():
            self.rt.board.close(t, WITHDRAWN, SYSTEM_ACTOR, now, comment="process ended")
            self.rt.task_changed(t)
        await self.rt.flush()
        if self.stock_reserved:
            await workflow.execute_activity(
                "release_stock",
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
        try:
            result = await workflow.execute_activity(
                "refund_payment",
                RefundRequest(
                    idempotency_key=key,
                    order_no=self.inp.order_no,
                    original_key=p.key,
                    amount=amount,
                    currency=self.inp.currency,
                ),
                result_type=dict,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=_retry() if self.hardened else None,
                summary=f"refund {amount} {self.inp.currency}"
                + (f" ({why})" if self.hardened else ""),
            )
        except ActivityError as err:
            # never a failed workflow (older instances too: this path had no commands after it)
            await self._settle_by_hand(
                f"refund {amount} {self.inp.currency} of payment {p.key} by hand "
                f"({why}): {_cause(err)}"
            )
            return
        self.payments.append(
            PaymentView(
                key=key,
                kind="refund",
                amount=amount,
                provider_ref=result["provider_ref"],
                original_key=p.key,
            )
        )
        self.rt.audit(
            SYSTEM_ACTOR,
            "payment_refunded",
            f"{amount} {self.inp.currency} ({why})",
            {"idempotency_key": key},
        )

    async def _settle_by_hand(self, what: str) -> None:
        """Money the process cannot move itself: a finance task, and the stage says so."""
        self.rt.audit(SYSTEM_ACTOR, "needs_attention", what)
        task = self._open_task(
            name=what[:200],
            kind="settlement",
            roles=["finance"],
            outcomes=[SETTLED],
            timers=TaskTimers(
                remind_after=self.policy.approval_timers.remind_after,
                escalate_after=self.policy.approval_timers.escalate_after,
                deadline=self.policy.approval_timers.deadline,
                escalation_role=self.policy.approval_timers.escalation_role,
            ),
            required_fields={SETTLED: ["comment"]},
            four_eyes=False,
        )
        task.deadline_at = None  # settled by a person, never timed out
        self.settlements.append(task)
        await self._set_stage(Stage.NEEDS_ATTENTION, what)

    async def _await_settlements(self) -> None:
        """Wait (not interruptible: the process is ending) until finance settled by hand."""
        while any(t.is_open for t in self.settlements):
            self.rt.waiting_for = "finance to settle money by hand"
            await self.rt.wait(
                lambda: all(not t.is_open for t in self.settlements),
                lambda: f"**Stage:** {self.stage}  \n**Waiting for:** finance settling by hand",
                self._fire_timer,
                lambda: False,
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

    async def _finish(self, stage: Stage, reason: str) -> None:
        self.finishing = (stage, reason)
        await self._await_settlements()
        self.outcome_reason = reason
        await self._set_stage(stage, reason)
        self.rt.done = True
        workflow.set_current_details(f"**{stage}**: {reason}")

    def _checkpoint(self) -> None:
        if self.cancel_request is not None:
            raise Stop(Stage.CANCELLED, self._cancel_reason())

    def _cancel_reason(self) -> str:
        assert self.cancel_request is not None
        return f"cancelled by {self.cancel_request.actor.username}: {self.cancel_request.reason}"

    # ================================================================== waiting and tasks
    async def _wait(self, condition, what: str) -> None:
        """Wait for a condition while firing task timers; a cancellation stops the process."""

        def describe() -> str:
            lines = [f"**Stage:** {self.stage}  \n**Waiting for:** {what}"]
            for t in self.rt.board.open_tasks():
                lines.append(
                    f"- task `{t.task_id}` *{t.name}*: {t.who_may_act()} may act, "
                    f"open since {t.created_at.isoformat(timespec='minutes')}"
                )
            return "\n".join(lines)

        self.rt.waiting_for = what
        await self.rt.wait(
            condition, describe, self._fire_timer, lambda: self.cancel_request is not None
        )
        self._checkpoint()

    async def _fire_timer(self, kind: str, task: HumanTask) -> None:
        now = workflow.now()
        if kind == "remind":
            self.rt.board.remind(task, now)
            self.rt.audit(SYSTEM_ACTOR, "reminded", task.name, task_id=task.task_id)
            await self._notify_candidates([task], f"Reminder: {task.name} is waiting for you")
        elif kind == "escalate":
            self.rt.board.escalate(task, now)
            self.rt.audit(
                SYSTEM_ACTOR,
                "escalated",
                f"{task.name} to {task.escalation_role}",
                task_id=task.task_id,
            )
            await self._notify(
                f"escalate:{task.task_id}",
                f"Escalated: {task.name} (order {self.inp.order_no}) is past its SLA",
                f"Task {task.task_id} has been open since {task.created_at:%Y-%m-%d %H:%M} UTC.",
                to_roles=[task.escalation_role] if task.escalation_role else [],
            )
        else:
            self.rt.board.close(task, TIMED_OUT, SYSTEM_ACTOR, now, comment="final deadline")
            self.rt.audit(SYSTEM_ACTOR, TIMED_OUT, task.name, task_id=task.task_id)
        self.rt.task_changed(task)
        await self.rt.flush()

    def _open_task(
        self,
        *,
        name: str,
        kind,
        roles: list[str],
        outcomes: Sequence[str],
        timers: TaskTimers,
        required_fields=None,
        four_eyes: bool = True,
    ) -> HumanTask:
        task = self.rt.board.open(
            name=name,
            kind=kind,
            candidate_roles=roles,
            outcomes=outcomes,
            now=workflow.now(),
            times=timers.task_times(),
            required_fields=required_fields,
            four_eyes=four_eyes,
        )
        self.rt.task_changed(task)
        self.rt.audit(SYSTEM_ACTOR, "task_opened", name, task_id=task.task_id)
        return task

    # ================================================================== side effects
    async def _set_stage(self, stage: Stage, note: str = "") -> None:
        if stage == self.stage and len(self.stages) > 1:
            return
        self.stage = stage
        self.stages.append(StageEntry(stage=stage, at=workflow.now(), note=note))
        self.rt.stage = StageChange(
            order_no=self.inp.order_no,
            stage=stage,
            revision=len(self.stages),
            special_change=bool(self.amendments),
            at=workflow.now(),
        )
        self.rt.audit(SYSTEM_ACTOR, "stage", f"{stage}" + (f": {note}" if note else ""))
        self.rt.upsert(STAGE_SA.value_set(str(stage)))
        mail = self._notify_customer(
            f"Order {self.inp.order_no}: {stage.replace('_', ' ')}",
            f"Dear {self.inp.customer.company_name},\n\nyour order {self.inp.order_no} is "
            f"now '{stage.replace('_', ' ')}'." + (f"\n{note}" if note else ""),
            key=f"stage:{len(self.stages)}:{stage}",
        )
        if self.rt.local:  # the mail goes into the projection's transaction
            await mail
            await self.rt.flush()
        else:
            await asyncio.gather(self.rt.flush(), mail)

    async def _notify_customer(self, subject: str, body: str, key: str | None = None) -> None:
        await self._notify(
            key or f"customer:{self.rt.audit_count}",
            subject,
            body,
            to_emails=[self.inp.customer.email],
        )

    async def _notify_candidates(self, tasks: list[HumanTask], subject: str) -> None:
        for t in tasks:
            await self._notify(
                f"task:{t.task_id}:{len(t.history) + t.events_dropped}",
                subject,
                f"Task {t.task_id} '{t.name}' for order {self.inp.order_no} "
                f"({self.amount_due} {self.inp.currency}) waits for {t.who_may_act()}.",
                to_users=[t.assignee] if t.assignee else [],
                to_roles=[] if t.assignee else t.candidate_roles,
            )

    async def _notify(
        self, key: str, subject: str, body: str, *, to_users=(), to_roles=(), to_emails=()
    ) -> None:
        await self.rt.mail(
            Notification(
                idempotency_key=f"{self.rt.workflow_id}:{key}",
                workflow_id=self.rt.workflow_id,
                to_users=list(to_users),
                to_roles=list(to_roles),
                to_emails=list(to_emails),
                subject=subject,
                body=body,
            )
        )

    # ================================================================== derived values
    def _installment_amount(self, index: int) -> Decimal:
        shares = [
            (self.amount_due * p / Decimal(100)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
            for p in self.inp.installments
        ]
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
        board = self.rt.board
        return SalesOrderStatus(
            order_no=self.inp.order_no,
            workflow_id=self.rt.workflow_id,
            stage=self.stage,
            variant=self.inp.variant,
            requester=self.inp.requester,
            customer_id=self.inp.customer.id,
            currency=self.inp.currency,
            amount=self.amount,
            amount_due=self.amount_due,
            paid=self._paid(),
            refunded=self._refunded(),
            due=self._due(),
            balance=self._balance(),
            policy_version=self.policy_version,
            special_change=bool(self.amendments),
            amendments=list(self.amendments),
            waiting_for="" if self.rt.done else self.rt.waiting_for,
            pending_tasks=[_view(t) for t in board.open_tasks()],
            decisions=[
                DecisionRecord(
                    task_id=t.task_id,
                    name=t.name,
                    outcome=t.outcome or "",
                    actor=t.decided_by or "",
                    comment=t.comment,
                    at=t.closed_at or t.created_at,
                )
                for t in board.tasks.values()
                if not t.is_open
            ],
            stages=list(self.stages),
            payments=list(self.payments),
            outcome_reason=self.outcome_reason,
            tracking_no=self.tracking_no,
            invoice_no=self.invoice_no,
            settled=self.rt.is_settled(),
        )

    @workflow.update
    async def settle(self) -> SalesOrderStatus:
        """Return the status once the instance has processed everything received so far."""
        await self.rt.settled(self.rt.changed())
        return self.status()

    @workflow.update
    async def decide(self, inp: DecideInput) -> DecideResult:
        """A person decides a task; returns the task and the order's stage after it."""
        task = self.rt.board.apply_decision(inp, workflow.now())
        self.rt.task_changed(task)
        self.rt.audit(
            inp.actor.username,
            f"decided:{inp.outcome}",
            inp.comment,
            {"fields": inp.fields},
            task_id=task.task_id,
        )
        ticket = self.rt.changed()
        await self.rt.handler_flush()
        await self.rt.settled(ticket)
        return DecideResult(task=_view(task), stage=self.stage)

    @decide.validator
    def _validate_decide(self, inp: DecideInput) -> None:
        self._refuse_if_ended()
        self.rt.board.validate_decision(inp, strict=True)

    async def _task_action(self, action: str, inp: TaskActionInput) -> TaskView:
        task = self.rt.board.apply_action(action, inp, workflow.now())
        self.rt.task_changed(task)
        self.rt.audit(
            inp.actor.username,
            action,
            inp.comment,
            {"to_user": inp.to_user} if inp.to_user else {},
            task_id=task.task_id,
        )
        ticket = self.rt.changed()
        if action in ("delegate", "reassign") and task.assignee:
            await self._notify_candidates([task], f"Task assigned to you: {task.name}")
        await self.rt.handler_flush()
        # Since 2026-11: a claim or delegation answers once the instance is waiting again, so
        # the caller sees a stable state. Instances started before keep answering at once.
        if workflow.patched("task-action-settles"):
            await self.rt.settled(ticket)
        return _view(task)

    @workflow.update
    async def claim(self, inp: TaskActionInput) -> TaskView:
        """A candidate takes a task; others then see it as taken."""
        return await self._task_action("claim", inp)

    @claim.validator
    def _validate_claim(self, inp: TaskActionInput) -> None:
        self.rt.board.validate_action("claim", inp, strict=True)

    @workflow.update
    async def release(self, inp: TaskActionInput) -> TaskView:
        """The assignee (or a manager) hands a task back to its candidates."""
        return await self._task_action("release", inp)

    @release.validator
    def _validate_release(self, inp: TaskActionInput) -> None:
        self.rt.board.validate_action("release", inp, strict=True)

    @workflow.update
    async def delegate(self, inp: TaskActionInput) -> TaskView:
        """The assignee, a candidate or a manager passes a task to another user."""
        return await self._task_action("delegate", inp)

    @delegate.validator
    def _validate_delegate(self, inp: TaskActionInput) -> None:
        self.rt.board.validate_action("delegate", inp, strict=True)

    @workflow.update
    async def reassign(self, inp: TaskActionInput) -> TaskView:
        """A manager assigns a task to a user, or back to the pool."""
        return await self._task_action("reassign", inp)

    @reassign.validator
    def _validate_reassign(self, inp: TaskActionInput) -> None:
        self.rt.board.validate_action("reassign", inp, strict=True)

    @workflow.update
    async def amend(self, inp: AmendInput) -> SalesOrderStatus:
        """A special change: flag the order; each notified department must acknowledge it."""
        n = len(self.amendments) + 1
        self.amendments.append(inp.description)
        self.rt.audit(inp.actor.username, "special_change", inp.description)
        tasks = [
            self._open_task(
                name=f"acknowledge special change #{n} ({role})",
                kind="acknowledgement",
                roles=[role],
                outcomes=[ACKNOWLEDGED],
                timers=self.policy.acknowledgement_timers,
            )
            for role in self.policy.special_change_roles
        ]
        self.ack_tasks.extend(tasks)
        self.special_changes.append(tasks)
        self.rt.stage = StageChange(
            order_no=self.inp.order_no,
            stage=self.stage,
            revision=len(self.stages),
            special_change=True,
            at=workflow.now(),
        )
        ticket = self.rt.changed()
        await self.rt.handler_flush()
        await self._notify_candidates(
            tasks, f"SPECIAL CHANGE on order {self.inp.order_no}: acknowledge before it proceeds"
        )
        await self.rt.settled(ticket)
        return self.status()

    @amend.validator
    def _validate_amend(self, inp: AmendInput) -> None:
        self._refuse_if_shipped("changed")
        still_open = sum(1 for ts in self.special_changes if any(t.is_open for t in ts))
        if still_open >= self.policy.max_open_special_changes:
            raise ApplicationError(
                f"{still_open} special changes wait for acknowledgement; the policy allows "
                f"{self.policy.max_open_special_changes} at once",
                type=CONFLICT,
                non_retryable=True,
            )
        if inp.actor.username != self.inp.requester and not AMEND_ROLES & set(inp.actor.roles):
            raise ApplicationError(
                "only the requester, sales or a manager may change an order",
                type=NOT_PERMITTED,
                non_retryable=True,
            )

    @workflow.update
    async def cancel(self, inp: CancelInput) -> SalesOrderStatus:
        """The requester or a manager cancels the order; what was done is compensated."""
        self.cancel_request = inp
        self.rt.audit(inp.actor.username, "cancel_requested", inp.reason)
        await self.rt.settled(self.rt.changed())
        await workflow.wait_condition(lambda: self.rt.done or self.stage == Stage.NEEDS_ATTENTION)
        return self.status()

    @cancel.validator
    def _validate_cancel(self, inp: CancelInput) -> None:
        self._refuse_if_shipped("cancelled")
        if self.cancel_request is not None:
            raise ApplicationError(
                "the order is already being cancelled", type=CONFLICT, non_retryable=True
            )
        if inp.actor.username != self.inp.requester and not CANCEL_ROLES & set(inp.actor.roles):
            raise ApplicationError(
                "only the requester or a manager may cancel an order",
                type=NOT_PERMITTED,
                non_retryable=True,
            )

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
            raise ApplicationError(refusal, type=CONFLICT, non_retryable=True)
        return self._payment_outcome(event.event_id, duplicate=False)

    @pay.validator
    def _validate_pay(self, event: PaymentEvent) -> None:
        self._refuse_if_ended()
        known = self.seen_payment_events.get(event.event_id)
        if known is not None and known != event.amount:
            raise ApplicationError(
                f"payment event {event.event_id} was reported with {known} "
                f"{self.inp.currency}, not {event.amount}",
                type=CONFLICT,
                non_retryable=True,
            )
        if known is not None:  # redelivery: nothing to do, nothing written to history
            raise ApplicationError(
                f"payment event {event.event_id} is already recorded",
                type=DUPLICATE_EVENT,
                non_retryable=True,
            )

    def _payment_outcome(self, event_id: str, duplicate: bool) -> PaymentOutcome:
        return PaymentOutcome(
            event_id=event_id,
            duplicate=duplicate,
            paid=self._paid(),
            refunded=self._refunded(),
            balance=self._balance(),
        )

    async def _receive_payment(self, event: PaymentEvent) -> str:
        """Book a reported payment in the ledger; returns why it was refused ('' if booked)."""
        self.seen_payment_events[event.event_id] = event.amount
        async with self.rt.event():
            key = f"incoming:{event.event_id}"
            try:
                result = await workflow.execute_activity(
                    "record_incoming_payment",
                    IncomingPayment(
                        event_id=event.event_id,
                        order_no=self.inp.order_no,
                        amount=event.amount,
                        currency=self.inp.currency,
                    ),
                    result_type=PaymentResult,
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=_retry() if self.hardened else None,
                    summary=f"record incoming payment {event.amount} {self.inp.currency}",
                )
            except ActivityError as err:
                cause = err.cause
                if not (
                    isinstance(cause, ApplicationError) and cause.type == PAYMENT_EVENT_CONFLICT
                ):
                    raise
                del self.seen_payment_events[event.event_id]  # it is not this order's
                self.rt.audit(
                    "provider", "payment_refused", cause.message, {"event_id": event.event_id}
                )
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

    def _refuse_if_ended(self) -> None:
        if self.rt.done or self.stage in TERMINAL_STAGES:
            raise ApplicationError(
                f"the order has ended ({self.stage})", type=CONFLICT, non_retryable=True
            )

    def _refuse_if_shipped(self, what: str) -> None:
        if self.stage in SHIPPED_OR_LATER or self.rt.done:
            raise ApplicationError(
                f"the order is {self.stage} and can no longer be {what}",
                type=NOT_CANCELLABLE,
                non_retryable=True,
            )


def _view(t: HumanTask) -> TaskView:
    return TaskView(
        task_id=t.task_id,
        name=t.name,
        kind=t.kind,
        candidate_roles=list(t.candidate_roles),
        assignee=t.assignee,
        outcomes=list(t.outcomes),
        required_fields=t.required_fields,
        status=t.status,
        outcome=t.outcome,
        decided_by=t.decided_by,
        comment=t.comment,
        created_at=t.created_at,
        due_at=t.escalate_at,
        deadline_at=t.deadline_at,
        escalated=t.escalated,
        history=t.history[-VIEW_HISTORY:],
        history_total=len(t.history) + t.events_dropped,
    )
