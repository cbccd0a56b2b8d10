"""What every process workflow needs around its human tasks, kept in one place:

- the read-model projection (tasks, stage, audit) and the steps' mails batched into one
  `project` local activity (mails are queued in the outbox in the same transaction; the
  worker's mail dispatcher sends them): one per wait since `projection-per-wait` (below), one
  per step before;
- the PendingRoles search attribute and the instance's current details kept current;
- waiting for a condition while firing every due time: task timers (reminder, escalation
  levels, deadline) from the board, and stage/process SLAs and waits until an instant from
  the `Deadlines` block beside it (each an absolute instant, computed when it started);
- "settling": an update handler that changed something waits until the main loop has acted on
  it and is waiting again, so the caller's response already reflects the process's next state
  (and the next task is already in the inbox).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate

with workflow.unsafe.imports_passed_through():
    from activities.models import (
        AuditRecord,
        Notification,
        ProjectionBatch,
        StageChange,
        TaskSnapshot,
    )
    from activities.notifications import NotificationActivities
    from activities.records import RecordActivities
    from core.temporal import PENDING_ROLES

from workflows.human_task import HumanTask, TaskBoard

# Since 2026-11-23: the projection and policy lookup run as local activities (in the workflow
# task, no server round trip), a step's mails go into the projection's transaction (outbox)
# instead of one `notify` activity each, a step's search attributes go out in one upsert with
# the projection, and update handlers leave the projection to the main loop, which writes it
# before it settles them. Instances started before keep the old commands
# for their whole life (tests/histories replay both).
LOCAL_PROJECTION = "local-projection-outbox"
# Since 2026-12 (issue 12): the writes of every step between two waits (stage changes, task
# snapshots, audit, mails, instance record and visits) go out in one projection, with one
# search-attribute upsert carrying the Stage / PendingRoles of that moment, when the instance is
# about to wait, ends or continues as new; no longer one per stage change. An update that waits
# for its step (`settled`) is answered as soon as that step is written: at the next wait, or
# before the next business activity when the step leads into one (`before_activity`), no longer
# after every automated step that follows. What a business activity's failure interrupts stays
# in the batch and is written with the compensation path's writes (nothing is lost: the batch
# lives in the workflow, and a replay rebuilds it). Instances started before keep one
# projection per step.
PROJECTION_PER_WAIT = "projection-per-wait"
A = TypeVar("A")
R = TypeVar("R")
BOOKKEEPING_TIMEOUT = timedelta(seconds=30)


# A failed projection is a busy or briefly unreachable database: retry soon, and keep trying
# (the workflow task heartbeats meanwhile; past a minute the SDK waits on a durable timer).
def local_retry() -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(milliseconds=200),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=5),
    )


class DueTime(BaseModel):
    """A due time that is no task's: a stage or process SLA, or a wait until an instant.
    `at` is absolute, computed when it started (a business calendar computes it the same way)."""

    name: str
    kind: Literal["sla", "until"]
    at: datetime
    fired: bool = False


class Deadlines:
    """The instance's due times beside its task board, by name, in start order."""

    def __init__(self) -> None:
        self.items: dict[str, DueTime] = {}

    def start(self, name: str, kind: Literal["sla", "until"], at: datetime) -> DueTime:
        due = DueTime(name=name, kind=kind, at=at)
        self.items[name] = due
        return due

    def stop(self, name: str) -> None:
        self.items.pop(name, None)

    def next_due(self) -> DueTime | None:
        best: DueTime | None = None
        for d in self.items.values():
            if not d.fired and (best is None or d.at < best.at):
                best = d
        return best


class RuntimeCarry(BaseModel):
    """What the runtime carries into the next run of an instance (continue-as-new)."""

    tasks: list[HumanTask]
    task_seq: int
    audit_count: int
    revision: int
    deadlines: list[DueTime] = Field(default_factory=list)


