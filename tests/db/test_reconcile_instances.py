"""The reconciler closes instance rows whose workflow has closed, for every process type and not
only orders: the apply steps on SQLite and PostgreSQL, and a round against the real dev server
with instances of a process type that has no order."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio import workflow
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.testing import ActivityEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.models import InstanceRecord, ProjectionBatch, StageVisitRecord
from activities.reconcile import (
    AbnormalEnd,
    ReadModelReconciler,
    apply_abnormal_end,
    apply_completion,
    completions_query,
)
from activities.records import RecordActivities
from core.db import AuditEntry, ProcessInstance, StageVisit
from core.temporal import PROCESS_TYPE

T0 = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
TICKET = "test_ticket"  # a process type with no extension table


def _record(workflow_id: str, *, at: datetime = T0, revision: int = 1) -> InstanceRecord:
    return InstanceRecord(
        workflow_id=workflow_id,
        process_type=TICKET,
        business_key=workflow_id.rsplit("-", 1)[1],
        definition_kind="blueprint",
        definition_version="ab12",
        stage="resolve",
        requester="alice",
        started_at=at,
        stage_entered_at=at,
        revision=revision,
    )


async def _project_running(sessions: async_sessionmaker, workflow_id: str, at: datetime = T0):
    await ActivityEnvironment().run(
        RecordActivities(sessions).project,
        ProjectionBatch(
            instance=_record(workflow_id, at=at),
            visits=[
                StageVisitRecord(
                    workflow_id=workflow_id,
                    seq=1,
                    stage="acknowledge",
                    entered_at=at,
                    left_at=at,
                    outcome="acknowledged",
                    by="sam",
                ),
                StageVisitRecord(workflow_id=workflow_id, seq=2, stage="resolve", entered_at=at),
            ],
        ),
    )


async def _instance(sessions: async_sessionmaker, workflow_id: str) -> ProcessInstance:
    async with sessions() as s:
        row = await s.get(ProcessInstance, workflow_id)
    assert row is not None
    return row


async def _visits(sessions: async_sessionmaker, workflow_id: str) -> list[tuple]:
    async with sessions() as s:
        rows = await s.scalars(
            select(StageVisit).where(StageVisit.workflow_id == workflow_id).order_by("seq")
        )
        return [(v.seq, v.stage, v.left_at, v.outcome, v.by) for v in rows]


async def test_an_abnormal_end_closes_the_instance_of_any_type_and_its_visit(sessions):
    wid = "test_ticket-T-1"
    await _project_running(sessions, wid)
    closed_at = T0 + timedelta(hours=2)
    end = AbnormalEnd(wid, "run-1", WorkflowExecutionStatus.TERMINATED, closed_at)

    applied = await apply_abnormal_end(sessions, end)
    again = await apply_abnormal_end(sessions, end)

    assert applied.instance_closed and applied.audited and applied.order_no is None
    assert not again.changed
    row = await _instance(sessions, wid)
    assert (row.status, row.closed_at, row.stage) == ("terminated", closed_at, "resolve")
    assert await _visits(sessions, wid) == [
        (1, "acknowledge", T0, "acknowledged", "sam"),  # left before: kept as it was
        (2, "resolve", closed_at, "terminated", "system"),
    ]
    async with sessions() as s:
        [entry] = (await s.scalars(select(AuditEntry))).all()
    assert (entry.event_key, entry.details["instance_closed"]) == (f"{wid}:ended:run-1", True)


async def test_each_abnormal_status_gives_its_instance_status(sessions):
    statuses = {
        WorkflowExecutionStatus.FAILED: "failed",
        WorkflowExecutionStatus.CANCELED: "cancelled",
        WorkflowExecutionStatus.TIMED_OUT: "failed",
    }
    for n, (status, expected) in enumerate(statuses.items()):
        wid = f"test_ticket-S-{n}"
        await _project_running(sessions, wid)
        await apply_abnormal_end(sessions, AbnormalEnd(wid, "r", status, T0 + timedelta(hours=1)))
        assert (await _instance(sessions, wid)).status == expected, status


async def test_a_completion_closes_a_running_row_only(sessions):
    running, later = "test_ticket-C-1", "test_ticket-C-2"
    await _project_running(sessions, running)
    # written after the close: the row belongs to a later run of the workflow id
    await _project_running(sessions, later, at=T0 + timedelta(days=1))
    closed_at = T0 + timedelta(hours=3)

    assert await apply_completion(sessions, running, closed_at)
    assert not await apply_completion(sessions, running, closed_at + timedelta(hours=1))
    assert not await apply_completion(sessions, later, closed_at)
    assert not await apply_completion(sessions, "test_ticket-unknown", closed_at)

    row = await _instance(sessions, running)
    assert (row.status, row.closed_at, row.updated_at) == ("completed", closed_at, closed_at)
    assert (await _instance(sessions, later)).status == "running"
    # a completion is the workflow's own end: its visits are its own to close
    assert (await _visits(sessions, running))[-1][2] is None


def test_completions_query_names_the_types_and_close_time():
    assert completions_query([TICKET, "sales_order"], T0) == (
        "ProcessType IN ('test_ticket', 'sales_order') AND ExecutionStatus IN ('Completed') "
        "AND CloseTime > '2026-12-02T08:00:00+00:00'"
    )


@workflow.defn(name="TestTicketWorkflow")
class TicketWorkflow:
    """A process of another type that projects nothing of its end: it returns at once, or
    waits until it is terminated."""

    @workflow.run
    async def run(self, hold: bool) -> None:
        if hold:
            await workflow.wait_condition(lambda: False)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.3)


async def test_a_reconciler_round_closes_finished_instances_of_another_type(dev_env, sessions):
    client = dev_env.client
    queue = f"tickets-{uuid.uuid4()}"
    suffix = uuid.uuid4().hex[:8]
    held, done = f"test_ticket-H{suffix}", f"test_ticket-D{suffix}"
    attrs = TypedSearchAttributes([SearchAttributePair(PROCESS_TYPE, TICKET)])
    reconciler = ReadModelReconciler(client, sessions, lookback_s=600, process_types=[TICKET])
    async with Worker(
        client,
        task_queue=queue,
        workflows=[TicketWorkflow],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        now = datetime.now(UTC) - timedelta(minutes=1)
        for wid in (held, done):
            await _project_running(sessions, wid, at=now)
        handle = await client.start_workflow(
            TicketWorkflow.run, True, id=held, task_queue=queue, search_attributes=attrs
        )
        await client.execute_workflow(
            TicketWorkflow.run, False, id=done, task_queue=queue, search_attributes=attrs
        )
        await handle.terminate("operator ended it")

    async def both_closed() -> bool:
        await reconciler.reconcile()  # visibility is eventually consistent: ask again
        rows = [await _instance(sessions, wid) for wid in (held, done)]
        return all(r.status != "running" for r in rows)

    await until(both_closed, 60, "the reconciler closes both instance rows")
    terminated, completed = await _instance(sessions, held), await _instance(sessions, done)
    assert terminated.status == "terminated"
    assert completed.status == "completed"
    assert (await handle.describe()).close_time == terminated.closed_at
    assert terminated.closed_at is not None and completed.closed_at is not None
    assert (reconciler.applied, reconciler.completions_closed) == (1, 1)
    # another round changes nothing
    assert await reconciler.reconcile() == []
    assert (reconciler.applied, reconciler.completions_closed) == (1, 1)
    assert (await _instance(sessions, held)).closed_at == terminated.closed_at


async def test_a_reconciler_watches_every_published_blueprint_without_a_restart(dev_env, sessions):
    """Given only the coded types, it still closes the row of a terminated instance of a
    blueprint published in the database (the test type stands for it)."""
    from core.db import BlueprintCurrent, BlueprintVersion, utcnow

    client = dev_env.client
    queue = f"tickets-{uuid.uuid4()}"
    held = f"test_ticket-B{uuid.uuid4().hex[:8]}"
    reconciler = ReadModelReconciler(
        client, sessions, lookback_s=600, process_types=["sales_order"]
    )
    assert await reconciler._types() == ["sales_order"]
    async with sessions.begin() as s:
        s.add(
            BlueprintVersion(
                version="sha256:" + "1" * 64,
                process=TICKET,
                seq=1,
                title="Ticket",
                document="{}",
                published_by="ada",
                published_at=utcnow(),
            )
        )
        await s.flush()
        s.add(
            BlueprintCurrent(
                process=TICKET, version="sha256:" + "1" * 64, updated_at=utcnow(), updated_by="ada"
            )
        )
    assert await reconciler._types() == ["sales_order", TICKET]
    attrs = TypedSearchAttributes([SearchAttributePair(PROCESS_TYPE, TICKET)])
    async with Worker(
        client,
        task_queue=queue,
        workflows=[TicketWorkflow],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        await _project_running(sessions, held, at=datetime.now(UTC) - timedelta(minutes=1))
        handle = await client.start_workflow(
            TicketWorkflow.run, True, id=held, task_queue=queue, search_attributes=attrs
        )
        await handle.terminate("operator ended it")

    async def closed() -> bool:
        await reconciler.reconcile()
        return (await _instance(sessions, held)).status == "terminated"

    await until(closed, 60, "the reconciler closes the blueprint instance's row")
