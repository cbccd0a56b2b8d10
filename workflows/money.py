"""The money block: what a process that takes and gives back money needs beside the kernel.

Two parts, because they live in two worlds:
- `Ledger`, a plain class the process holds (like the `TaskBoard`): the amount due, the
  payments booked (charges, incoming payments, refunds) and the provider events seen, with its
  arithmetic - paid, refunded, due, balance, what a payment can still give back, whether an
  event is known (and with which amount). No Temporal, no I/O: it is tested on its own.
- `MoneyProcess`, the kernel's subclass a money process derives from: what needs the kernel
  and Temporal - the `pay` update and the `payment_received` signal (handlers must be members
  of the workflow class for the SDK to register them, which a held object cannot be), the
  capture, incoming-payment and refund activities, the payment gate, overpayments given back
  (or to finance) and money settled by hand in a finance task, which `finish` waits for.

A process names its stages for the block (`AWAITING_PAYMENT_STAGE`, `ATTENTION_STAGE`),
declares the task kinds `payment` and `settlement`, and answers the hooks `overpayment`,
`settlement_times` and `ask_for_payment` from its own policy and mails.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.models import (
        PAYMENT_EVENT_CONFLICT,
        IncomingPayment,
        PaymentRequest,
        RefundRequest,
    )
    from activities.payments import PaymentActivities

from workflows.errors import CONFLICT, DUPLICATE_EVENT, refuse
from workflows.human_task import SYSTEM_ACTOR, TIMED_OUT, HumanTask, TaskTimes
from workflows.kernel import HumanProcess, ProcessCarry, ProcessStatus, business_retry, cause_of

# The largest amount an order, a line or a payment may carry (16 digits, as the money columns).
MAX_AMOUNT = Decimal("99999999999999.99")
SETTLED = "settled"
Overpayment = Literal["refund", "finance_task"]


def money(value: Decimal) -> Decimal:
    """Rounded to the cent, half up."""
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


# ----------------------------------------------------------------------------- models
class PaymentEvent(BaseModel):
    """An incoming payment reported by the provider; redelivery of an event_id changes nothing."""

    event_id: str = Field(min_length=1, max_length=200)
    amount: Decimal = Field(gt=0, le=MAX_AMOUNT, max_digits=16, decimal_places=2)


class PaymentView(BaseModel):
    key: str
    kind: Literal["charge", "incoming", "refund"]
    amount: Decimal
    provider_ref: str
    original_key: str | None = Field(None, description="for a refund: the payment it gives back")


class PaymentOutcome(BaseModel):
    """What a reported payment did to the instance; `duplicate`: the event was known already."""

    event_id: str
    duplicate: bool = False
    paid: Decimal
    refunded: Decimal
    balance: Decimal


class MoneyStatus(ProcessStatus):
    """The status of a process that moves money: the kernel's fields and the ledger's."""

    currency: str
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
    payments: list[PaymentView]


class MoneyCarry(ProcessCarry):
    """What a money process carries into its next run (continue-as-new): the kernel's part and
    the ledger's; a process's carry extends it with its own fields."""

    amount_due: Decimal
    payments: list[PaymentView]
    seen_payment_events: dict[str, Decimal]
    settlements: list[str]
    stopped: bool = False


# ----------------------------------------------------------------------------- the ledger
class Ledger:
    """The money of one instance. `amount_due` is what the process charges; once `stopped`
    (rejected, cancelled, failed) nothing is due any more and what was paid is owed back."""

    def __init__(self, currency: str, amount_due: Decimal) -> None:
        self.currency = currency
        self.amount_due = amount_due
        self.stopped = False
        self.payments: list[PaymentView] = []
        self.seen_events: dict[str, Decimal] = {}  # event id -> amount reported

    @property
    def paid(self) -> Decimal:
        return money(sum((p.amount for p in self.payments if p.kind != "refund"), Decimal(0)))

    @property
    def refunded(self) -> Decimal:
        return money(sum((p.amount for p in self.payments if p.kind == "refund"), Decimal(0)))

    @property
    def net_paid(self) -> Decimal:
        return self.paid - self.refunded

    @property
    def due(self) -> Decimal:
        """What the customer owes now: the amount due, 0 once stopped."""
        return Decimal(0) if self.stopped else self.amount_due

    @property
    def balance(self) -> Decimal:
        """Still owed (> 0) or owed back to the customer (< 0)."""
        return self.due - self.net_paid

    def refundable(self, p: PaymentView) -> Decimal:
        """What payment `p` can still give back: its amount less the refunds of it."""
        given_back = sum(
            (r.amount for r in self.payments if r.kind == "refund" and r.original_key == p.key),
            Decimal(0),
        )
        return p.amount - given_back

    def has(self, key: str) -> bool:
        return any(p.key == key for p in self.payments)

    def book(self, payment: PaymentView) -> None:
        self.payments.append(payment)

    def text(self, amount: Decimal) -> str:
        return f"{amount} {self.currency}"

    def check_event(self, event: PaymentEvent) -> None:
        """Refuse an event known already: with another amount (Conflict), or as it was
        (DuplicateEvent: nothing to do)."""
        known = self.seen_events.get(event.event_id)
        if known is not None and known != event.amount:
            raise refuse(
                CONFLICT,
                f"payment event {event.event_id} was reported with {self.text(known)}, "
                f"not {event.amount}",
            )
        if known is not None:
            raise refuse(DUPLICATE_EVENT, f"payment event {event.event_id} is already recorded")

    def carry(self) -> dict[str, Any]:
        return {
            "amount_due": self.amount_due,
            "payments": self.payments,
            "seen_payment_events": self.seen_events,
            "stopped": self.stopped,
        }

    def restore(self, c: MoneyCarry) -> None:
        self.amount_due = c.amount_due
        self.payments = list(c.payments)
        self.seen_events = dict(c.seen_payment_events)
        self.stopped = c.stopped


# ----------------------------------------------------------------------------- the process part
class MoneyProcess(HumanProcess):
    """A process that moves money by its `Ledger` (see the module docstring)."""

    AWAITING_PAYMENT_STAGE: ClassVar[str] = "awaiting_payment"
    ATTENTION_STAGE: ClassVar[str] = "needs_attention"  # money to settle by hand

    def __init__(
        self,
        *,
        ledger: Ledger,
        business_key: str,
        requester: str,
        initial_stage: str,
        carry: ProcessCarry | None = None,
    ) -> None:
        self.ledger = ledger
        self.settlements: list[HumanTask] = []  # finance tasks for money to settle by hand
        super().__init__(
            business_key=business_key,
            requester=requester,
            initial_stage=initial_stage,
            carry=carry,
        )

    @property
    def amount_due(self) -> Decimal:
        """What the process charges (its ledger's `amount_due`)."""
        return self.ledger.amount_due

    # ================================================================== hooks
    def overpayment(self) -> Overpayment:
        """What happens to money beyond the amount due: refunded, or a finance task."""
        return "refund"

    def settlement_times(self) -> TaskTimes:
        """Reminders and escalation of a finance task settling money by hand."""
        return TaskTimes()

    async def ask_for_payment(self, needed: Decimal, what: str) -> None:
        """Tell the payer what a payment gate waits for (a mail); nothing by default."""

    async def before_end(self) -> None:
        """Wait (not interruptible: the process is ending) until finance settled by hand."""
        while any(t.is_open for t in self.settlements):
            await self.wait(
                lambda: all(not t.is_open for t in self.settlements),
                "finance to settle money by hand",
                interruptible=False,
            )

    def status_fields(self) -> dict[str, Any]:
        """The fields of `MoneyStatus`: the kernel's and the ledger's."""
        ledger = self.ledger
        return {
            **super().status_fields(),
            "currency": ledger.currency,
            "amount_due": ledger.amount_due,
            "paid": ledger.paid,
            "refunded": ledger.refunded,
            "due": ledger.due,
            "balance": ledger.balance,
            "payments": list(ledger.payments),
        }

    # ================================================================== continue-as-new
    def money_carry(self) -> dict[str, Any]:
        """The block's part of the carry (the fields of `MoneyCarry`)."""
        return {**self.ledger.carry(), "settlements": [t.task_id for t in self.settlements]}

    def restore_money(self, c: MoneyCarry) -> None:
        self.ledger.restore(c)
        self.settlements = [self.rt.board.tasks[t] for t in c.settlements]

    # ================================================================== steps
    async def capture(self, step: str, amount: Decimal, customer_id: str, summary: str) -> None:
        """Charge `amount` once: the key is the workflow id and the step, so a retried capture
        returns the first charge. A decline raises (ActivityError); the process decides.
        The main loop's step (an update waiting for it is answered first)."""
        key = f"{self.rt.workflow_id}:{step}"
        await self.rt.before_activity()
        result = await workflow.execute_activity_method(
            PaymentActivities.capture_payment,
            PaymentRequest(
                idempotency_key=key,
                order_no=self.rt.business_key,
                customer_id=customer_id,
                amount=amount,
                currency=self.ledger.currency,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=business_retry(),
            summary=summary,
        )
        self.ledger.book(
            PaymentView(key=key, kind="charge", amount=amount, provider_ref=result.provider_ref)
        )
        what = self.ledger.text(amount)
        self.rt.audit(SYSTEM_ACTOR, "payment_captured", what, {"idempotency_key": key})

    async def await_payment(self, needed: Decimal, what: str, times: TaskTimes) -> bool:
        """A gate: wait until the provider reported `needed` in total (a finance task stands
        for the wait); False when that task timed out first."""
        ledger = self.ledger

        def paid() -> Decimal:
            return ledger.net_paid if self.hardened else ledger.paid

        if paid() >= needed:
            return True
        await self.set_stage(self.AWAITING_PAYMENT_STAGE)
        slot = f"gate:{what}"
        found = self.slot_tasks(slot)  # continued as new while waiting
        task = found[0] if found else None
        if task is None:
            task = self.open_task(
                name=f"await {what}: {ledger.text(needed)}",
                kind="payment",
                roles=["finance"],
                outcomes=[],
                times=times,
                four_eyes=False,
            )
            self.slots[slot] = [task.task_id]
            await self.ask_for_payment(needed, what)
        gate = task
        await self.wait(lambda: paid() >= needed or not gate.is_open, what)
        if gate.is_open:
            self.close_task(gate, "paid")
            if not self.rt.batched:  # newer instances write it as they wait again (or end)
                await self.rt.flush()
        return gate.outcome != TIMED_OUT

    async def refund_all(self, why: str) -> None:
        """Give back every charge and incoming payment (what each can still give back). The
        main loop's step (an update waiting for it is answered before the first refund)."""
        for p in [p for p in self.ledger.payments if p.kind in ("charge", "incoming")]:
            refund_key = f"{self.rt.workflow_id}:refund:{p.key}"
            if self.ledger.has(refund_key):
                continue
            amount = self.ledger.refundable(p) if self.hardened else p.amount
            if amount > 0:
                await self.rt.before_activity()
                await self._refund(p, amount, refund_key, why)

    async def _refund(self, p: PaymentView, amount: Decimal, key: str, why: str) -> None:
        """Give amount of payment p back; a refund the provider refuses is settled by hand."""
        text = self.ledger.text(amount)
        try:
            result = await workflow.execute_activity_method(
                PaymentActivities.refund_payment,
                RefundRequest(
                    idempotency_key=key,
                    order_no=self.rt.business_key,
                    original_key=p.key,
                    amount=amount,
                    currency=self.ledger.currency,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=business_retry() if self.hardened else None,
                summary=f"refund {text}" + (f" ({why})" if self.hardened else ""),
            )
        except ActivityError as err:
            # never a failed workflow (older instances too: this path had no commands after it)
            await self._settle_by_hand(
                f"refund {text} of payment {p.key} by hand ({why}): {cause_of(err)}"
            )
            return
        self.ledger.book(
            PaymentView(
                key=key,
                kind="refund",
                amount=amount,
                provider_ref=result.provider_ref,
                original_key=p.key,
            )
        )
        self.rt.audit(SYSTEM_ACTOR, "payment_refunded", f"{text} ({why})", {"idempotency_key": key})

    async def _settle_by_hand(self, what: str) -> None:
        """Money the process cannot move itself: a finance task, and the stage says so."""
        self.rt.audit(SYSTEM_ACTOR, "needs_attention", what)
        task = self.open_task(
            name=what[:200],
            kind="settlement",
            roles=["finance"],
            outcomes=[SETTLED],
            times=self.settlement_times(),
            required_fields={SETTLED: ["comment"]},
            four_eyes=False,
        )
        task.deadline_at = None  # settled by a person, never timed out
        self.settlements.append(task)
        await self.set_stage(self.ATTENTION_STAGE, what)
        # a task for a person, and the stage a cancellation answers at: written at once (older
        # instances wrote it with the stage)
        await self.rt.written()

    async def _refund_excess(self) -> None:
        """Money received beyond the amount due goes back (or, by policy, to a finance task)."""
        excess = -self.ledger.balance
        if excess <= 0:
            return
        if self.overpayment() == "finance_task":
            await self._settle_by_hand(f"overpayment of {self.ledger.text(excess)}")
            return
        for p in reversed([p for p in self.ledger.payments if p.kind == "incoming"]):
            amount = min(excess, self.ledger.refundable(p))
            if amount <= 0:
                continue
            n = sum(1 for r in self.ledger.payments if r.kind == "refund") + 1
            await self._refund(p, amount, f"{self.rt.workflow_id}:refund-excess:{n}", "overpayment")
            excess -= amount
            if excess <= 0:
                break

    # ================================================================== handlers
    @workflow.signal(unfinished_policy=workflow.HandlerUnfinishedPolicy.ABANDON)
    async def payment_received(self, event: PaymentEvent) -> None:
        """The provider reports a payment; a redelivered event id changes nothing (instances
        started before 2026-12 are told through this signal; newer callers use `pay`)."""
        if event.event_id in self.ledger.seen_events or self.rt.done:
            return
        await self._receive_payment(event)

    @workflow.update
    async def pay(self, event: PaymentEvent) -> PaymentOutcome:
        """The provider reports a payment; refused (Conflict) when the event belongs to another
        instance or was reported with another amount; its money then counts nowhere."""
        refusal = await self._receive_payment(event)
        if refusal:
            raise refuse(CONFLICT, refusal)
        ledger = self.ledger
        return PaymentOutcome(
            event_id=event.event_id,
            paid=ledger.paid,
            refunded=ledger.refunded,
            balance=ledger.balance,
        )

    @pay.validator
    def _validate_pay(self, event: PaymentEvent) -> None:
        self.refuse_if_ended()
        self.ledger.check_event(event)  # a redelivery: nothing to do, nothing written

    async def _receive_payment(self, event: PaymentEvent) -> str:
        """Book a reported payment in the ledger; returns why it was refused ('' if booked)."""
        ledger = self.ledger
        ledger.seen_events[event.event_id] = event.amount
        async with self.rt.event():
            key = f"incoming:{event.event_id}"
            try:
                result = await workflow.execute_activity_method(
                    PaymentActivities.record_incoming_payment,
                    IncomingPayment(
                        event_id=event.event_id,
                        order_no=self.rt.business_key,
                        amount=event.amount,
                        currency=ledger.currency,
                    ),
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=business_retry() if self.hardened else None,
                    summary=f"record incoming payment {ledger.text(event.amount)}",
                )
            except ActivityError as err:
                cause = err.cause
                if not (
                    isinstance(cause, ApplicationError) and cause.type == PAYMENT_EVENT_CONFLICT
                ):
                    raise
                del ledger.seen_events[event.event_id]  # it is not this instance's
                refused = {"event_id": event.event_id}
                self.rt.audit("provider", "payment_refused", cause.message, refused)
                return cause.message
            if ledger.has(key):
                return ""
            ledger.book(
                PaymentView(
                    key=key, kind="incoming", amount=result.amount, provider_ref=result.provider_ref
                )
            )
            what = ledger.text(result.amount)
            self.rt.audit("provider", "payment_received", what, {"event_id": event.event_id})
            if self.hardened and not ledger.stopped and not self.interrupted():
                await self._refund_excess()
        return ""
