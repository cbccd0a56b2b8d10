"""One projection per wait (`projection-per-wait`): the writes of every step between two waits go
out in one `project` local activity with one search-attribute upsert, and a decision answers
once the step it caused is written. Counted from the histories of real runs on the
time-skipping server (fake activities, tests/workflows/conftest.py)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from types import MappingProxyType

from pydantic import BaseModel
from temporalio import workflow

# the sandbox re-imports this module for each instance: what it needs besides comes through
with workflow.unsafe.imports_passed_through():
    import pytest
    from temporalio.api.history.v1 import HistoryEvent
    from temporalio.client import WorkflowFailureError, WorkflowHandle
    from temporalio.exceptions import ApplicationError
    from temporalio.worker import Worker

    from tests.workflows.conftest import SD, VP, Fakes, order
    from workflows.human_task import DecideInput, TaskTimes
    from workflows.kernel import CALENDAR_ERROR, HumanProcess
    from workflows.sales_order import SalesOrderWorkflow, Stage


@dataclass
class Commands:
    events: int
    projections: int  # `project` local activities
    upserts: int  # search-attribute upserts of the process (not the SDK's TemporalChangeVersion)
    last_upsert: dict[str, object]


def commands(events: list[HistoryEvent]) -> Commands:
    projections = upserts = 0
    last: dict[str, object] = {}
    for e in events:
        if e.HasField("marker_recorded_event_attributes"):
            marker = e.marker_recorded_event_attributes
            if marker.marker_name == "core_local_activity":
                data = json.loads(marker.details["data"].payloads[0].data)
                projections += data["activity_type"] == "project"
        if e.HasField("upsert_workflow_search_attributes_event_attributes"):
            fields = e.upsert_workflow_search_attributes_event_attributes.search_attributes
            values = {k: json.loads(v.data) for k, v in fields.indexed_fields.items()}
            values.pop("TemporalChangeVersion", None)
            if values:
                upserts += 1
                last = values
    return Commands(len(events), projections, upserts, last)


async def history(handle: WorkflowHandle) -> list[HistoryEvent]:
    return [e async for e in handle.fetch_history_events()]


async def decide(handle: WorkflowHandle, task_id: str, actor, outcome: str = "approved"):
    return await handle.execute_update(
        SalesOrderWorkflow.decide, DecideInput(task_id=task_id, outcome=outcome, actor=actor)
    )


def stage_entries(fakes: Fakes, batch_index: int) -> list[str]:
    return [a.comment for a in fakes.batches[batch_index].audit if a.action == "stage"]


async def test_an_order_reaches_its_first_approval_task_with_one_projection_and_one_upsert(
    harness,
):
    inp = order(1_200_000)
    h = await harness.start(inp)
    [task] = (await h.execute_update(SalesOrderWorkflow.settle)).pending_tasks
    seen = commands(await history(h))
    # one per stage change before (validated, approval, the wait): 3 projections, 3 upserts
    assert (seen.projections, seen.upserts) == (1, 1)
    # the one upsert carries the Stage and PendingRoles of the moment the instance waits
    assert seen.last_upsert["Stage"] == "approval"
    assert seen.last_upsert["PendingRoles"] == ["vice-president"]
    assert seen.last_upsert["ProcessType"] == "sales_order"
    # the one projection carries every step: both stages, the task and every mail
    [batch] = harness.fakes.batches
    assert stage_entries(harness.fakes, 0) == ["validated", "approval"]
    assert [t.task_id for t in batch.tasks] == [task.task_id]
    assert batch.order is not None and batch.instance is not None
    assert batch.instance.stage == "approval"
    assert [v.stage for v in batch.visits] == ["received", "validated", "approval"]
    assert [m.subject for m in batch.mails] == [
        f"Order {inp.order_no}: validated",
        f"Order {inp.order_no}: approval",
        f"Approval needed: order {inp.order_no}",
    ]


async def test_a_final_approval_answers_in_the_stage_right_after_it_and_the_order_closes(harness):
    inp = order(1_200_000)
    h = await harness.start(inp)
    [vp_task] = (await h.execute_update(SalesOrderWorkflow.settle)).pending_tasks
    between = await decide(h, vp_task.task_id, VP)
    assert between.stage == Stage.APPROVAL  # the next level opened at once: its task is in
    [sd_task] = (await h.query(SalesOrderWorkflow.status)).pending_tasks
    before_decision = len(await history(h))
    written = len(harness.fakes.batches)
    answer = await decide(h, sd_task.task_id, SD)
    # answered once the step the decision caused was written, before the capture (before:
    # only once the order had run to closed, 4 activities and 6 projections later)
    assert answer.stage == Stage.PAYMENT
    assert answer.task.outcome == "approved"
    step = harness.fakes.batches[written]
    assert [(t.task_id, t.outcome) for t in step.tasks] == [(sd_task.task_id, "approved")]
    assert stage_entries(harness.fakes, written) == ["payment"]
    result = await h.result()
    assert result.stage == Stage.CLOSED and result.invoice_no == f"INV-{inp.order_no}"
    # the automated steps after the answer wrote once, at the end
    after = commands((await history(h))[before_decision:])
    assert (after.projections, after.upserts) == (2, 2)  # before: 6 and 6
    assert stage_entries(harness.fakes, written + 1) == [
        "paid",
        "stock_reserved",
        f"shipped: tracking TRK-{inp.order_no}",
        f"invoiced: invoice INV-{inp.order_no}",
        "closed: order closed",
    ]
    assert after.last_upsert == {"Stage": "closed"}
    assert len(harness.fakes.batches) == written + 2


async def test_a_failed_business_step_writes_the_steps_before_it_with_its_compensation(harness):
    """An activity that fails between two waits loses nothing: the steps before it (payment,
    paid) were kept in the batch and go out with the compensation path's writes."""
    harness.fakes.out_of_stock.add("SKU-MUG")
    inp = order(400)
    h = await harness.start(inp)
    result = await h.result()
    assert result.stage == Stage.FAILED and result.refunded == result.paid
    # no wait at all: one projection for the whole order (before: one per stage, 7)
    assert commands(await history(h)).projections == 1
    [batch] = harness.fakes.batches
    actions = [a.action for a in batch.audit]
    assert actions.index("payment_captured") < actions.index("payment_refunded")
    assert stage_entries(harness.fakes, 0) == [
        "validated",
        "payment",
        "paid",
        "failed: reserve stock failed: out of stock: ['SKU-MUG']",
    ]
    assert [m.subject for m in batch.mails] == [
        f"Order {inp.order_no}: {s}" for s in ("validated", "payment", "paid", "failed")
    ]
    # every visit, the one the failure left too
    assert [(v.stage, v.left_at is not None) for v in batch.visits] == [
        ("received", True),
        ("validated", True),
        ("payment", True),
        ("paid", True),
        ("failed", False),
    ]
    assert batch.instance is not None and batch.instance.status == "failed"