class Stop(Exception):
    """Ends a process early as business (rejected, cancelled, failed) - never a failed workflow."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


# what `ProcessRuntime.wait` hands its timer callback: a task's timer, or a due time
TimerCallback = Callable[[str, "HumanTask | DueTime"], Awaitable[None]]


class ProcessRuntime:
    def __init__(
        self, *, workflow_id: str, process_type: str, business_key: str, requester: str
    ) -> None:
        self.workflow_id = workflow_id
        self.process_type = process_type
        self.business_key = business_key
        self.board = TaskBoard(workflow_id, requester)
        self.deadlines = Deadlines()
        self.batch = ProjectionBatch()
        self.stage: StageChange | None = None
        self.audit_count = 0  # entries so far (they live in the read model, not in memory)
        self.revision = 0
        self.done = False
        self.waiting_for = ""
        self._pending_roles: list[str] | None = None
        self._events = 0  # changes made by handlers
        self._settled = 0  # changes the main loop has acted upon
        # one projection per wait: changes the main loop has written, at a wait or before a
        # business activity (>= _settled), and the newest whose update answers that early
        self._answered = 0
        self._early = 0
        self._inflight = 0  # event handlers (signals) still running their activities
        self._waited = False  # the main loop reached its first wait
        self.local = workflow.patched(LOCAL_PROJECTION)  # decided once, at the first task
        # one projection per wait (decided once too; older instances never ask)
        self.batched = self.local and workflow.patched(PROJECTION_PER_WAIT)
        self._upserts: dict[str, SearchAttributeUpdate] = {}  # by attribute, until the flush
        # set by the process: called where the instance waits once Temporal suggests a new
        # run; it continues as new (raises) and never returns
        self.continue_as_new: Callable[[], Awaitable[None]] | None = None

    # ------------------------------------------------------------------ continue-as-new
    def carry(self) -> RuntimeCarry:
        return RuntimeCarry(
            tasks=list(self.board.tasks.values()),
            task_seq=self.board._seq,
            audit_count=self.audit_count,
            revision=self.revision,
            deadlines=list(self.deadlines.items.values()),
        )

    def restore(self, carry: RuntimeCarry) -> None:
        self.board.tasks = {t.task_id: t for t in carry.tasks}
        self.board._seq = carry.task_seq
        self.audit_count = carry.audit_count
        self.revision = carry.revision
        self.deadlines.items = {d.name: d for d in carry.deadlines}

    # ------------------------------------------------------------------ projection
    def task_changed(self, task: HumanTask) -> None:
        self.revision += 1
        self.batch.tasks = [t for t in self.batch.tasks if t.task_id != task.task_id]
        self.batch.tasks.append(
            TaskSnapshot(
                task_id=task.task_id,
                workflow_id=self.workflow_id,
                process_type=self.process_type,
                business_key=self.business_key,
                name=task.name,
                kind=task.kind,
                candidate_roles=list(task.candidate_roles),
                assignee=task.assignee,
                requester=task.requester,
                outcomes=list(task.outcomes),
                status=task.status,
                outcome=task.outcome,
                decided_by=task.decided_by,
                due_at=task.escalate_at,
                escalated=task.escalated,
                created_at=task.created_at,
                closed_at=task.closed_at,
                revision=self.revision,
            )
        )

    def audit(
        self,
        actor: str,
        action: str,
        comment: str = "",
        details: dict[str, Any] | None = None,
        *,
        task_id: str | None = None,
    ) -> None:
        entry = AuditRecord(
            event_key=f"{self.workflow_id}:{self.audit_count + 1}",
            workflow_id=self.workflow_id,
            task_id=task_id,
            actor=actor,
            action=action,
            comment=comment,
            details=details or {},
            at=workflow.now(),
        )
        self.audit_count += 1
        self.batch.audit.append(entry)

    async def flush(self) -> None:
        """Write everything recorded since the last flush in one activity; update visibility."""
        roles = self.board.pending_roles()
        if roles != self._pending_roles:
            self._pending_roles = roles
            self.upsert(PENDING_ROLES.value_set(roles))
        if self._upserts:  # one command (one visibility write) for the step's changes
            workflow.upsert_search_attributes(list(self._upserts.values()))
            self._upserts = {}
        batch, self.batch = self.batch, ProjectionBatch()
        batch.stage, self.stage = self.stage, None
        # the instance record, visits and SLA events ride with the step's other writes; alone
        # they start no activity (an extra command would break the replay of older histories)
        if (
            batch.order is None
            and batch.stage is None
            and not batch.tasks
            and not batch.audit
            and not batch.mails
        ):
            return
        stage = batch.stage.stage if batch.stage else batch.instance.stage if batch.instance else ""
        summary = (
            f"record {len(batch.tasks)} task(s), {len(batch.audit)} audit entr(ies)"
            + (f", stage {stage}" if stage and (batch.stage or self.batched) else "")
            + (f", {len(batch.mails)} mail(s)" if batch.mails else "")
        )
        await self.bookkeeping(RecordActivities.project, batch, summary=summary)

    async def before_activity(self) -> None:
        """The main loop is about to run a business activity (only the main loop calls this).
        One projection per wait: if an update waits for the step it caused (`changed(early=
        True)`, a decision), the steps so far are written now and it is answered; otherwise
        they stay in the batch, and a failure of the activity writes them with its compensation
        path. Older instances wrote every step already."""
        if not self.batched or self._answered >= self._early:
            return
        seen = self._events  # a change arriving while the projection runs is not answered
        await self.flush()
        self._answered = seen

    async def written(self) -> None:
        """Write what is still in the batch (one projection per wait: as the instance ends, or
        after the handlers that ran at its end). Older instances wrote it with each step."""
        if self.batched:
            await self.flush()

    async def bookkeeping(
        self, activity: Callable[[Any, A], Awaitable[R]], arg: A, *, summary: str
    ) -> R:
        """Run a quick records activity (projection, policy lookup): local, inside the workflow
        task, for newer instances; an ordinary activity for older ones."""
        if self.local:
            return await workflow.execute_local_activity_method(
                activity,
                arg,
                start_to_close_timeout=BOOKKEEPING_TIMEOUT,
                retry_policy=local_retry(),
                summary=summary,
            )
        return await workflow.execute_activity_method(
            activity,
            arg,
            start_to_close_timeout=BOOKKEEPING_TIMEOUT,
            summary=summary,
        )

    def upsert(self, *updates: SearchAttributeUpdate) -> None:
        """Set search attributes; they reach visibility with the next projection (older
        instances: at once, one command per call)."""
        if not self.local:
            workflow.upsert_search_attributes(list(updates))
            return
        for u in updates:
            self._upserts[u.key.name] = u

    async def handler_flush(self) -> None:
        """An update handler's changes: written by the main loop before it settles the update
        (one projection for the handler and the step it causes); older instances write here."""
        if not self.local:
            await self.flush()

    async def mail(self, note: Notification) -> None:
        """Queue a mail with the next projection (older instances: a `notify` activity now)."""
        if self.local:
            self.batch.mails.append(note)
            return
        await workflow.execute_activity_method(
            NotificationActivities.notify,
            note,
            start_to_close_timeout=timedelta(seconds=30),
            summary=f"mail: {note.subject}",
        )

    # ------------------------------------------------------------------ waiting
    async def wait(
        self,
        condition: Callable[[], bool],
        describe: Callable[[], str],
        on_timer: TimerCallback,
        interrupted: Callable[[], bool],
    ) -> None:
        while not condition() and not interrupted():
            # one projection per wait: a change arriving while it runs is acted on after it
            before = self._events
            await self.flush()  # the read model is current whenever the instance waits
            if condition() or interrupted():
                break
            if not self.batched:
                before = self._events
            due = self._next_due()
            workflow.set_current_details(describe())
            self._settled = self._answered = before
            self._waited = True
            if self.continue_as_new is not None and workflow.info().is_continue_as_new_suggested():
                # let running handlers finish first; anything they change is acted on (and
                # written) before the instance continues in a new run
                seen = self._events

                def drained(seen: int = seen) -> bool:
                    return workflow.all_handlers_finished() or self._events != seen

                await workflow.wait_condition(drained)
                if self._events == seen and not interrupted():
                    if self.batched:  # nothing written may stay behind in this run
                        await self.flush()
                    await self.continue_as_new()
                continue
            if due is not None:
                delay = due[0] - workflow.now()
                if delay <= timedelta(0):
                    await on_timer(due[1], due[2])
                    continue
            seen = before

            def woken(seen: int = seen) -> bool:
                return condition() or interrupted() or self._events != seen

            try:
                await workflow.wait_condition(
                    woken,
                    timeout=None if due is None else delay,
                    timeout_summary=None if due is None else f"{due[1]} {due[2].name}",
                )
            except TimeoutError:
                assert due is not None
                await on_timer(due[1], due[2])

    def _next_due(self) -> tuple[datetime, str, HumanTask | DueTime] | None:
        """The earliest due time of the board and the deadlines (a task's first on a tie)."""
        task = self.board.next_due()
        other = self.deadlines.next_due()
        if other is not None and (task is None or other.at < task[0]):
            return other.at, other.kind, other
        return task

    # ------------------------------------------------------------------ settling
    def changed(self, *, early: bool = False) -> int:
        """A handler changed state; returns its ticket for `settled`. `early`: its update is
        answered once the step it causes is written, before a business activity that follows
        (one projection per wait), rather than at the next wait."""
        self._events += 1
        if early:
            self._early = self._events
        return self._events

    async def settled(self, ticket: int, *, early: bool = False) -> None:
        """Return once the main loop acted on the change `ticket` and on every event handler
        running now (or the process ended); `early` (a ticket of `changed(early=True)`): once
        that is written, even before the business activity that follows."""
        if early and self.batched:
            await workflow.wait_condition(
                lambda: (
                    (self._answered >= max(ticket, self._events) and self._inflight == 0)
                    or self.done
                )
            )
            return
        await workflow.wait_condition(
            lambda: (
                (self._settled >= max(ticket, self._events) and self._inflight == 0) or self.done
            )
        )

    def is_settled(self) -> bool:
        """True when the main loop has acted on every change so far (what `settled` waits for)."""
        return self.done or (self._waited and self._settled >= self._events and self._inflight == 0)

    async def quiesce(self) -> None:
        """Wait until no event handler is half-way (e.g. a payment being recorded)."""
        await workflow.wait_condition(lambda: self._inflight == 0)

    @contextlib.asynccontextmanager
    async def event(self) -> AsyncIterator[None]:
        """Wrap an event handler that does async work; the main loop looks again after it."""
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1
            self.changed()
