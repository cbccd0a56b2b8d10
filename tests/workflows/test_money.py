"""Money by the ledger: one provider event pays one order once, a capture takes only what is
still due, overpayments go back, and a refund the provider refuses is settled by hand (never a
failed workflow). The fakes enforce event ownership and refundable amounts like the ledger."""

from __future__ import annotations

from decimal import Decimal

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowUpdateFailedError

from activities.models import PolicyDocument
from workflows.human_task import Actor, DecideInput
from workflows.policy import SalesOrderPolicy
from workflows.sales_order import (
    AmendInput,
    CancelInput,
    PaymentEvent,
    SalesOrderWorkflow,
    Stage,
)

from .conftest import VP, order
from .test_sales_order_rules import first_task, refused

FIONA = Actor(username="fiona", roles=["finance"])


def _adds_up(st) -> None:
    assert st.balance == st.due - (st.paid - st.refunded)


async def test_one_provider_event_pays_exactly_one_order(harness):
    a = await harness.start(order(100, variant="prepaid_entry"))
    b = await harness.start(order(100, variant="prepaid_entry"))
    event = PaymentEvent(event_id="E-9080-a", amount=Decimal(100))
    outcome = await a.execute_update(SalesOrderWorkflow.pay, event)
    assert outcome.paid == Decimal(100) and not outcome.duplicate
    # the same event for another order is refused (by the ledger) and counts nowhere
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await b.execute_update(SalesOrderWorkflow.pay, event)
    assert err.value.cause.type == "Conflict" and "E-9080-a" in err.value.cause.message
    st = await b.execute_update(SalesOrderWorkflow.settle)
    assert st.paid == 0 and st.stage == Stage.AWAITING_PAYMENT
    assert "payment_refused" in harness.fakes.audit_actions()
    # the same event again, to its own order: a redelivery, nothing written to history
    assert (await a.result()).paid == Decimal(100)


async def test_an_event_reported_again_with_another_amount_is_refused(harness):
    h = await harness.start(order(600_000))
    await first_task(h)
    await h.execute_update(
        SalesOrderWorkflow.pay, PaymentEvent(event_id="E-1", amount=Decimal(100))
    )
    assert (
        await refused(h, SalesOrderWorkflow.pay, PaymentEvent(event_id="E-1", amount=Decimal(5000)))
        == "Conflict"
    )
    assert (
        await refused(h, SalesOrderWorkflow.pay, PaymentEvent(event_id="E-1", amount=Decimal(100)))
        == "DuplicateEvent"
    )
    st = await h.execute_update(SalesOrderWorkflow.settle)
    assert st.paid == Decimal(100)


async def test_capture_takes_only_what_is_still_due(harness):
    h = await harness.start(order(600_000))
    task = await first_task(h)
    await h.execute_update(
        SalesOrderWorkflow.pay, PaymentEvent(event_id="E-big", amount=Decimal(600_000))
    )
    await h.execute_update(
        SalesOrderWorkflow.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=VP)
    )
    result = await h.result()
    assert result.stage == Stage.CLOSED
    assert harness.fakes.charges == {}  # paid in full before approval: nothing captured
    assert (result.paid, result.refunded, result.balance) == (Decimal(600_000), 0, 0)


async def test_overpayment_is_refunded_and_the_figures_add_up(harness):
    h = await harness.start(order(100, variant="prepaid_entry"))
    await h.execute_update(SalesOrderWorkflow.settle)
    for event_id in ("E-1", "E-2"):
        await h.execute_update(
            SalesOrderWorkflow.pay, PaymentEvent(event_id=event_id, amount=Decimal(100))
        )
    result = await h.result()
    assert result.stage == Stage.CLOSED
    assert (result.paid, result.refunded, result.balance) == (Decimal(200), Decimal(100), 0)
    assert list(harness.fakes.refunds.values()) == [Decimal(100)]


async def test_partial_payment_before_capture_lowers_the_capture(harness):
    h = await harness.start(order(600_000))
    task = await first_task(h)
    await h.execute_update(
        SalesOrderWorkflow.pay, PaymentEvent(event_id="E-part", amount=Decimal(100_000))
    )
    await h.execute_update(
        SalesOrderWorkflow.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=VP)
    )
    result = await h.result()
    assert list(harness.fakes.charges.values()) == [Decimal("500000.00")]
    assert result.balance == 0 and result.refunded == 0


