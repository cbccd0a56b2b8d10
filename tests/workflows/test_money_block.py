"""The money block on its own: the ledger's arithmetic as pure tests (no Temporal), a carry
recorded by a running sales order restoring a ledger, and a tiny fee process defined here on
`MoneyProcess` that gets the `pay` update, the payment gate, overpayment refunds and money
settled by hand from the block alone, on the time-skipping server."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType

from pydantic import BaseModel
from temporalio import workflow

# the sandbox re-imports this module for each instance: what it needs besides comes through
with workflow.unsafe.imports_passed_through():
    import pytest
    from temporalio.client import WorkflowExecutionStatus, WorkflowUpdateFailedError
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Worker

    from tests.workflows.conftest import Fakes
    from workflows.errors import CONFLICT, DUPLICATE_EVENT
    from workflows.human_task import Actor, DecideInput, TaskTimes
    from workflows.money import (
        Ledger,
        MoneyCarry,
        MoneyProcess,
        MoneyStatus,
        Overpayment,
        PaymentEvent,
        PaymentView,
    )

HISTORIES = Path(__file__).parents[1] / "histories"
FIONA = Actor(username="fiona", roles=["finance"])


def view(key: str, kind: str, amount: str, original_key: str | None = None) -> PaymentView:
    return PaymentView(
        key=key,
        kind=kind,  # type: ignore[arg-type]
        amount=Decimal(amount),
        provider_ref="ref",
        original_key=original_key,
    )


def ledger(amount_due: str, *payments: PaymentView) -> Ledger:
    book = Ledger("EUR", Decimal(amount_due))
    for p in payments:
        book.book(p)
    return book


# ----------------------------------------------------------------------------- the ledger, pure
def test_paid_refunded_due_and_balance_add_up_over_charges_payments_and_refunds():
    book = ledger(
        "1000.00",
        view("wf:installment-1", "charge", "500.00"),
        view("incoming:E-1", "incoming", "700.005"),  # counted to the cent, half up
        view("wf:refund-excess:1", "refund", "150.00", "incoming:E-1"),
    )
    assert book.paid == Decimal("1200.01")
    assert book.refunded == Decimal("150.00")
    assert book.net_paid == Decimal("1050.01")
    assert book.due == Decimal("1000.00")
    assert book.balance == Decimal("-50.01")  # owed back to the customer
    assert book.balance == book.due - (book.paid - book.refunded)


def test_an_empty_ledger_owes_the_whole_amount_due():
    book = ledger("250.00")
    assert (book.paid, book.refunded, book.due, book.balance) == (0, 0, Decimal(250), Decimal(250))


def test_once_stopped_nothing_is_due_and_what_was_paid_is_owed_back():
    book = ledger("600.00", view("incoming:E-1", "incoming", "200.00"))
    assert book.balance == Decimal("400.00")
    book.stopped = True
    assert book.due == 0
    assert book.balance == Decimal("-200.00")
    assert book.amount_due == Decimal("600.00")  # what was charged for stays on record


def test_the_refundable_amount_of_a_payment_is_less_its_own_refunds_only():
    charge = view("wf:installment-1", "charge", "500.00")
    incoming = view("incoming:E-1", "incoming", "300.00")
    book = ledger(
        "800.00",
        charge,
        incoming,
        view("wf:refund:wf:installment-1", "refund", "120.00", charge.key),
        view("wf:refund-excess:1", "refund", "80.00", charge.key),
        view("wf:refund-excess:2", "refund", "50.00", incoming.key),
    )
    assert book.refundable(charge) == Decimal("300.00")
    assert book.refundable(incoming) == Decimal("250.00")
    assert book.has("wf:refund-excess:2") and not book.has("wf:refund-excess:3")


def test_an_event_known_with_another_amount_is_a_conflict_naming_both_amounts():
    book = ledger("100.00")
    book.check_event(PaymentEvent(event_id="E-7", amount=Decimal(100)))  # unknown: no refusal
    book.seen_events["E-7"] = Decimal(100)
    with pytest.raises(ApplicationError) as err:
        book.check_event(PaymentEvent(event_id="E-7", amount=Decimal(5000)))
    assert err.value.type == CONFLICT and err.value.non_retryable
    assert err.value.message == "payment event E-7 was reported with 100 EUR, not 5000"


def test_an_event_known_with_the_same_amount_is_a_duplicate():
    book = ledger("100.00")
    book.seen_events["E-7"] = Decimal(100)
    with pytest.raises(ApplicationError) as err:
        book.check_event(PaymentEvent(event_id="E-7", amount=Decimal("100.00")))
    assert err.value.type == DUPLICATE_EVENT and "E-7" in str(err.value)


def test_a_carry_recorded_by_a_running_order_restores_the_ledger():
    document = json.loads((HISTORIES / "sales_order__continue_as_new__first_run.json").read_text())
    [event] = [
        e
        for e in document["history"]["events"]
        if e["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW"
    ]
    payload = event["workflowExecutionContinuedAsNewEventAttributes"]["input"]["payloads"][0]
    carry = MoneyCarry.model_validate(json.loads(base64.b64decode(payload["data"]))["carry"])
    book = Ledger("EUR", Decimal(0))
    book.restore(carry)
    assert book.amount_due == Decimal("600000.00") and book.seen_events == {"E-1": Decimal(1000)}
    assert [p.kind for p in book.payments] == ["incoming"]
    assert (book.paid, book.balance) == (Decimal(1000), Decimal("599000.00"))
    # and back: the ledger's part of the next carry has the recorded fields and values
    again = book.carry()
    assert again == {k: getattr(carry, k) for k in again}


# ----------------------------------------------------------------------------- a fee process
class FeeInput(BaseModel):
    key: str
    requester: str
    amount: Decimal
    overpayment: Overpayment = "refund"


class FeeStatus(MoneyStatus):
    key: str


GATE_TIMES = TaskTimes(remind_after=timedelta(days=1), deadline=timedelta(days=10))


@workflow.defn(name="money_test_fee")
class FeeProcess(MoneyProcess):
    """A fee: the payer pays it (in parts if they like), then it is paid."""

    PROCESS_TYPE = "money_test_fee"
    TASK_KINDS = frozenset({"payment", "settlement"})
    END_STATUS = MappingProxyType({"paid": "completed", "lapsed": "cancelled"})

    @workflow.init
    def __init__(self, inp: FeeInput) -> None:
        self.inp = inp
        super().__init__(
            ledger=Ledger("EUR", inp.amount),
            business_key=inp.key,
            requester=inp.requester,
            initial_stage="new",
        )

    def overpayment(self) -> Overpayment:
        return self.inp.overpayment

    async def ask_for_payment(self, needed: Decimal, what: str) -> None:
        await self.notify(
            "ask", f"Please pay {self.ledger.text(needed)} ({what})", "", to_users=["payer"]
        )

    @workflow.run
    async def run(self, inp: FeeInput) -> str:
        if await self.await_payment(self.amount_due, "the fee", GATE_TIMES):
            await self.finish("paid", "fee paid")
        else:
            await self.finish("lapsed", "not paid in time")
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.stage

    @workflow.query
    def status(self) -> FeeStatus:
        return FeeStatus(**self.status_fields(), key=self.inp.key)

    @workflow.update
    async def settle(self) -> FeeStatus:  # type: ignore[override]
        await self.settled_now()
        return self.status()


@pytest.fixture
async def fee(ts_env: WorkflowEnvironment):
    fakes = Fakes()
    task_queue = f"tq-{uuid.uuid4()}"
    handles = []

    async def start(amount: str, **kw):
        inp = FeeInput(key=uuid.uuid4().hex[:8], requester="alice", amount=Decimal(amount), **kw)
        handle = await ts_env.client.start_workflow(
            FeeProcess.run, inp, id=f"fee-{inp.key}", task_queue=task_queue
        )
        handles.append(handle)
        return handle

    async with Worker(
        ts_env.client, task_queue=task_queue, workflows=[FeeProcess], activities=fakes.activities()
    ):
        yield start, fakes
        for h in handles:
            if (await h.describe()).status == WorkflowExecutionStatus.RUNNING:
                await h.terminate("test ended")


async def refusal(handle, event: PaymentEvent) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await handle.execute_update(FeeProcess.pay, event)
    assert isinstance(err.value.cause, ApplicationError)
    return err.value.cause.type or ""


async def test_another_process_gets_the_gate_pay_and_the_overpayment_refund_from_the_block(fee):
    start, fakes = fee
    h = await start("100.00")
    st = await h.execute_update(FeeProcess.settle)
    assert isinstance(st, FeeStatus) and st.stage == "awaiting_payment" and st.due == 100
    [gate] = st.pending_tasks
    assert gate.kind == "payment" and gate.candidate_roles == ["finance"]
    assert "Please pay 100.00 EUR (the fee)" in fakes.subjects()  # its own hook, its own words

    first = await h.execute_update(FeeProcess.pay, PaymentEvent(event_id="E-1", amount=Decimal(60)))
    assert (first.paid, first.refunded, first.balance) == (60, 0, 40)
    assert await refusal(h, PaymentEvent(event_id="E-1", amount=Decimal(61))) == CONFLICT
    assert await refusal(h, PaymentEvent(event_id="E-1", amount=Decimal(60))) == DUPLICATE_EVENT
    # 120 paid for 100: the 20 beyond go back at once, from the latest payment
    second = await h.execute_update(
        FeeProcess.pay, PaymentEvent(event_id="E-2", amount=Decimal(60))
    )
    assert (second.paid, second.refunded, second.balance) == (120, 20, 0)
    assert await h.result() == "paid"
    assert fakes.refunds == {f"{h.id}:refund-excess:1": Decimal(20)}
    assert fakes.refund_of == {f"{h.id}:refund-excess:1": "incoming:E-2"}
    final = await h.query(FeeProcess.status)
    assert [p.kind for p in final.payments] == ["incoming", "incoming", "refund"]
    assert final.balance == 0 and final.waiting_for == ""


async def test_an_overpayment_for_finance_holds_the_end_until_it_is_settled_by_hand(fee):
    start, fakes = fee
    h = await start("100.00", overpayment="finance_task")
    await h.execute_update(FeeProcess.settle)
    await h.execute_update(FeeProcess.pay, PaymentEvent(event_id="E-1", amount=Decimal(130)))
    st = await h.execute_update(FeeProcess.settle)
    assert st.stage == "needs_attention" and st.balance == Decimal(-30)
    [task] = st.pending_tasks
    assert task.kind == "settlement" and task.name == "overpayment of 30.00 EUR"
    assert task.deadline_at is None  # a person settles it; it never times out
    # finish waits for finance
    assert (await h.describe()).status == WorkflowExecutionStatus.RUNNING
    await h.execute_update(
        FeeProcess.decide,
        DecideInput(task_id=task.task_id, outcome="settled", comment="wired back", actor=FIONA),
    )
    assert await h.result() == "paid"
    assert fakes.refunds == {}
    assert "needs_attention" in fakes.audit_actions()
