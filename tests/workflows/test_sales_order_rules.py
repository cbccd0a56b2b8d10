"""Validator refusals, timers, payments exactly once, compensation and special changes."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError

from activities.models import PolicyDocument
from workflows.human_task import Actor, DecideInput, TaskActionInput
from workflows.policy import ApprovalTier, SalesOrderPolicy, TaskTimers
from workflows.sales_order import (
    AmendInput,
    CancelInput,
    PaymentEvent,
    SalesOrderWorkflow,
    Stage,
)

from .conftest import MANAGER, SD, VP, order

VERA = Actor(username="vera", roles=["requester", "vice-president"])


async def first_task(h):
    st = await h.execute_update(SalesOrderWorkflow.settle)
    return st.pending_tasks[0]


def _recorded(events) -> list[str]:
    """History events that record something (workflow task bookkeeping aside)."""
    return [
        EventType.Name(e.event_type)
        for e in events
        if "WORKFLOW_TASK" not in EventType.Name(e.event_type)
    ]


async def refused(h, update, arg) -> str:
    before = _recorded([e async for e in h.fetch_history_events()])
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await h.execute_update(update, arg)
    after = _recorded([e async for e in h.fetch_history_events()])
    assert after == before, "a refused update must write nothing to history"
    return err.value.cause.type


@pytest.mark.parametrize(
    "decision, actor, expected",
    [
        ({"outcome": "approved"}, VERA, "FourEyesViolation"),
        ({"outcome": "approved"}, Actor(username="sam", roles=["sales"]), "NotPermitted"),
        ({"outcome": "maybe"}, VP, "InvalidDecision"),
        ({"outcome": "rejected", "comment": "  "}, VP, "InvalidDecision"),
        ({"outcome": "approved", "task_id": "nope"}, VP, "TaskNotFound"),
    ],
)
async def test_validator_refuses_bad_decisions_without_history(harness, decision, actor, expected):
    h = await harness.start(order(600_000, requester="vera"))
    task = await first_task(h)
    arg = DecideInput(task_id=decision.pop("task_id", task.task_id), actor=actor, **decision)
    assert await refused(h, SalesOrderWorkflow.decide, arg) == expected
    # the task is still open and decidable by a legitimate approver
    await h.execute_update(
        SalesOrderWorkflow.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=VP)
    )
    assert (await h.result()).stage == Stage.CLOSED


async def test_closed_task_cannot_be_decided_twice(harness):
    h = await harness.start(order(1_200_000))
    task = await first_task(h)
    await h.execute_update(
        SalesOrderWorkflow.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=VP)
    )
    again = DecideInput(task_id=task.task_id, outcome="approved", actor=VP)
    assert await refused(h, SalesOrderWorkflow.decide, again) == "TaskClosed"


async def test_reminder_then_escalation_to_manager(harness):
    h = await harness.start(order(600_000))
    task = await first_task(h)
    await harness.env.sleep(timedelta(days=1, hours=1))
    subjects = harness.fakes.subjects()
    assert any(s.startswith("Reminder:") for s in subjects)
    assert not any(s.startswith("Escalated:") for s in subjects)
    await harness.env.sleep(timedelta(days=1))
    escalations = [m for m in harness.fakes.mails if m.subject.startswith("Escalated:")]
    assert [m.to_roles for m in escalations] == [["manager"]]
    st = await h.query(SalesOrderWorkflow.status)
    [t] = st.pending_tasks
    assert t.candidate_roles == ["vice-president", "manager"] and t.escalated
    assert "escalated" in harness.fakes.audit_actions()
    # the manager may now decide it
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(task_id=task.task_id, outcome="approved", actor=MANAGER),
    )
    assert (await h.result()).stage == Stage.CLOSED


async def test_final_deadline_cancels_order_and_tells_customer(harness):
    h = await harness.start(order(600_000))
    await first_task(h)
    result = await h.result()  # time skips to the 7-day deadline
    assert result.stage == Stage.CANCELLED
    assert "not decided in time" in result.reason
    st = await h.query(SalesOrderWorkflow.status)
    assert st.decisions[0].outcome == "timed_out"
    assert any("cancelled" in s for s in harness.fakes.subjects())
    assert harness.fakes.charges == {}


async def test_payment_captured_exactly_once_when_answer_is_lost(harness):
    harness.fakes.lost_answers = 2
    h = await harness.start(order(250))
    result = await h.result()
    assert result.stage == Stage.CLOSED
    assert harness.fakes.charge_calls == 3
    assert len(harness.fakes.charges) == 1  # one idempotency key, charged once


async def test_declined_payment_cancels_without_retry(harness):
    harness.fakes.declined_customers.add("CUST-1")
    h = await harness.start(order(300))
    result = await h.result()
    assert result.stage == Stage.CANCELLED
    assert "declined" in result.reason
    assert harness.fakes.charge_calls == 1
    assert harness.fakes.reserved == {}


async def test_out_of_stock_after_payment_refunds(harness):
    harness.fakes.out_of_stock.add("SKU-MUG")
    h = await harness.start(order(400))
    result = await h.result()
    assert result.stage == Stage.FAILED
    assert result.refunded == Decimal("400.00")
    [(charge_key, amount)] = harness.fakes.charges.items()
    assert list(harness.fakes.refunds.values()) == [amount]
    assert charge_key in next(iter(harness.fakes.refunds))


async def test_installments_capture_advance_then_balance_before_shipment(harness):
    h = await harness.start(order(1000, installments=[Decimal(30), Decimal(70)]))
    await h.result()
    assert list(harness.fakes.charges.values()) == [Decimal("300.00"), Decimal("700.00")]


async def test_prepaid_entry_gate_holds_everything_until_paid(harness):
    h = await harness.start(
        order(800, variant="prepaid_entry", installments=[Decimal(50), Decimal(50)])
    )
    st = await h.execute_update(SalesOrderWorkflow.settle)
    assert st.stage == Stage.AWAITING_PAYMENT
    assert harness.fakes.reserved == {}  # no planning before the advance arrives
    await h.signal(
        SalesOrderWorkflow.payment_received, PaymentEvent(event_id="ev-1", amount=Decimal(400))
    )
    await h.signal(
        SalesOrderWorkflow.payment_received,  # redelivered: changes nothing
        PaymentEvent(event_id="ev-1", amount=Decimal(400)),
    )
    st = await h.execute_update(SalesOrderWorkflow.settle)
    assert st.paid == Decimal(400)
    assert harness.fakes.reserved  # advance arrived: stock is reserved
    assert st.stage == Stage.AWAITING_PAYMENT  # the balance is due before shipment
    assert harness.fakes.shipped == []
    await h.signal(
        SalesOrderWorkflow.payment_received, PaymentEvent(event_id="ev-2", amount=Decimal(400))
    )
    result = await h.result()
    assert result.stage == Stage.CLOSED and result.paid == Decimal(800)
    assert len(harness.fakes.incoming) == 2


async def test_prepaid_unpaid_until_deadline_is_cancelled(harness):
    h = await harness.start(order(800, variant="prepaid_entry"))
    result = await h.result()
    assert result.stage == Stage.CANCELLED and "not received in time" in result.reason


async def test_special_change_blocks_until_three_departments_acknowledge(harness):
    h = await harness.start(order(600_000))
    vp_task = await first_task(h)
    st = await h.execute_update(
        SalesOrderWorkflow.amend,
        AmendInput(description="print the logo in blue", actor=Actor(username="alice")),
    )
    assert st.special_change
    acks = [t for t in st.pending_tasks if t.kind == "acknowledgement"]
    assert sorted(r for t in acks for r in t.candidate_roles) == [
        "inspection",
        "procurement",
        "production",
    ]
    assert len([m for m in harness.fakes.mails if "SPECIAL CHANGE" in m.subject]) == 3
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(task_id=vp_task.task_id, outcome="approved", actor=VP),
    )
    for t, user in zip(acks[:2], ["paula", "pete"], strict=True):
        await h.execute_update(
            SalesOrderWorkflow.decide,
            DecideInput(
                task_id=t.task_id,
                outcome="acknowledged",
                actor=Actor(username=user, roles=t.candidate_roles),
            ),
        )
    st = await h.execute_update(SalesOrderWorkflow.settle)
    assert harness.fakes.reserved == {}  # still held: inspection has not acknowledged
    assert [t.kind for t in st.pending_tasks] == ["acknowledgement"]
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(
            task_id=acks[2].task_id,
            outcome="acknowledged",
            actor=Actor(username="ivy", roles=["inspection"]),
        ),
    )
    assert (await h.result()).stage == Stage.CLOSED


async def test_cancel_by_requester_refunds_and_releases(harness):
    harness.fakes.out_of_stock.clear()
    h = await harness.start(
        order(1000, installments=[Decimal(50), Decimal(50)], variant="prepaid_warehouse")
    )
    await h.signal(
        SalesOrderWorkflow.payment_received, PaymentEvent(event_id="ev-9", amount=Decimal(500))
    )
    st = await h.execute_update(SalesOrderWorkflow.settle)
    assert st.stage == Stage.AWAITING_PAYMENT and harness.fakes.reserved
    st = await h.execute_update(
        SalesOrderWorkflow.cancel,
        CancelInput(reason="customer withdrew", actor=Actor(username="alice", roles=["requester"])),
    )
    assert st.stage == Stage.CANCELLED
    assert st.refunded == Decimal(500)
    assert harness.fakes.released == [st.order_no]
    assert all(t.status == "closed" for t in st.pending_tasks)


async def test_cancel_refused_for_other_requester_and_after_shipment(harness):
    h = await harness.start(order(600_000))
    await first_task(h)
    other = CancelInput(reason="x", actor=Actor(username="bob", roles=["requester"]))
    assert await refused(h, SalesOrderWorkflow.cancel, other) == "NotPermitted"
    st = await h.execute_update(
        SalesOrderWorkflow.cancel, CancelInput(reason="budget cut", actor=MANAGER)
    )
    assert st.stage == Stage.CANCELLED
    h2 = await harness.start(order(10))
    await h2.result()
    late = CancelInput(reason="too late", actor=MANAGER)
    with pytest.raises(RPCError):  # the instance has ended: nothing to update
        await h2.execute_update(SalesOrderWorkflow.cancel, late)


async def test_claim_release_delegate_and_reassign(harness):
    h = await harness.start(order(600_000))
    task = await first_task(h)
    other_vp = Actor(username="vince", roles=["vice-president"])
    view = await h.execute_update(
        SalesOrderWorkflow.claim, TaskActionInput(task_id=task.task_id, actor=VP)
    )
    assert view.assignee == "victor"
    # taken: another vice-president can neither claim nor decide it
    assert (
        await refused(
            h, SalesOrderWorkflow.claim, TaskActionInput(task_id=task.task_id, actor=other_vp)
        )
        == "Conflict"
    )
    assert (
        await refused(
            h,
            SalesOrderWorkflow.decide,
            DecideInput(task_id=task.task_id, outcome="approved", actor=other_vp),
        )
        == "NotPermitted"
    )
    # delegation to the requester breaks the four-eyes rule
    assert (
        await refused(
            h,
            SalesOrderWorkflow.delegate,
            TaskActionInput(
                task_id=task.task_id, actor=VP, to_user="alice", to_roles=["requester"]
            ),
        )
        == "FourEyesViolation"
    )
    view = await h.execute_update(
        SalesOrderWorkflow.delegate,
        TaskActionInput(
            task_id=task.task_id, actor=VP, to_user="vince", to_roles=["vice-president"]
        ),
    )
    assert view.assignee == "vince"
    assert (
        await refused(
            h,
            SalesOrderWorkflow.reassign,
            TaskActionInput(task_id=task.task_id, actor=VP, to_user="victor"),
        )
        == "NotPermitted"
    )
    view = await h.execute_update(
        SalesOrderWorkflow.reassign,
        TaskActionInput(task_id=task.task_id, actor=MANAGER, to_user=None),
    )
    assert view.assignee is None
    await h.execute_update(
        SalesOrderWorkflow.claim, TaskActionInput(task_id=task.task_id, actor=other_vp)
    )
    await h.execute_update(
        SalesOrderWorkflow.release, TaskActionInput(task_id=task.task_id, actor=other_vp)
    )
    await h.execute_update(
        SalesOrderWorkflow.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=VP)
    )
    await h.result()
    actions = harness.fakes.audit_actions()
    for a in ("claim", "delegate", "reassign", "release", "decided:approved"):
        assert a in actions


def _policy(**kw) -> PolicyDocument:
    return PolicyDocument(
        process_type="sales_order",
        version=7,
        document=SalesOrderPolicy(**kw).model_dump(mode="json"),
    )


async def test_k_of_n_level_needs_k_approvals_and_withdraws_the_rest(harness):
    harness.fakes.policy = _policy(
        approval_tiers=[
            ApprovalTier(
                min_amount=Decimal(0),
                name="board",
                roles=["vice-president", "sales-director", "finance"],
                mode="k_of_n",
                k=2,
            )
        ]
    )
    h = await harness.start(order(50))
    st = await h.execute_update(SalesOrderWorkflow.settle)
    assert st.policy_version == 7
    assert len(st.pending_tasks) == 3
    by_role = {t.candidate_roles[0]: t for t in st.pending_tasks}
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(task_id=by_role["vice-president"].task_id, outcome="approved", actor=VP),
    )
    st = await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(task_id=by_role["sales-director"].task_id, outcome="approved", actor=SD),
    )
    assert (await h.result()).stage == Stage.CLOSED
    final = await h.query(SalesOrderWorkflow.status)
    assert sorted(d.outcome for d in final.decisions) == ["approved", "approved", "withdrawn"]


async def test_all_of_level_is_rejected_by_one_refusal(harness):
    harness.fakes.policy = _policy(
        approval_tiers=[
            ApprovalTier(
                min_amount=Decimal(0),
                name="sign-off",
                roles=["vice-president", "sales-director"],
                mode="all",
            )
        ],
        approval_timers=TaskTimers(),
    )
    h = await harness.start(order(50))
    st = await h.execute_update(SalesOrderWorkflow.settle)
    by_role = {t.candidate_roles[0]: t for t in st.pending_tasks}
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(task_id=by_role["vice-president"].task_id, outcome="approved", actor=VP),
    )
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(
            task_id=by_role["sales-director"].task_id, outcome="rejected", comment="no", actor=SD
        ),
    )
    assert (await h.result()).stage == Stage.REJECTED


async def test_policy_thresholds_come_from_the_loaded_version(harness):
    # the business moved the VP threshold from 500,000 to 100: a 200 order now needs approval
    harness.fakes.policy = _policy(
        approval_tiers=[ApprovalTier(min_amount=Decimal(100), name="vp", roles=["vice-president"])]
    )
    h = await harness.start(order(200))
    st = await h.execute_update(SalesOrderWorkflow.settle)
    assert st.stage == Stage.APPROVAL and st.policy_version == 7
