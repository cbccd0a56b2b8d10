"""The read model follows instances that Temporal closes: abnormally (terminated, timed out,
failed, canceled), and completed ones whose instance row still says running.

The read model (orders, tasks, audit trail) is written by the workflows themselves, through the
`project` activity (activities/records.py). An instance that Temporal ends from outside (an
operator's terminate or cancel, the history size limit, an execution timeout, a workflow
failure) never projects its end: its order stayed in its last stage and its open tasks stayed
in every inbox. The `ReadModelReconciler` runs beside each worker, like the mail dispatcher:
each round it asks Temporal visibility for this project's executions that closed abnormally
since its watermark, and `apply_abnormal_end` writes each end into the read model once:
- the instance's row (`process_instances`, any process type) gets the status of the close and
  its close time, and the stage visit it sat in is left then, with the end as its outcome;
- the instance's open tasks are closed with outcome "aborted" at the close time, at revision
  `FINAL_REVISION`, so that a late snapshot of the workflow (lower revision) cannot reopen them;
- its order's stage says what happened ("terminated", "timed_out", "failed", "canceled"),
  unless the order had already reached a final stage of its own (e.g. closed);
- an audit entry (actor "system", action "instance_ended") keyed by workflow and run.
An execution that completed closes its instance row too (`apply_completion`), should the
workflow not have projected its end itself (older code projects stages, not statuses).
Every write is conditional (UPDATE ... WHERE status = 'open', INSERT ... ON CONFLICT DO
NOTHING), so any number of reconcilers may apply one end at once, on SQLite and PostgreSQL,
and the later ones change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client, WorkflowExecutionStatus

from activities.background import BackgroundLoop
from activities.records import insert_or_ignore
from core.db import (
    AuditEntry,
    BlueprintCurrent,
    Order,
    ProcessInstance,
    StageVisit,
    TaskRow,
    utcnow,
)
from core.temporal import PROCESS_TYPE

log = logging.getLogger(__name__)

# the stage an order shows for each abnormal end, and the status's name in visibility queries
ENDED_STAGES: dict[WorkflowExecutionStatus, str] = {
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.TIMED_OUT: "timed_out",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "canceled",
}
_VISIBILITY_STATUS: dict[WorkflowExecutionStatus, str] = {
    WorkflowExecutionStatus.TERMINATED: "Terminated",
    WorkflowExecutionStatus.TIMED_OUT: "TimedOut",
    WorkflowExecutionStatus.FAILED: "Failed",
    WorkflowExecutionStatus.CANCELED: "Canceled",
}
# the status of the instance row (activities/models.py InstanceStatus) for each close status;
# a timed-out execution failed (the statuses a process projects have no "timed out")
INSTANCE_STATUS: dict[WorkflowExecutionStatus, str] = {
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
}
RUNNING = "running"
ABORTED = "aborted"  # the outcome of a task whose instance ended before it was decided
ENDED_ACTION = "instance_ended"
SYSTEM_ACTOR = "system"
# above any revision a workflow writes (and the largest value of PostgreSQL's INTEGER)
FINAL_REVISION = 2**31 - 1
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class AbnormalEnd:
    """One execution that Temporal closed with an abnormal status."""

    workflow_id: str
    run_id: str
    status: WorkflowExecutionStatus
    closed_at: datetime

    @property
    def stage(self) -> str:
        return ENDED_STAGES[self.status]

    @property
    def event_key(self) -> str:
        return f"{self.workflow_id}:ended:{self.run_id}"


@dataclass(frozen=True)
class Applied:
    """What applying one end changed in the read model (nothing, when applied before)."""

    end: AbnormalEnd
    order_no: str | None = None  # the order whose stage was set
    tasks_closed: list[str] = field(default_factory=list)
    audited: bool = False
    instance_closed: bool = False  # the instance row went from running to the end's status

    @property
    def changed(self) -> bool:
        return (
            self.order_no is not None
            or bool(self.tasks_closed)
            or self.audited
            or self.instance_closed
        )


async def _close_instance(
    session: AsyncSession, workflow_id: str, status: WorkflowExecutionStatus, closed_at: datetime
) -> bool:
    """The instance row, still running and not written after the close (a later run's), takes
    the close's status and time; whether it did."""
    closed = await session.scalar(
        update(ProcessInstance)
        .where(ProcessInstance.workflow_id == workflow_id, ProcessInstance.status == RUNNING)
        .where(ProcessInstance.updated_at <= closed_at)
        .values(status=INSTANCE_STATUS[status], closed_at=closed_at, updated_at=closed_at)
        .returning(ProcessInstance.workflow_id)
        .execution_options(synchronize_session=False)
    )
    return closed is not None


async def apply_abnormal_end(
    session_factory: async_sessionmaker,
    end: AbnormalEnd,
    *,
    final_stages: Collection[str] = (),
) -> Applied:
    """Write one abnormal end into the read model, in one transaction; applying it again (or
    concurrently elsewhere) changes nothing.

    Only rows of this run are touched: an order updated, or a task created, after the close
    belongs to a later run of the same workflow id and is left alone. An order already in one
    of `final_stages` keeps it. The audit entry is written only when the read model knows the
    instance (a database of another deployment on the same Temporal namespace gets nothing).
    Statements run in the order `project` takes its locks (instance, order, visits, tasks,
    audit).
    """
    wid = end.workflow_id
    keep = sorted({*ENDED_STAGES.values(), *final_stages})
    async with session_factory.begin() as session:
        instance_closed = await _close_instance(session, wid, end.status, end.closed_at)
        order_no = await session.scalar(
            update(Order)
            .where(Order.workflow_id == wid, Order.stage.not_in(keep))
            .where(Order.updated_at <= end.closed_at)
            .values(stage=end.stage, updated_at=end.closed_at)
            .returning(Order.order_no)
            .execution_options(synchronize_session=False)
        )
        if instance_closed:  # it sits in no stage any more
            await session.execute(
                update(StageVisit)
                .where(StageVisit.workflow_id == wid, StageVisit.left_at.is_(None))
                .where(StageVisit.entered_at <= end.closed_at)
                .values(left_at=end.closed_at, outcome=end.stage, by=SYSTEM_ACTOR)
                .execution_options(synchronize_session=False)
            )
        closed = (
            await session.scalars(
                update(TaskRow)
                .where(TaskRow.workflow_id == wid, TaskRow.status == "open")
                .where(TaskRow.created_at <= end.closed_at)
                .values(
                    status="closed",
                    outcome=ABORTED,
                    closed_at=end.closed_at,
                    revision=FINAL_REVISION,
                )
                .returning(TaskRow.task_id)
                .execution_options(synchronize_session=False)
            )
        ).all()
        audited = False
        if instance_closed or order_no is not None or closed or await _known(session, end):
            audited = (
                await session.scalar(
                    insert_or_ignore(session, AuditEntry)
                    .values(
                        event_key=end.event_key,
                        workflow_id=wid,
                        task_id=None,
                        actor=SYSTEM_ACTOR,
                        action=ENDED_ACTION,
                        comment=f"the instance ended in Temporal with status {end.status.name}",
                        details={
                            "status": end.status.name,
                            "run_id": end.run_id,
                            "stage": end.stage,
                            "order_no": order_no,
                            "instance_closed": instance_closed,
                            "tasks_closed": sorted(closed),
                        },
                        at=end.closed_at,
                    )
                    .returning(AuditEntry.id)
                )
            ) is not None
    return Applied(
        end=end,
        order_no=order_no,
        tasks_closed=sorted(closed),
        audited=audited,
        instance_closed=instance_closed,
    )


async def apply_completion(
    session_factory: async_sessionmaker, workflow_id: str, closed_at: datetime
) -> bool:
    """Close the instance row of an execution that completed, if it still says running (its
    workflow projected stages but not its end); whether it changed. Idempotent."""
    async with session_factory.begin() as session:
        return await _close_instance(
            session, workflow_id, WorkflowExecutionStatus.COMPLETED, closed_at
        )


async def _known(session: AsyncSession, end: AbnormalEnd) -> bool:
    """Whether this database holds an instance, an order or a task of the ended run."""
    wid, at = end.workflow_id, end.closed_at
    instance = exists().where(ProcessInstance.workflow_id == wid, ProcessInstance.started_at <= at)
    order = exists().where(Order.workflow_id == wid, Order.created_at <= at)
    task = exists().where(TaskRow.workflow_id == wid, TaskRow.created_at <= at)
    return any([bool(await session.scalar(select(e))) for e in (instance, order, task)])


def _closed_query(process_types: Sequence[str], statuses: Sequence[str], since: datetime) -> str:
    types = ", ".join(f"'{t}'" for t in process_types)
    listed = ", ".join(f"'{s}'" for s in statuses)
    return (
        f"{PROCESS_TYPE.name} IN ({types}) AND ExecutionStatus IN ({listed}) "
        f"AND CloseTime > '{since.isoformat()}'"
    )


def abnormal_ends_query(process_types: Sequence[str], since: datetime) -> str:
    """The visibility query for this project's executions that closed abnormally after `since`."""
    return _closed_query(process_types, list(_VISIBILITY_STATUS.values()), since)


def completions_query(process_types: Sequence[str], since: datetime) -> str:
    """The visibility query for this project's executions that completed after `since`."""
    return _closed_query(process_types, ["Completed"], since)


class ReadModelReconciler(BackgroundLoop):
    """Writes abnormal ends into the read model; one per worker process, any number of them.

    The watermark lives in memory: it starts `lookback_s` back (a worker that starts catches
    up on what ended while none ran) and after each complete round moves to the round's start
    less `overlap_s`, so that an end that visibility lists late (it is eventually consistent,
    and the worker's clock is not the server's) is still found. Ends seen again are applied
    again, which changes nothing.
    """

    task_name = "read-model-reconciler"

    def __init__(
        self,
        client: Client,
        session_factory: async_sessionmaker,
        *,
        poll_s: float = 30.0,
        lookback_s: float = 86400.0,
        process_types: Sequence[str],
        final_stages: Collection[str] = (),
        overlap_s: float = 300.0,
        page_size: int = 100,
        rpc_timeout_s: float = 10.0,
    ) -> None:
        if not process_types:
            raise ValueError("process_types: name at least one process type")
        for name in process_types:
            if not _PLAIN_NAME.match(name):
                raise ValueError(f"process_types: {name!r} is not a plain process type name")
        self._client = client
        self._sessions = session_factory
        self.poll_s = poll_s
        self.process_types = list(process_types)
        self.final_stages = frozenset(str(s) for s in final_stages)
        self.overlap = timedelta(seconds=overlap_s)
        self.page_size = page_size
        self.rpc_timeout = timedelta(seconds=rpc_timeout_s)
        self.watermark = utcnow() - timedelta(seconds=lookback_s)
        self.applied = 0  # ends whose read model this reconciler changed
        self.completions_closed = 0  # completed instances whose row it closed
        super().__init__()

    # ---------------------------------------------------------------- lifecycle
    async def stop(self, grace_s: float = 15.0) -> None:
        """Let the running round finish (at most `grace_s`), then return (stopped by a flag:
        activities/background.py says why)."""
        await self.halt(grace_s)

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.reconcile()
            except Exception:  # Temporal or the database is away: try again at the next poll
                log.exception("read-model reconciler: round failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._stopping.wait()

    # ---------------------------------------------------------------- one round
    async def reconcile(self) -> list[Applied]:
        """One round: apply every abnormal end since the watermark, then close the instance
        rows of completed executions that still say running; returns the abnormal ends that
        changed the read model. The watermark moves only when the round completed."""
        started = utcnow()
        changed: list[Applied] = []
        types = await self._types()
        async with contextlib.aclosing(self._abnormal_ends(types, self.watermark)) as ends:
            async for end in ends:
                if self._stopping.is_set():
                    return changed
                applied = await apply_abnormal_end(
                    self._sessions, end, final_stages=self.final_stages
                )
                if applied.changed:
                    self.applied += 1
                    changed.append(applied)
                    log.info(
                        "%s (run %s) ended %s: stage %s, tasks aborted %s",
                        end.workflow_id,
                        end.run_id,
                        end.status.name,
                        end.stage if applied.order_no is not None else "unchanged",
                        applied.tasks_closed,
                    )
        async with contextlib.aclosing(self._completions(types, self.watermark)) as completions:
            async for workflow_id, closed_at in completions:
                if self._stopping.is_set():
                    return changed
                if await apply_completion(self._sessions, workflow_id, closed_at):
                    self.completions_closed += 1
                    log.info("%s completed: its instance row closed", workflow_id)
        self.watermark = max(self.watermark, started - self.overlap)
        return changed

    async def _types(self) -> list[str]:
        """The coded types it was given, and every blueprint process published so far (their
        instances end abnormally too; a publish needs no worker restart)."""
        async with self._sessions() as session:
            published = (await session.scalars(select(BlueprintCurrent.process))).all()
        extra = [p for p in published if _PLAIN_NAME.match(p) and p not in self.process_types]
        return [*self.process_types, *sorted(extra)]

    async def _completions(
        self, types: Sequence[str], since: datetime
    ) -> AsyncGenerator[tuple[str, datetime], None]:
        executions = self._client.list_workflows(
            completions_query(types, since),
            page_size=self.page_size,
            rpc_timeout=self.rpc_timeout,
        )
        async for execution in executions:
            if (
                execution.status == WorkflowExecutionStatus.COMPLETED
                and execution.close_time is not None
            ):
                yield execution.id, execution.close_time

    async def _abnormal_ends(
        self, types: Sequence[str], since: datetime
    ) -> AsyncGenerator[AbnormalEnd, None]:
        executions = self._client.list_workflows(
            abnormal_ends_query(types, since),
            page_size=self.page_size,
            rpc_timeout=self.rpc_timeout,
        )
        async for execution in executions:
            status, closed_at = execution.status, execution.close_time
            if status is not None and status in ENDED_STAGES and closed_at is not None:
                yield AbnormalEnd(
                    workflow_id=execution.id,
                    run_id=execution.run_id,
                    status=status,
                    closed_at=closed_at,
                )
