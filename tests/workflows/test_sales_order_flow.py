"""The sales order's approval rules, payments and stages on the time-skipping server."""

from __future__ import annotations

from decimal import Decimal

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from workflows.human_task import DecideInput
from workflows.sales_order import SalesOrderWorkflow, Stage

from .conftest import SD, VP, order


async def pending(handle):
    return (await handle.query(SalesOrderWorkflow.status)).pending_tasks


async def decide(handle, task_id, actor, outcome="approved", comment=""):
    return await handle.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(task_id=task_id, outcome=outcome, comment=comment, actor=actor),
    )


async def test_small_order_needs_no_approval_and_closes(harness):
    h = await harness.start(order(100))
    result = await h.result()
    assert result.stage == Stage.CLOSED
    assert result.paid == Decimal("100.00")
    assert list(harness.fakes.charges.values()) == [Decimal("100.00")]
    assert result.tracking_no and result.invoice_no
    status = await h.query(SalesOrderWorkflow.status)
    assert [s.stage for s in status.stages] == [
        Stage.RECEIVED,
        Stage.VALIDATED,
        Stage.PAYMENT,
        Stage.PAID,
        Stage.STOCK_RESERVED,
        Stage.SHIPPED,
        Stage.INVOICED,
        Stage.CLOSED,
    ]
    assert not [a for a in harness.fakes.audit_actions() if a.startswith("task_opened")]


async def test_order_of_500000_needs_only_the_vice_president(harness):
    h = await harness.start(order(500_000))
    settled = await h.execute_update(SalesOrderWorkflow.settle)
    assert settled.stage == Stage.APPROVAL
    [task] = settled.pending_tasks
    assert task.candidate_roles == ["vice-president"]
    out = await decide(h, task.task_id, VP)
    assert out.task.outcome == "approved"
    assert (await h.result()).stage == Stage.CLOSED


async def test_order_of_1200000_needs_vice_president_then_sales_director(harness):
    h = await harness.start(order(1_200_000))
    [vp_task] = (await h.execute_update(SalesOrderWorkflow.settle)).pending_tasks
    assert vp_task.candidate_roles == ["vice-president"]
    # the sales director cannot act before the vice-president: it is not their task
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await decide(h, vp_task.task_id, SD)
    assert isinstance(err.value.cause, ApplicationError)
    assert err.value.cause.type == "NotPermitted"
    result = await decide(h, vp_task.task_id, VP)
    # the update returns once the next level is open
    assert result.stage == Stage.APPROVAL
    [sd_task] = await pending(h)
    assert sd_task.candidate_roles == ["sales-director"]
    await decide(h, sd_task.task_id, SD)
    final = await h.result()
    assert final.stage == Stage.CLOSED
    status = await h.query(SalesOrderWorkflow.status)
    assert [(d.actor, d.outcome) for d in status.decisions] == [
        ("victor", "approved"),
        ("diana", "approved"),
    ]


async def test_order_just_below_threshold_skips_approval(harness):
    h = await harness.start(order("499999.99"))
    assert (await h.result()).stage == Stage.CLOSED
    status = await h.query(SalesOrderWorkflow.status)
    assert status.decisions == []


async def test_loyalty_discount_lowers_amount_due_below_threshold(harness):
    # 520,000 less 5% is 494,000: under the vice-president's threshold
    h = await harness.start(order(520_000, loyalty_discount=True))
    result = await h.result()
    assert result.amount_due == Decimal("494000.00")
    assert list(harness.fakes.charges.values()) == [Decimal("494000.00")]
    assert (await h.query(SalesOrderWorkflow.status)).decisions == []


async def test_rejection_ends_order_rejected_and_tells_customer(harness):
    h = await harness.start(order(700_000))
    [task] = (await h.execute_update(SalesOrderWorkflow.settle)).pending_tasks
    out = await decide(h, task.task_id, VP, outcome="rejected", comment="margin too low")
    assert out.stage == Stage.REJECTED
    result = await h.result()
    assert result.stage == Stage.REJECTED
    assert harness.fakes.charges == {}
    assert any("rejected" in s for s in harness.fakes.subjects())


async def test_prepaid_order_skips_approval_chain(harness):
    h = await harness.start(order(2_000_000, variant="prepaid_warehouse"))
    st = await h.execute_update(SalesOrderWorkflow.settle)
    # proceeds to the warehouse without approvals; shipment waits for the money
    assert st.stage == Stage.AWAITING_PAYMENT
    assert harness.fakes.reserved
    assert [t.kind for t in st.pending_tasks] == ["payment"]
    from workflows.sales_order import PaymentEvent

    await h.signal(
        SalesOrderWorkflow.payment_received,
        PaymentEvent(event_id="ev-1", amount=Decimal(2_000_000)),
    )
    result = await h.result()
    assert result.stage == Stage.CLOSED
    assert harness.fakes.charges == {}  # nothing captured: the customer paid in advance
    assert (await h.query(SalesOrderWorkflow.status)).decisions[0].outcome == "paid"


async def test_current_details_tell_operators_what_the_instance_waits_for(harness):
    from temporalio.api.sdk.v1 import WorkflowMetadata

    h = await harness.start(order(600_000))
    [task] = (await h.execute_update(SalesOrderWorkflow.settle)).pending_tasks
    meta = await h.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    details = meta.current_details
    assert "vice-president approval" in details
    assert task.task_id in details and "roles vice-president may act" in details
    assert "open since" in details
    # activities (local ones on their markers) carry readable summaries too
    summaries = [
        e.user_metadata.summary.data
        async for e in h.fetch_history_events()
        if e.HasField("user_metadata")
    ]
    assert any(b"load the current sales order policy" in s for s in summaries)
    # one projection for every step up to the wait: both stages' mails and the task's
    assert any(
        b"record 1 task(s)" in s and b"stage approval" in s and b"3 mail(s)" in s for s in summaries
    )