async def test_overpayment_opens_a_finance_task_when_the_policy_says_so(harness):
    harness.fakes.policy = PolicyDocument(
        process_type="sales_order",
        version=3,
        document=SalesOrderPolicy(overpayment="finance_task").model_dump(mode="json"),
    )
    h = await harness.start(order(100, variant="prepaid_entry"))
    await h.execute_update(SalesOrderWorkflow.settle)
    for event_id in ("E-1", "E-2"):
        await h.execute_update(
            SalesOrderWorkflow.pay, PaymentEvent(event_id=event_id, amount=Decimal(100))
        )
    st = await h.execute_update(SalesOrderWorkflow.settle)
    [task] = [t for t in st.pending_tasks if t.kind == "settlement"]
    assert task.candidate_roles == ["finance"] and st.balance == Decimal(-100)
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(
            task_id=task.task_id, outcome="settled", comment="wired back by hand", actor=FIONA
        ),
    )
    result = await h.result()
    assert result.stage == Stage.CLOSED and harness.fakes.refunds == {}


async def test_a_refused_refund_needs_attention_and_never_fails_the_workflow(harness):
    harness.fakes.refunds_declined = 1
    h = await harness.start(order(600_000))
    task = await first_task(h)
    await h.execute_update(
        SalesOrderWorkflow.amend,  # holds it after the capture, before the stock
        AmendInput(description="hold", actor=Actor(username="alice")),
    )
    await h.execute_update(
        SalesOrderWorkflow.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=VP)
    )
    st = await h.execute_update(
        SalesOrderWorkflow.cancel,
        CancelInput(reason="customer withdrew", actor=Actor(username="alice")),
    )
    assert st.stage == Stage.NEEDS_ATTENTION
    [task] = [t for t in st.pending_tasks if t.kind == "settlement"]
    assert "by hand" in task.name and task.candidate_roles == ["finance"]
    _adds_up(st)
    assert st.balance == Decimal(-600_000)  # the customer is owed their money
    # settling needs a comment saying what was done
    assert (
        await refused(
            h,
            SalesOrderWorkflow.decide,
            DecideInput(task_id=task.task_id, outcome="settled", actor=FIONA),
        )
        == "InvalidDecision"
    )
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(
            task_id=task.task_id, outcome="settled", comment="refunded by bank", actor=FIONA
        ),
    )
    result = await h.result()
    assert result.stage == Stage.CANCELLED
    assert (await h.describe()).status == WorkflowExecutionStatus.COMPLETED
    actions = harness.fakes.audit_actions()
    assert "needs_attention" in actions and "decided:settled" in actions


async def test_open_special_changes_are_capped_by_the_policy(harness):
    h = await harness.start(order(600_000))
    await first_task(h)
    alice = Actor(username="alice")
    for n in range(3):  # the default policy allows three at once
        await h.execute_update(
            SalesOrderWorkflow.amend, AmendInput(description=f"change {n}", actor=alice)
        )
    assert (
        await refused(
            h, SalesOrderWorkflow.amend, AmendInput(description="one too many", actor=alice)
        )
        == "Conflict"
    )
    st = await h.execute_update(SalesOrderWorkflow.settle)
    assert len([t for t in st.pending_tasks if t.kind == "acknowledgement"]) == 9


async def test_a_stored_policy_that_breaks_todays_checks_falls_back_to_the_defaults(harness):
    """A version published before the checks (reminder after the deadline) must not make every
    new order's workflow task fail forever."""
    document = SalesOrderPolicy().model_dump(mode="json")
    document["payment_reminder_after"] = "P20D"
    harness.fakes.policy = PolicyDocument(process_type="sales_order", version=5, document=document)
    h = await harness.start(order(100, variant="prepaid_entry"))
    st = await h.execute_update(SalesOrderWorkflow.settle)
    assert st.stage == Stage.AWAITING_PAYMENT and st.policy_version == 0
    assert "policy_invalid" in harness.fakes.audit_actions()
