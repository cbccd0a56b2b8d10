"""Who may finally decide a task: a holder of one of its candidate roles (the escalation role
once escalated), never the requester nor an earlier approver of the same instance; delegation
and reassignment go only to such a person, and a task takes a bounded number of actions."""

from __future__ import annotations

from activities.models import PolicyDocument
from workflows.human_task import Actor, DecideInput, TaskActionInput
from workflows.policy import SalesOrderPolicy
from workflows.sales_order import SalesOrderWorkflow, Stage

from .conftest import MANAGER, VP, order
from .test_sales_order_rules import first_task, refused

PETE = Actor(username="pete", roles=["production"])
MIKE = Actor(username="mike", roles=["manager"])
MARA = Actor(username="mara", roles=["manager"])
BOTH = Actor(username="bea", roles=["vice-president", "sales-director"])


def _to(task_id: str, actor: Actor, user: Actor) -> TaskActionInput:
    return TaskActionInput(task_id=task_id, actor=actor, to_user=user.username, to_roles=user.roles)


async def test_delegating_to_someone_without_the_role_is_refused(harness):
    h = await harness.start(order(600_000))
    task = await first_task(h)
    assert (
        await refused(h, SalesOrderWorkflow.delegate, _to(task.task_id, VP, PETE)) == "NotPermitted"
    )
    # a delegation whose target's roles the caller did not say is refused too
    assert (
        await refused(
            h,
            SalesOrderWorkflow.delegate,
            TaskActionInput(task_id=task.task_id, actor=VP, to_user="pete"),
        )
        == "InvalidDecision"
    )


async def test_a_requesting_manager_cannot_reassign_his_own_task(harness):
    h = await harness.start(order(600_000, requester="mike"))
    task = await first_task(h)
    decision = DecideInput(task_id=task.task_id, outcome="approved", actor=MIKE)
    assert await refused(h, SalesOrderWorkflow.decide, decision) == "FourEyesViolation"
    alice = Actor(username="alice", roles=["requester"])
    assert (
        await refused(h, SalesOrderWorkflow.reassign, _to(task.task_id, MIKE, alice))
        == "FourEyesViolation"
    )
    # another manager may reassign, but only to someone entitled
    assert (
        await refused(h, SalesOrderWorkflow.reassign, _to(task.task_id, MARA, alice))
        == "NotPermitted"
    )
    view = await h.execute_update(SalesOrderWorkflow.reassign, _to(task.task_id, MARA, VP))
    assert view.assignee == "victor"


async def test_a_manager_cannot_delegate_a_task_to_himself_and_decide_it(harness):
    h = await harness.start(order(600_000))
    task = await first_task(h)
    assert (
        await refused(h, SalesOrderWorkflow.delegate, _to(task.task_id, MANAGER, MANAGER))
        == "NotPermitted"
    )
    decision = DecideInput(task_id=task.task_id, outcome="approved", actor=MANAGER)
    assert await refused(h, SalesOrderWorkflow.decide, decision) == "NotPermitted"


async def test_each_approval_of_one_instance_needs_another_person(harness):
    h = await harness.start(order(1_200_000))
    vp_task = await first_task(h)
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(task_id=vp_task.task_id, outcome="approved", actor=BOTH),
    )
    sd_task = await first_task(h)
    assert sd_task.candidate_roles == ["sales-director"]
    decision = DecideInput(task_id=sd_task.task_id, outcome="approved", actor=BOTH)
    assert await refused(h, SalesOrderWorkflow.decide, decision) == "FourEyesViolation"
    # nor may the earlier approver be handed the task
    diana = Actor(username="diana", roles=["sales-director"])
    assert (
        await refused(h, SalesOrderWorkflow.delegate, _to(sd_task.task_id, diana, BOTH))
        == "FourEyesViolation"
    )
    await h.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(task_id=sd_task.task_id, outcome="approved", actor=diana),
    )
    assert (await h.result()).stage == Stage.CLOSED


async def test_a_task_takes_a_bounded_number_of_actions_then_can_still_be_decided(harness):
    harness.fakes.policy = PolicyDocument(
        process_type="sales_order",
        version=2,
        document=SalesOrderPolicy(max_actions_per_task=4).model_dump(mode="json"),
    )
    h = await harness.start(order(600_000))
    task = await first_task(h)
    for action in ("claim", "release", "claim", "release"):
        await h.execute_update(
            getattr(SalesOrderWorkflow, action), TaskActionInput(task_id=task.task_id, actor=VP)
        )
    assert (
        await refused(h, SalesOrderWorkflow.claim, TaskActionInput(task_id=task.task_id, actor=VP))
        == "Conflict"
    )
    await h.execute_update(
        SalesOrderWorkflow.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=VP)
    )
    assert (await h.result()).stage == Stage.CLOSED


async def test_update_results_stay_small_however_often_a_task_is_claimed(harness):
    h = await harness.start(order(600_000))
    task = await first_task(h)
    sizes = []
    for _ in range(30):
        for action in ("claim", "release"):
            view = await h.execute_update(
                getattr(SalesOrderWorkflow, action),
                TaskActionInput(task_id=task.task_id, actor=VP),
            )
            sizes.append(len(view.model_dump_json()))
    assert view.history_total == 61 and len(view.history) == 10
    assert max(sizes[-10:]) <= max(sizes[:10]) + 64  # no list that grows with every action
