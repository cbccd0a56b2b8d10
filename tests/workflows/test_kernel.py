"""The process kernel: a tiny process defined here on `HumanProcess` (one stage, one approval
task, an end) gets every handler, its read-model projection, stacked escalations, SLAs, waits
until an instant and cancellation from the kernel alone, on the time-skipping server."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from types import MappingProxyType

from pydantic import BaseModel
from temporalio import workflow

# the sandbox re-imports this module for each instance: what it needs besides comes through
with workflow.unsafe.imports_passed_through():
    import pytest
    import pytest_asyncio
    from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateStage
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Worker

    from tests.workflows.conftest import Fakes, start_time_skipping
    from workflows.approval import APPROVED, ApprovalLevel
    from workflows.errors import CONFLICT, FOUR_EYES, NOT_PERMITTED
    from workflows.human_task import (
        WITHDRAWN,
        Actor,
        DecideInput,
        HumanTask,
        TaskActionInput,
        TaskTimes,
    )
    from workflows.kernel import CancelInput, DecideResult, HumanProcess, ProcessStatus, Stop
    from workflows.policy import EscalationStep, TaskTimers

RITA = Actor(username="rita", roles=["reviewer"])
ROB = Actor(username="rob", roles=["reviewer"])
DIANA = Actor(username="diana", roles=["sales-director"])
MIKE = Actor(username="mike", roles=["manager"])
ALICE = Actor(username="alice", roles=["requester"])


class ReviewInput(BaseModel):
    key: str
    requester: str
    times: TaskTimes
    sla: timedelta | None = None
    hold_until: datetime | None = None
    # a cancelled review ends only once a reviewer confirmed it (a stop that takes a while)
    confirm_stop: bool = False


class ReviewStatus(ProcessStatus):
    key: str


@workflow.defn(name="kernel_test_review")
class ReviewProcess(HumanProcess):
    """A review: one approval by a reviewer, then approved or rejected."""

    PROCESS_TYPE = "kernel_test_review"
    END_STATUS = MappingProxyType(
        {"approved": "completed", "rejected": "completed", "cancelled": "cancelled"}
    )
    CANCEL_ROLES = frozenset({"manager"})

    @workflow.init
    def __init__(self, inp: ReviewInput) -> None:
        self.inp = inp
        super().__init__(business_key=inp.key, requester=inp.requester, initial_stage="new")

    def summary(self) -> dict:
        return {"key": self.inp.key}

    @workflow.run
    async def run(self, inp: ReviewInput) -> str:
        await self.set_stage("review")
        if inp.sla:
            self.start_sla("review", inp.sla)
        level = ApprovalLevel(name="review", roles=["reviewer"])
        try:
            outcome = await self.approval_level(level, "review", inp.times, "Review needed")
            if inp.hold_until:
                await self.wait_until(inp.hold_until, "the hold to end")
            await self.finish("approved" if outcome == APPROVED else "rejected", outcome)
        except Stop as stop:
            if inp.confirm_stop:
                await self._confirm(stop)
            await self.end_on_stop(stop)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.stage

    async def _confirm(self, stop: Stop) -> None:
        task: HumanTask = self.open_task(
            name="confirm the cancellation",
            kind="approval",
            roles=["reviewer"],
            outcomes=["confirmed"],
            times=self.inp.times,
        )
        await self.wait(lambda: not task.is_open, stop.reason, interruptible=False)

    @workflow.query
    def status(self) -> ReviewStatus:
        return ReviewStatus(**self.status_fields(), key=self.inp.key)


TIMES = TaskTimes(remind_after=timedelta(hours=1), deadline=timedelta(days=3))


@pytest_asyncio.fixture(scope="module")
async def ts_env():
    """A time-skipping server of this module's own (its timer tests stalled beside other files
    on the shared one, as tests/workflows/test_timers_real_activities.py says)."""
    env = await start_time_skipping()
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
async def review(ts_env: WorkflowEnvironment):
    fakes = Fakes()
    task_queue = f"tq-{uuid.uuid4()}"
    handles = []

    async def start(times: TaskTimes = TIMES, **kw):
        inp = ReviewInput(key=uuid.uuid4().hex[:8], requester="alice", times=times, **kw)
        handle = await ts_env.client.start_workflow(
            ReviewProcess.run, inp, id=f"review-{inp.key}", task_queue=task_queue
        )
        handles.append(handle)
        return handle

    async with Worker(
        ts_env.client,
        task_queue=task_queue,
        workflows=[ReviewProcess],
        activities=fakes.activities(),
    ):
        yield start, fakes
        for h in handles:
            if (await h.describe()).status.name == "RUNNING":
                await h.terminate("test ended")


def action(task_id: str, actor: Actor, **kw) -> TaskActionInput:
    return TaskActionInput(task_id=task_id, actor=actor, **kw)


async def test_inherited_handlers_claim_release_delegate_and_decide(review):
    start, fakes = review
    h = await start()
    settled = await h.execute_update(ReviewProcess.settle)
    assert settled.stage == "review"
    status = await h.query(ReviewProcess.status)
    assert isinstance(status, ReviewStatus) and status.key  # its own field decodes
    [task] = status.pending_tasks
    assert task.kind == "approval" and task.candidate_roles == ["reviewer"]

    claimed = await h.execute_update(ReviewProcess.claim, action(task.task_id, RITA))
    assert claimed.assignee == "rita"
    released = await h.execute_update(ReviewProcess.release, action(task.task_id, RITA))
    assert released.assignee is None
    delegated = await h.execute_update(
        ReviewProcess.delegate, action(task.task_id, RITA, to_user="rob", to_roles=["reviewer"])
    )
    assert delegated.assignee == "rob"
    # four-eyes from the kernel's validator: the requester may not decide
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await h.execute_update(
            ReviewProcess.decide,
            DecideInput(task_id=task.task_id, outcome="approved", actor=Actor(username="alice")),
        )
    assert isinstance(err.value.cause, ApplicationError) and err.value.cause.type == FOUR_EYES

    result = await h.execute_update(
        ReviewProcess.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=ROB)
    )
    assert isinstance(result, DecideResult)
    assert result.stage == "approved"  # a stage the sales order does not know decodes
    assert result.task.decided_by == "rob"
    assert await h.result() == "approved"

    instances = [b.instance for b in fakes.batches if b.instance is not None]
    revisions = [i.revision for i in instances]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert instances[0].stage == "review" and instances[0].status == "running"
    assert instances[0].process_type == "kernel_test_review"
    assert instances[0].summary == {"key": status.key}
    assert instances[-1].stage == "approved" and instances[-1].status == "completed"
    assert instances[-1].closed_at is not None

    visits = [v for b in fakes.batches for v in b.visits]
    assert [(v.seq, v.stage, v.left_at is not None) for v in visits] == [
        (1, "new", True),
        (2, "review", False),
        (2, "review", True),
        (3, "approved", False),
    ]
    left_review = visits[2]
    assert (left_review.outcome, left_review.by) == ("approved", "rob")
    assert left_review.left_at == visits[3].entered_at


async def test_two_level_escalation_fires_both_levels_in_order_and_widens_roles(
    review, ts_env: WorkflowEnvironment
):
    start, fakes = review
    times = TaskTimers(
        remind_after=timedelta(hours=1),
        escalations=[
            EscalationStep(after=timedelta(hours=2), to_role="manager"),
            EscalationStep(after=timedelta(hours=4), to_role="sales-director"),
        ],
        deadline=timedelta(days=1),
    ).task_times()
    h = await start(times, sla=timedelta(hours=3))
    await h.execute_update(ReviewProcess.settle)
    await ts_env.sleep(timedelta(hours=2, minutes=30))
    [task] = (await h.query(ReviewProcess.status)).pending_tasks
    assert task.candidate_roles == ["reviewer", "manager"]
    # the sales director may not decide before the second level
    with pytest.raises(WorkflowUpdateFailedError):
        await h.execute_update(
            ReviewProcess.decide,
            DecideInput(task_id=task.task_id, outcome="approved", actor=DIANA),
        )

    await ts_env.sleep(timedelta(hours=2))
    [task] = (await h.query(ReviewProcess.status)).pending_tasks
    assert task.candidate_roles == ["reviewer", "manager", "sales-director"]
    events = [e for b in fakes.batches for e in b.sla_events]
    assert [(e.kind, e.sla, e.details.get("to_role")) for e in events] == [
        ("reminded", "review", None),
        ("escalated", "review", "manager"),
        ("breached", "review", None),  # the stage SLA, from the Deadlines block
        ("escalated", "review", "sales-director"),
    ]
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert len({e.event_key for e in events}) == 4
    escalated = [m for m in fakes.mails if m.subject.startswith("Escalated:")]
    assert [m.to_roles for m in escalated] == [["manager"], ["sales-director"]]
    assert len({m.idempotency_key for m in escalated}) == 2  # the outbox sends both

    await h.execute_update(
        ReviewProcess.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=DIANA)
    )
    assert await h.result() == "approved"


async def test_wait_until_an_instant_holds_the_process(review, ts_env: WorkflowEnvironment):
    start, fakes = review
    hold_until = await ts_env.get_current_time() + timedelta(days=2)
    h = await start(hold_until=hold_until)
    [task] = (await h.execute_update(ReviewProcess.settle)).pending_tasks
    await h.execute_update(
        ReviewProcess.decide, DecideInput(task_id=task.task_id, outcome="approved", actor=ROB)
    )
    status = await h.query(ReviewProcess.status)
    assert status.stage == "review" and status.waiting_for == "the hold to end"
    assert await h.result() == "approved"
    ended = (await h.query(ReviewProcess.status)).stages[-1]
    assert ended.stage == "approved" and ended.at >= hold_until


def _refusal(err: pytest.ExceptionInfo[WorkflowUpdateFailedError]) -> str | None:
    cause = err.value.cause
    return cause.type if isinstance(cause, ApplicationError) else None


async def test_a_process_declaring_only_status_gets_settle_and_cancel_answering_its_model(
    review,
):
    start, fakes = review
    h = await start()
    # typed clients decode by the handler's annotation: the kernel's would drop `key`
    settled = await h.execute_update(ReviewProcess.settle)
    assert isinstance(settled, ReviewStatus) and settled.key
    [task] = settled.pending_tasks

    # neither the requester nor one of CANCEL_ROLES: refused by the kernel's validator
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await h.execute_update(ReviewProcess.cancel, CancelInput(reason="not mine", actor=ROB))
    assert _refusal(err) == NOT_PERMITTED
    assert "only the requester or one of the roles manager" in str(err.value.cause)

    cancelled = await h.execute_update(
        ReviewProcess.cancel, CancelInput(reason="budget cut", actor=MIKE)
    )
    assert isinstance(cancelled, ReviewStatus) and cancelled.key == settled.key
    assert (cancelled.stage, cancelled.pending_tasks) == ("cancelled", [])
    assert cancelled.outcome_reason == "cancelled by mike: budget cut"
    [decision] = cancelled.decisions
    assert (decision.task_id, decision.outcome) == (task.task_id, WITHDRAWN)
    assert await h.result() == "cancelled"

    # the visit the cancellation ended says who ended it and how
    visits = [v for b in fakes.batches for v in b.visits]
    left = [v for v in visits if v.stage == "review" and v.left_at is not None]
    assert [(v.outcome, v.by) for v in left] == [("cancelled", "mike")]
    last = [b.instance for b in fakes.batches if b.instance is not None][-1]
    assert (last.stage, last.status) == ("cancelled", "cancelled")


async def test_a_second_cancellation_while_one_is_under_way_is_a_conflict(review):
    start, _ = review
    h = await start(confirm_stop=True)
    await h.execute_update(ReviewProcess.settle)
    first = await h.start_update(
        ReviewProcess.cancel,
        CancelInput(reason="withdrawn", actor=ALICE),
        wait_for_stage=WorkflowUpdateStage.ACCEPTED,
    )
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await h.execute_update(ReviewProcess.cancel, CancelInput(reason="again", actor=MIKE))
    assert _refusal(err) == CONFLICT
    assert str(err.value.cause).endswith("the process is already being cancelled")

    # the stop waits for its confirmation: the review task is still open beside it
    status = await h.execute_update(ReviewProcess.settle)
    assert sorted(t.name for t in status.pending_tasks) == ["confirm the cancellation", "review"]
    [confirm] = [t for t in status.pending_tasks if t.name == "confirm the cancellation"]
    await h.execute_update(
        ReviewProcess.decide, DecideInput(task_id=confirm.task_id, outcome="confirmed", actor=ROB)
    )
    cancelled = await first.result()
    assert isinstance(cancelled, ReviewStatus)
    assert cancelled.stage == "cancelled" and cancelled.pending_tasks == []
    assert cancelled.outcome_reason == "cancelled by the requester: withdrawn"
    assert await h.result() == "cancelled"