async def test_a_cancellation_writes_its_compensation_once_at_the_end(harness):
    """The cancel update answers at the end: the task it withdraws, the refund and the end
    stage go out in one projection (before: one for the withdrawal, one for the end)."""
    from workflows.sales_order import CancelInput, PaymentEvent

    from .conftest import MANAGER

    h = await harness.start(order(1000, variant="prepaid_entry"))
    st = await h.execute_update(SalesOrderWorkflow.settle)
    [gate] = st.pending_tasks
    await h.execute_update(SalesOrderWorkflow.pay, PaymentEvent(event_id="ev-1", amount=500))
    written = len(harness.fakes.batches)
    st = await h.execute_update(
        SalesOrderWorkflow.cancel, CancelInput(reason="customer withdrew", actor=MANAGER)
    )
    assert st.stage == Stage.CANCELLED and st.refunded == 500
    ended = harness.fakes.batches[written:]
    assert len(ended) == 1
    [withdrawn] = [t for t in ended[0].tasks if t.task_id == gate.task_id]
    assert withdrawn.outcome == "withdrawn"
    assert [a.action for a in ended[0].audit][-2:] == ["payment_refunded", "stage"]


# ----------------------------------------------------------------------------- a step that fails
NO_CALENDAR_TIMES = TaskTimes.model_validate({"business_time": True, "deadline": "P2D"})


class ChecklistInput(BaseModel):
    key: str


@workflow.defn(name="projection_test_checklist")
class ChecklistProcess(HumanProcess):
    """Enters a stage, then opens a task whose business-time due cannot be computed (no
    calendar): the workflow fails as the kernel says, with what it did written first."""

    PROCESS_TYPE = "projection_test_checklist"
    END_STATUS = MappingProxyType({"done": "completed"})

    @workflow.init
    def __init__(self, inp: ChecklistInput) -> None:
        super().__init__(business_key=inp.key, requester="alice", initial_stage="new")

    @workflow.run
    async def run(self, inp: ChecklistInput) -> str:
        await self.set_stage("preparing", "gathering the list")
        await self.step("check", self._check)
        await self.finish("done", "checked")
        return self.stage

    async def _check(self) -> None:
        self.open_task(
            name="check",
            kind="approval",
            roles=["reviewer"],
            outcomes=["ok"],
            times=NO_CALENDAR_TIMES,
        )
        await self.wait(lambda: False, "the check")


async def test_a_step_that_fails_the_workflow_writes_the_steps_before_it(ts_env):
    fakes = Fakes()
    queue = f"tq-{uuid.uuid4()}"
    async with Worker(
        ts_env.client,
        task_queue=queue,
        workflows=[ChecklistProcess],
        activities=fakes.activities(),
    ):
        handle = await ts_env.client.start_workflow(
            ChecklistProcess.run,
            ChecklistInput(key=uuid.uuid4().hex[:8]),
            id=f"checklist-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
        with pytest.raises(WorkflowFailureError) as err:
            await handle.result()
    cause = err.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == CALENDAR_ERROR
    # the stage it entered reached the read model although no wait followed
    [batch] = fakes.batches
    assert [a.comment for a in batch.audit if a.action == "stage"] == [
        "preparing: gathering the list"
    ]
    assert batch.instance is not None and batch.instance.stage == "preparing"
