"""The process kernel: what every process with people in it needs, so that a process module
holds only its own steps.

`HumanProcess` owns the `ProcessRuntime` (projection, outbox, settling, waits) and its
`TaskBoard` and `Deadlines`; the update handlers `settle`, `decide`, `claim`, `release`,
`delegate`, `reassign` with their validators (four-eyes, entitlement, strict board, action
caps) and the `status` query returning a `ProcessStatus`; `open_task` / `close_task` (the board
change and its inbox snapshot in one call); `wait` on every kind of due time; `set_stage`, which
also projects the instance (`InstanceRecord`) and its stage visits (`StageVisitRecord`); SLA
events (`SlaEventRecord`) for reminders, escalations and breaches; the mail helpers; `finish`;
continue-as-new with everything an instance carries; and the patch branches older histories
need (`local-projection-outbox` and `projection-per-wait` in the runtime, `hardening-2026-12`,
`task-action-settles`).

**One projection per wait** (`projection-per-wait`). A step records its writes (`set_stage`,
`open_task`, `close_task`, audit, mails, timers fired) in the runtime's batch; the batch goes out
in one `project` local activity, with one search-attribute upsert, when the instance is about to
wait (`wait`), ends (`finish`) or continues as new, so everything a person could act on (a task,
its mail) is in the read model before the instance waits for them. An update that waits for the
step it caused (`decide`) is answered once that step is written: at the next wait, or, when the
step leads into a business activity, just before it (`business_step` and the money block's
activities call `rt.before_activity`), so a final approval answers in the stage right after it
and the automated steps that follow write once, at the end. Other updates (`settle`, `amend`,
task actions) still answer at the next wait (or the end), as before. A business activity's
failure loses nothing: the steps before it are still in the batch and go out with the
compensation path's writes (`Stop` ends the process through `finish`). A step that fails the
workflow (an `ApplicationError`, e.g. a business calendar that cannot give a due) writes what
is in the batch first (`step`).

**Business time.** A process's policy (`ProcessPolicy`) may carry a business `calendar`;
`load_policy` keeps it for the instance's life (and carries it across continue-as-new). A task
whose timers say `business_time`, and an SLA started with a `BusinessDuration`, get their due
instants from `due(calendar, opened_at, duration)` when they open; the instants live in the
task (`remind_at`, `escalate_at`, `deadline_at`, its levels) or the due time, so every later
wait, status and projection reads the instant, never the duration, and a run continued as new
carries instants, not durations. Timers still fire on Temporal's clock. Without a calendar
nothing changes: elapsed durations, the same instants and commands as before (no patch: only a
policy document published with the new keys reaches the new code). The status shows each
task's due and deadline in the calendar's zone too (`due_local`, `deadline_local`). A
`CalendarError` (a business duration without a calendar, or none of its dues within reach,
which publishing refuses) fails the workflow with a non-retryable `ApplicationError` of type
`CALENDAR_ERROR`, never a workflow task.

*If tzdata or holidays change between a run and its replay* (a worker upgraded while
instances wait): replay computes each due again with the new data, and the instant kept in the
task is the recomputed one. Temporal's timers are in the history: a timer that fired fires
again at the same point of the replay whatever instant is computed now (a timer's duration is
not compared on replay, only whether a timer starts). So if only instants move, the replay
sends the same commands and the instance goes on with the new instants (a due moved by a new
holiday applies from its next wait). If a moved instant changes which due comes first, or falls
before an event the run saw while still waiting for it (no timer starts then), the replay takes
another branch and fails as non-deterministic: the workflow task retries until a worker with
the old data takes it. Hence: pin `tzdata` and `holidays` with the worker, and upgrade them like
workflow code, once the instances that started on the old data have ended or moved on.

**Cancellation.** The `cancel` update (`CancelInput`: reason, actor) is refused by its
validator once the instance ended, while a cancellation is under way (`Conflict`), and for
anyone but the requester or a holder of one of `CANCEL_ROLES` (`NotPermitted`); it sets
`cancel_request`, which the default `interrupted` / `checkpoint` turn into a `Stop` into
`CANCELLED_STAGE`, and answers once the instance has ended. `end_on_stop` ends a process on a
`Stop` (open tasks withdrawn, the visit left with outcome and who, `finish`). An external event
an update applies answers through `record_event` (audited, written, acted on).

A process subclasses it, declares `PROCESS_TYPE`, `TASK_KINDS` and `END_STATUS` (its end stages
and the instance status each means), puts `@workflow.init` on its `__init__` (calling
`super().__init__`) and `@workflow.run` on its run method; it re-declares only `status` with
its own status model (delegating to `status_fields`): `settle` and `cancel` then answer that
model too (`__init_subclass__`), so that typed clients decode its fields.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar, get_type_hints

from pydantic import BaseModel, Field, ValidationError
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.models import (
        NON_RETRYABLE_ERRORS,
        InstanceRecord,
        InstanceStatus,
        Notification,
        PolicyDocument,
        PolicyRequest,
        SlaEventRecord,
        StageVisitRecord,
    )
    from activities.records import RecordActivities
    from core.temporal import STAGE as STAGE_SA

from workflows.approval import (
    APPROVAL_OUTCOMES,
    APPROVAL_REQUIRED_FIELDS,
    ApprovalLevel,
    level_outcome,
)
from workflows.calendar import (
    BusinessCalendar,
    BusinessDuration,
    CalendarError,
    due,
    local_isoformat,
)
from workflows.errors import CONFLICT, NOT_PERMITTED
from workflows.errors import refuse as _refuse
from workflows.human_task import (
    APPROVAL_KIND,
    SYSTEM_ACTOR,
    TIMED_OUT,
    WITHDRAWN,
    Actor,
    DecideInput,
    HumanTask,
    TaskActionInput,
    TaskEvent,
    TaskTimes,
)
from workflows.policy import PolicyModel, ProcessPolicy
from workflows.runtime import DueTime, ProcessRuntime, RuntimeCarry
from workflows.runtime import Stop as Stop

# Since 2026-12: strict authority on tasks (entitlement, distinct approvers, delegation only to
# entitled users), a cap on task actions, continue-as-new when Temporal suggests it; the sales
# order also moves money by the ledger behind it. Older instances keep their commands.
HARDENING = "hardening-2026-12"
# Since 2026-11: a claim or delegation answers once the instance is waiting again.
TASK_ACTION_SETTLES = "task-action-settles"
VIEW_HISTORY = 10
# a business due that cannot be computed: the workflow fails (non-retryable), see the docstring
CALENDAR_ERROR = "CalendarError"

P = TypeVar("P", bound=PolicyModel)
A = TypeVar("A")
R = TypeVar("R")


def input_fingerprint(inp: BaseModel) -> str:
    """Stable hash of a start request (without its carry), to tell a client retry from a
    conflicting reuse of the business key."""
    canonical = json.dumps(
        inp.model_dump(mode="json", exclude={"carry"}), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def business_retry() -> RetryPolicy:
    """Retries of a business activity; the typed business errors are not retried."""
    return RetryPolicy(
        initial_interval=timedelta(seconds=1),
        maximum_interval=timedelta(seconds=30),
        non_retryable_error_types=NON_RETRYABLE_ERRORS,
    )


def cause_of(err: ActivityError) -> str:
    cause = err.cause
    return str(cause.message if isinstance(cause, ApplicationError) else cause or err)


def _calendar_failure(what: str, err: CalendarError) -> ApplicationError:
    """A due that business time cannot give: the workflow fails, never its task (it would be
    retried forever, computing the same error)."""
    return ApplicationError(f"{what}: {err}", type=CALENDAR_ERROR, non_retryable=True)


# ----------------------------------------------------------------------------- models
class TaskView(BaseModel):
    task_id: str
    name: str
    kind: str
    candidate_roles: list[str]
    assignee: str | None
    outcomes: list[str]
    required_fields: dict[str, list[str]]
    status: str
    outcome: str | None
    decided_by: str | None
    comment: str
    created_at: datetime
    due_at: datetime | None
    deadline_at: datetime | None
    due_local: str | None = Field(
        None, description="due_at in the business calendar's zone, ISO 8601 with its offset"
    )
    deadline_local: str | None = Field(
        None, description="deadline_at in the business calendar's zone"
    )
    escalated: bool
    history: list[TaskEvent] = Field(description=f"the newest {VIEW_HISTORY} events")
    history_total: int = Field(0, description="events in the task's whole life")


def task_view(t: HumanTask, calendar: BusinessCalendar | None = None) -> TaskView:
    """What the status shows of a task; with a business calendar its dues also in local time."""

    def local(at: datetime | None) -> str | None:
        return local_isoformat(calendar, at) if calendar is not None and at else None

    return TaskView(
        task_id=t.task_id,
        name=t.name,
        kind=t.kind,
        candidate_roles=list(t.candidate_roles),
        assignee=t.assignee,
        outcomes=list(t.outcomes),
        required_fields=t.required_fields,
        status=t.status,
        outcome=t.outcome,
        decided_by=t.decided_by,
        comment=t.comment,
        created_at=t.created_at,
        due_at=t.escalate_at,
        deadline_at=t.deadline_at,
        due_local=local(t.escalate_at),
        deadline_local=local(t.deadline_at),
        escalated=t.escalated,
        history=t.history[-VIEW_HISTORY:],
        history_total=len(t.history) + t.events_dropped,
    )


class DecisionRecord(BaseModel):
    task_id: str
    name: str
    outcome: str
    actor: str
    comment: str
    at: datetime


class StageEntry(BaseModel):
    stage: str
    at: datetime
    note: str = ""


class ProcessStatus(BaseModel):
    """What every process reports; a process extends it with its own fields."""

    workflow_id: str
    stage: str
    requester: str
    policy_version: int
    waiting_for: str
    pending_tasks: list[TaskView]
    decisions: list[DecisionRecord]
    stages: list[StageEntry]
    outcome_reason: str = ""
    settled: bool = Field(
        True, description="the instance has acted on everything it received and waits again"
    )


class CancelInput(BaseModel):
    """A cancellation: why, and who asks (from the caller's credentials)."""

    reason: str = Field(min_length=1, max_length=2000)
    actor: Actor


class DecideResult(BaseModel):
    task: TaskView
    stage: str = Field(description="the process's stage after the decision")


class ProcessCarry(BaseModel):
    """The kernel's part of what an instance carries into its next run (continue-as-new); a
    process's carry extends it with its own fields."""

    policy_version: int
    stage: str
    stages: list[StageEntry]
    runtime: RuntimeCarry
    slots: dict[str, list[str]]
    done_steps: list[str]
    finishing: tuple[str, str] | None = None
    outcome_reason: str = ""
    runs: int = Field(1, description="runs of this instance so far")
    calendar: BusinessCalendar | None = Field(None, description="the policy's business calendar")


# ----------------------------------------------------------------------------- the kernel
class HumanProcess:
    """Base class of every process workflow with human tasks (see the module docstring)."""

    PROCESS_TYPE: ClassVar[str] = ""
    TASK_KINDS: ClassVar[frozenset[str]] = frozenset({"approval"})
    # end stage -> the instance's status once there ("completed", "cancelled", "failed")
    END_STATUS: ClassVar[Mapping[str, InstanceStatus]] = MappingProxyType({})
    OWNER_ROLE: ClassVar[str | None] = None
    NOUN: ClassVar[str] = "process"  # in messages: "the order has ended"
    FAILED_STAGE: ClassVar[str] = "failed"  # where a failed business step ends the process
    CANCELLED_STAGE: ClassVar[str] = "cancelled"  # where a cancellation ends it
    # who may cancel an instance besides its requester (the `cancel` update's validator)
    CANCEL_ROLES: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A process that re-declares `status` with its own model gets `settle` and `cancel`
        answering that model: the SDK decodes an update's result by the return annotation of
        the handler it is given, and an inherited handler's annotation is the kernel's
        `ProcessStatus` (a typed client would drop the process's own fields). A handler the
        process declares itself is left alone."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("status")
        model = get_type_hints(own).get("return") if own is not None else None
        if not (isinstance(model, type) and issubclass(model, ProcessStatus)):
            return
        for name, factory in (("settle", _settle_handler), ("cancel", _cancel_handler)):
            if name not in cls.__dict__:
                handler = factory(model)
                handler.__module__ = cls.__module__
                handler.__qualname__ = f"{cls.__qualname__}.{name}"
                setattr(cls, name, handler)

    def __init__(
        self,
        *,
        business_key: str,
        requester: str,
        initial_stage: str,
        carry: ProcessCarry | None = None,
    ) -> None:
        self.rt = ProcessRuntime(
            workflow_id=workflow.info().workflow_id,
            process_type=self.PROCESS_TYPE,
            business_key=business_key,
            requester=requester,
        )
        self.requester = requester
        self.policy_version = 0
        self.stage: str = initial_stage
        self.stages: list[StageEntry] = [StageEntry(stage=initial_stage, at=workflow.now())]
        self.slots: dict[str, list[str]] = {}  # where the map opened tasks: reused on resume
        self.done_steps: list[str] = []
        self.finishing: tuple[str, str] | None = None
        self.outcome_reason = ""
        self.runs = 1
        # the pinned policy's business calendar (`load_policy`): business durations use it
        self.calendar: BusinessCalendar | None = None
        self._last_decision: tuple[str, str] | None = None  # (outcome, by) in this visit
        self.cancel_request: CancelInput | None = None  # set by the `cancel` update
        self.hardened = workflow.patched(HARDENING)
        self.rt.board.strict = self.hardened
        if self.hardened:
            self.rt.continue_as_new = self._continue_as_new
        if carry is None:
            self._enter_visit()
            self.project_instance()
        else:
            self._restore_kernel(carry)

    # ================================================================== hooks
    def summary(self) -> dict[str, Any]:
        """Small listable fields of the instance (its read model's `summary`)."""
        return {}

    def definition(self) -> dict[str, str]:
        """What the instance runs, for its read model: code by default (a blueprint's
        interpreter names the version)."""
        return {"definition_kind": "code", "definition_version": ""}

    def label(self) -> str:
        """How mails name the instance ("order 1001")."""
        return f"{self.PROCESS_TYPE} {self.rt.business_key}"

    def interrupted(self) -> bool:
        """True when a wait must stop: by default once a cancellation arrived."""
        return self.cancel_request is not None

    def checkpoint(self) -> None:
        """Raise `Stop` if the process must end here (called after every interruptible wait and
        before a business step): by default into `CANCELLED_STAGE` once a cancellation arrived."""
        if self.cancel_request is not None:
            raise Stop(self.CANCELLED_STAGE, self.cancel_reason(self.cancel_request))

    def cancel_reason(self, request: CancelInput) -> str:
        """The outcome reason of a cancelled instance."""
        actor = request.actor.username
        who = "the requester" if actor == self.requester else actor
        return f"cancelled by {who}: {request.reason}"

    def stage_changed(self, stage: str, note: str) -> None:
        """Called as the instance enters a stage (before its projection is written)."""

    async def stage_mail(self, stage: str, note: str) -> None:
        """The mail a stage sends (queued with the stage's projection); none by default."""

    async def before_end(self) -> None:
        """Called by `finish` before the end stage (e.g. wait for money settled by hand)."""

    def next_run_input(self, carry: dict[str, Any]) -> Any:
        """The run input of the next run: the process's input with its carry, built from the
        kernel's part `carry` (the fields of `ProcessCarry`) and the process's own."""
        raise NotImplementedError

    def task_mail_body(self, t: HumanTask) -> str:
        return f"Task {t.task_id} '{t.name}' for {self.label()} waits for {t.who_may_act()}."

    # ================================================================== continue-as-new
    def _restore_kernel(self, c: ProcessCarry) -> None:
        self.policy_version = c.policy_version
        self.stage = c.stage
        self.stages = list(c.stages)
        self.rt.restore(c.runtime)
        self.slots = {k: list(v) for k, v in c.slots.items()}
        self.done_steps = list(c.done_steps)
        self.finishing = c.finishing
        self.outcome_reason = c.outcome_reason
        self.runs = c.runs + 1
        self.calendar = c.calendar

    async def _continue_as_new(self) -> None:
        """Continue in a new run with everything the instance carries (history stays bounded)."""
        carry = {
            "policy_version": self.policy_version,
            "stage": self.stage,
            "stages": self.stages,
            "runtime": self.rt.carry(),
            "slots": self.slots,
            "done_steps": self.done_steps,
            "finishing": self.finishing,
            "outcome_reason": self.outcome_reason,
            "runs": self.runs,
            "calendar": self.calendar,
        }
        next_input = self.next_run_input(carry)
        workflow.logger.info("continuing as new (run %s)", self.runs + 1)
        workflow.continue_as_new(next_input)

    # ================================================================== steps
    async def step(self, name: str, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a step of the map once: a run continued as new skips the steps done before."""
        if name in self.done_steps:
            return
        try:
            await fn(*args)
        except ApplicationError:
            await self.rt.written()  # the workflow fails: the steps before it are still written
            raise
        self.done_steps.append(name)

    def slot_tasks(self, slot: str) -> list[HumanTask]:
        """Tasks a step opened in an earlier run (continue-as-new), if any."""
        return [self.rt.board.tasks[t] for t in self.slots.get(slot, [])]

    async def load_policy(self, model: type[P], default: P) -> P:
        """The current policy of this process type, pinned for the instance's life; a stored
        version that breaks today's checks: `default`, and the audit says why."""
        doc: PolicyDocument = await self.rt.bookkeeping(
            RecordActivities.load_policy,
            PolicyRequest(process_type=self.PROCESS_TYPE),
            summary=f"load the current {self.PROCESS_TYPE.replace('_', ' ')} policy",
        )
        policy = default
        if doc.version > 0:
            try:
                policy = model.model_validate(doc.document)
            except ValidationError as err:
                # never a workflow task failing forever: the built-in defaults instead
                self.rt.audit(
                    SYSTEM_ACTOR,
                    "policy_invalid",
                    f"policy version {doc.version} breaks today's checks; built-in defaults "
                    f"used: {err.error_count()} error(s), first at "
                    f"{'.'.join(map(str, err.errors()[0]['loc']))}",
                )
                doc = doc.model_copy(update={"version": 0})
        self.policy_version = doc.version
        if isinstance(policy, ProcessPolicy):
            self.calendar = policy.calendar
        self.project_instance()
        return policy

    async def business_step(
        self, activity: Callable[[Any, A], Awaitable[R]], arg: A, what: str
    ) -> R:
        """A business activity (after `checkpoint`); its failure ends the process in
        `FAILED_STAGE` (a `Stop`), never as a failed workflow."""
        self.checkpoint()
        await self.rt.before_activity()
        try:
            return await workflow.execute_activity_method(
                activity,
                arg,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=business_retry(),
                summary=what,
            )
        except ActivityError as err:
            raise Stop(self.FAILED_STAGE, f"{what} failed: {cause_of(err)}") from err

    async def handlers_finished(self) -> None:
        """Wait until every handler has finished (before `run` returns); what handlers that
        were still running at the end recorded is written then."""
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self.rt.written()

    async def finish(
        self, stage: str, reason: str, *, outcome: str | None = None, by: str | None = None
    ) -> None:
        """End the process in `stage`; the visit it leaves records `outcome` and `by` (by
        default the last decision taken in it, or the system)."""
        self.finishing = (stage, reason)
        await self.before_end()
        self.outcome_reason = reason
        await self.set_stage(stage, reason, outcome=outcome, by=by)
        await self.rt.written()  # one projection per wait: the instance's last
        self.rt.done = True
        workflow.set_current_details(f"**{stage}**: {reason}")

    async def end_on_stop(self, stop: Stop) -> None:
        """End the process where a `Stop` says: its open tasks withdrawn, the visit it leaves
        ended with the stop's stage as outcome, by whoever cancelled (a cancellation) or else
        the last decision taken in it (or the system)."""
        for t in self.rt.board.open_tasks():
            self.close_task(t, WITHDRAWN, comment=stop.reason)
        request = self.cancel_request
        by = request.actor.username if request and stop.stage == self.CANCELLED_STAGE else None
        await self.finish(stop.stage, stop.reason, outcome=str(stop.stage), by=by)

    async def record_event(
        self, action: str, note: str = "", details: Mapping[str, Any] | None = None
    ) -> None:
        """An external event an update handler applied: audited (by the system: the gateway
        sends no actor) and answered once it is written and the instance acted on it."""
        self.rt.audit(SYSTEM_ACTOR, action, note, dict(details or {}))
        ticket = self.rt.changed()
        await self.rt.handler_flush()
        await self.rt.settled(ticket)

    # ================================================================== stages and projection
    async def set_stage(
        self,
        stage: str,
        note: str = "",
        *,
        outcome: str | None = None,
        by: str | None = None,
        again: bool = False,
    ) -> None:
        """Enter a stage: closes the visit of the previous one (outcome and by default to the
        last decision taken in it), projects the instance, mails (`stage_mail`), writes. The
        stage it is in already is entered only `again` (a loop back: another visit)."""
        if stage == self.stage and len(self.stages) > 1 and not again:
            return
        now = workflow.now()
        self._leave_visit(now, outcome, by)
        self.stage = stage
        self.stages.append(StageEntry(stage=stage, at=now, note=note))
        self._enter_visit()
        self.stage_changed(stage, note)
        self.rt.audit(SYSTEM_ACTOR, "stage", f"{stage}" + (f": {note}" if note else ""))
        self.rt.upsert(STAGE_SA.value_set(str(stage)))
        self.project_instance()
        mail = self.stage_mail(stage, note)
        if self.rt.local:  # the mail goes into the projection's transaction
            await mail
            if not self.rt.batched:  # newer instances write it at the next wait
                await self.rt.flush()
        else:
            await asyncio.gather(self.rt.flush(), mail)

    def project_instance(self) -> None:
        """Put the instance's record into the next projection (stage, status, summary, ...)."""
        self.rt.revision += 1
        ended = self.END_STATUS.get(str(self.stage))
        entered = self.stages[-1].at
        self.rt.batch.instance = InstanceRecord(
            workflow_id=self.rt.workflow_id,
            process_type=self.PROCESS_TYPE,
            business_key=self.rt.business_key,
            policy_version=self.policy_version,
            stage=str(self.stage),
            status=ended or "running",
            requester=self.requester,
            owner_role=self.OWNER_ROLE,
            started_at=self.stages[0].at,
            stage_entered_at=entered,
            closed_at=entered if ended else None,
            revision=self.rt.revision,
            summary=self.summary(),
            **self.definition(),
        )

    def _visit(self, **changes: Any) -> None:
        entry = self.stages[-1]
        visit = StageVisitRecord(
            workflow_id=self.rt.workflow_id,
            seq=len(self.stages),
            stage=str(entry.stage),
            entered_at=entry.at,
            **changes,
        )
        batch = self.rt.batch
        batch.visits = [v for v in batch.visits if v.seq != visit.seq] + [visit]

    def _enter_visit(self) -> None:
        self._last_decision = None
        self._visit()

    def _leave_visit(self, now: datetime, outcome: str | None, by: str | None) -> None:
        last = self._last_decision
        self._visit(
            left_at=now,
            outcome=outcome or (last[0] if last else None),
            by=by or (last[1] if last else SYSTEM_ACTOR),
        )

    def _sla_event(
        self,
        kind: Literal["reminded", "escalated", "breached"],
        sla: str,
        task_id: str | None = None,
        **details: Any,
    ) -> None:
        # keyed by the audit entry recorded with it: unique per instance, across runs
        self.rt.batch.sla_events.append(
            SlaEventRecord(
                event_key=f"{self.rt.workflow_id}:sla:{self.rt.audit_count}",
                workflow_id=self.rt.workflow_id,
                task_id=task_id,
                sla=sla,
                kind=kind,
                at=workflow.now(),
                details=details,
            )
        )

    # ================================================================== tasks
    def open_task(
        self,
        *,
        name: str,
        kind: str,
        roles: Sequence[str],
        outcomes: Sequence[str],
        times: TaskTimes,
        required_fields: Mapping[str, Sequence[str]] | None = None,
        four_eyes: bool = True,
        assignee: str | None = None,
    ) -> HumanTask:
        """Open a task on the board and put it into the inbox (with the next projection); with
        an `assignee`, for that user (who must still hold one of `roles` to decide it)."""
        if kind not in self.TASK_KINDS:
            raise ValueError(f"task kind {kind!r} is not one of {sorted(self.TASK_KINDS)}")
        try:
            task = self.rt.board.open(
                name=name,
                kind=kind,
                candidate_roles=roles,
                outcomes=outcomes,
                now=workflow.now(),
                times=times,
                required_fields=required_fields,
                four_eyes=four_eyes,
                calendar=self.calendar,
                assignee=assignee,
            )
        except CalendarError as err:
            raise _calendar_failure(f"task {name!r}", err) from None
        self.rt.task_changed(task)
        self.rt.audit(SYSTEM_ACTOR, "task_opened", name, task_id=task.task_id)
        return task

    def close_task(
        self, task: HumanTask, outcome: str, actor: str = SYSTEM_ACTOR, comment: str = ""
    ) -> None:
        """Close a task on the board and in the inbox (with the next projection)."""
        self.rt.board.close(task, outcome, actor, workflow.now(), comment=comment)
        self.rt.task_changed(task)

    async def open_level(
        self, level: ApprovalLevel, slot: str, times: TaskTimes, subject: str
    ) -> list[HumanTask]:
        """Open the tasks of an approval level (one per role group) and mail their candidates;
        `close_level` once `level_outcome` has one."""
        tasks = [
            self.open_task(
                name=level.name if len(level.task_roles()) == 1 else f"{level.name} ({r[0]})",
                kind=APPROVAL_KIND,
                roles=r,
                outcomes=APPROVAL_OUTCOMES,
                times=times,
                required_fields=APPROVAL_REQUIRED_FIELDS,
            )
            for r in level.task_roles()
        ]
        self.slots[slot] = [t.task_id for t in tasks]
        await self.notify_candidates(tasks, subject)
        return tasks

    def close_level(self, level: ApprovalLevel, tasks: list[HumanTask]) -> str:
        """The level's outcome (approved / rejected / timed_out); what its quorum made
        unnecessary is withdrawn."""
        outcome = level_outcome(level, tasks)
        assert outcome is not None
        for t in tasks:
            if t.is_open:
                self.close_task(t, WITHDRAWN, comment=f"level {outcome}")
        return outcome

    async def approval_level(
        self, level: ApprovalLevel, slot: str, times: TaskTimes, subject: str
    ) -> str:
        """Open a level's tasks (or find them, continued as new), mail their candidates, wait
        for its outcome; what the quorum made unnecessary is withdrawn. approved / rejected /
        timed_out."""
        tasks = self.slot_tasks(slot) or await self.open_level(level, slot, times, subject)
        await self.wait(lambda: level_outcome(level, tasks) is not None, f"{level.name}")
        outcome = self.close_level(level, tasks)
        if not self.rt.local:  # newer instances write it with the next step's projection
            await self.rt.flush()
        return outcome

    # ================================================================== waiting
    async def wait(
        self, condition: Callable[[], bool], what: str, *, interruptible: bool = True
    ) -> None:
        """Wait for a condition while firing every due time (task timers, SLAs, waits until
        an instant); an interruptible wait ends at `interrupted` and calls `checkpoint`."""

        def describe() -> str:
            lines = [f"**Stage:** {self.stage}  \n**Waiting for:** {what}"]
            for t in self.rt.board.open_tasks():
                lines.append(
                    f"- task `{t.task_id}` *{t.name}*: {t.who_may_act()} may act, "
                    f"open since {t.created_at.isoformat(timespec='minutes')}"
                )
            return "\n".join(lines)

        self.rt.waiting_for = what
        await self.rt.wait(
            condition,
            describe,
            self._fire_timer,
            self.interrupted if interruptible else lambda: False,
        )
        if interruptible:
            self.checkpoint()

    def start_sla(self, name: str, within: timedelta | BusinessDuration) -> DueTime:
        """An SLA from now: breached (an `SlaEventRecord`, `on_sla_breach`) unless stopped.
        A `BusinessDuration` counts business time by the policy's calendar."""
        now = workflow.now()
        if isinstance(within, timedelta):
            return self.rt.deadlines.start(name, "sla", now + within)
        try:
            if self.calendar is None:
                raise CalendarError(
                    f"the business duration {within} needs a business calendar (the policy's "
                    "calendar)"
                )
            at = due(self.calendar, now, within)
        except CalendarError as err:
            raise _calendar_failure(f"SLA {name!r}", err) from None
        return self.rt.deadlines.start(name, "sla", at)

    def stop_sla(self, name: str) -> None:
        self.rt.deadlines.stop(name)

    async def wait_until(self, at: datetime, what: str) -> None:
        """Wait until an instant (task timers and SLAs keep firing meanwhile)."""
        name = f"until:{what}"
        due = self.rt.deadlines.items.get(name) or self.rt.deadlines.start(name, "until", at)
        await self.wait(lambda: due.fired, what)
        self.rt.deadlines.stop(name)

    async def on_sla_breach(self, due: DueTime) -> None:
        """What a process does when one of its SLAs is breached (recorded already)."""

    async def _fire_timer(self, kind: str, subject: HumanTask | DueTime) -> None:
        if isinstance(subject, DueTime):
            await self._due_time_reached(subject)
            return
        task, now = subject, workflow.now()
        if kind == "remind":
            self.rt.board.remind(task, now)
            self.rt.audit(SYSTEM_ACTOR, "reminded", task.name, task_id=task.task_id)
            self._sla_event("reminded", task.name, task.task_id)
            await self.notify_candidates([task], f"Reminder: {task.name} is waiting for you")
        elif kind == "escalate":
            role = self.rt.board.escalate(task, now)
            level = 1 + sum(1 for e in task.escalations if e.fired)
            self.rt.audit(SYSTEM_ACTOR, "escalated", f"{task.name} to {role}", task_id=task.task_id)
            self._sla_event("escalated", task.name, task.task_id, to_role=role, level=level)
            await self.notify(
                f"escalate:{task.task_id}" + (f":{level}" if level > 1 else ""),
                f"Escalated: {task.name} ({self.label()}) is past its SLA",
                f"Task {task.task_id} has been open since {task.created_at:%Y-%m-%d %H:%M} UTC.",
                to_roles=[role] if role else [],
            )
        else:
            self.rt.board.close(task, TIMED_OUT, SYSTEM_ACTOR, now, comment="final deadline")
            self.rt.audit(SYSTEM_ACTOR, TIMED_OUT, task.name, task_id=task.task_id)
            self._sla_event("breached", task.name, task.task_id, deadline=True)
            self._last_decision = (TIMED_OUT, SYSTEM_ACTOR)
        self.rt.task_changed(task)
        if not self.rt.batched:  # newer instances write it as they wait again (or end)
            await self.rt.flush()

    async def _due_time_reached(self, due: DueTime) -> None:
        due.fired = True
        if due.kind == "sla":
            self.rt.audit(SYSTEM_ACTOR, "sla_breached", due.name)
            self._sla_event("breached", due.name)
            await self.on_sla_breach(due)
        if not self.rt.batched:  # newer instances write it as they wait again (or end)
            await self.rt.flush()

    # ================================================================== mail
    async def notify(
        self,
        key: str,
        subject: str,
        body: str,
        *,
        to_users: Sequence[str] = (),
        to_roles: Sequence[str] = (),
        to_emails: Sequence[str] = (),
    ) -> None:
        """A mail through the outbox, written with the next projection; `key` makes it once."""
        await self.rt.mail(
            Notification(
                idempotency_key=f"{self.rt.workflow_id}:{key}",
                workflow_id=self.rt.workflow_id,
                to_users=list(to_users),
                to_roles=list(to_roles),
                to_emails=list(to_emails),
                subject=subject,
                body=body,
            )
        )

    async def notify_candidates(self, tasks: Sequence[HumanTask], subject: str) -> None:
        """Each task's assignee, or else everyone holding one of its candidate roles."""
        for t in tasks:
            await self.notify(
                f"task:{t.task_id}:{len(t.history) + t.events_dropped}",
                subject,
                self.task_mail_body(t),
                to_users=[t.assignee] if t.assignee else [],
                to_roles=[] if t.assignee else t.candidate_roles,
            )

    # ================================================================== status
    def status_fields(self) -> dict[str, Any]:
        """The fields of `ProcessStatus`, for a process's own status model."""
        board = self.rt.board
        return {
            "workflow_id": self.rt.workflow_id,
            "stage": self.stage,
            "requester": self.requester,
            "policy_version": self.policy_version,
            "waiting_for": "" if self.rt.done else self.rt.waiting_for,
            "pending_tasks": [task_view(t, self.calendar) for t in board.open_tasks()],
            "decisions": [
                DecisionRecord(
                    task_id=t.task_id,
                    name=t.name,
                    outcome=t.outcome or "",
                    actor=t.decided_by or "",
                    comment=t.comment,
                    at=t.closed_at or t.created_at,
                )
                for t in board.tasks.values()
                if not t.is_open
            ],
            "stages": list(self.stages),
            "outcome_reason": self.outcome_reason,
            "settled": self.rt.is_settled(),
        }

    def refuse_if_ended(self) -> None:
        if self.rt.done or str(self.stage) in self.END_STATUS:
            raise _refuse(CONFLICT, f"the {self.NOUN} has ended ({self.stage})")

    async def settled_now(self) -> None:
        """Return once the instance acted on everything received so far (see `settle`)."""
        await self.rt.settled(self.rt.changed())

    # ================================================================== handlers
    @workflow.query
    def status(self) -> ProcessStatus:
        """The instance's live status: stage, open tasks with who may act, decisions, policy."""
        return ProcessStatus(**self.status_fields())

    @workflow.update
    async def settle(self) -> ProcessStatus:
        """Return the status once the instance has processed everything received so far."""
        await self.settled_now()
        return self.status()

    @workflow.update
    async def cancel(self, inp: CancelInput) -> ProcessStatus:
        """The requester (or one of `CANCEL_ROLES`) cancels the instance; answered once it
        has ended (see `checkpoint` and `end_on_stop`)."""
        return await _cancel(self, inp)

    @cancel.validator
    def _validate_cancel(self, inp: CancelInput) -> None:
        self.validate_cancel(inp)

    def may_cancel(self, actor: Actor) -> bool:
        """The requester, or someone holding one of `CANCEL_ROLES`."""
        return actor.username == self.requester or bool(self.CANCEL_ROLES & set(actor.roles))

    def validate_cancel(self, inp: CancelInput) -> None:
        """Refuse a cancellation (nothing enters history): the instance has ended, one is
        under way already, or the actor may not cancel it."""
        self.refuse_if_ended()
        if self.cancel_request is not None:
            raise _refuse(CONFLICT, f"the {self.NOUN} is already being cancelled")
        if not self.may_cancel(inp.actor):
            roles = ", ".join(sorted(self.CANCEL_ROLES))
            raise _refuse(
                NOT_PERMITTED,
                f"only the requester{f' or one of the roles {roles}' if roles else ''} may "
                f"cancel the {self.NOUN}",
            )

    @workflow.update
    async def decide(self, inp: DecideInput) -> DecideResult:
        """A person decides a task; returns the task and the stage after it."""
        task = self.rt.board.apply_decision(inp, workflow.now())
        self.rt.task_changed(task)
        self.rt.audit(
            inp.actor.username,
            f"decided:{inp.outcome}",
            inp.comment,
            {"fields": inp.fields},
            task_id=task.task_id,
        )
        self._last_decision = (inp.outcome, inp.actor.username)
        ticket = self.rt.changed(early=True)  # answered at the step it causes
        await self.rt.handler_flush()
        await self.rt.settled(ticket, early=True)
        return DecideResult(task=task_view(task, self.calendar), stage=self.stage)

    @decide.validator
    def _validate_decide(self, inp: DecideInput) -> None:
        self.refuse_if_ended()
        task = self.rt.board.validate_decision(inp, strict=True)
        self.check_decision(task, inp)

    def check_decision(self, task: HumanTask, inp: DecideInput) -> None:
        """A process's own checks of a decision the board accepts (raise a refusal); none by
        default."""

    async def _task_action(self, action: str, inp: TaskActionInput) -> TaskView:
        task = self.rt.board.apply_action(action, inp, workflow.now())
        self.rt.task_changed(task)
        self.rt.audit(
            inp.actor.username,
            action,
            inp.comment,
            {"to_user": inp.to_user} if inp.to_user else {},
            task_id=task.task_id,
        )
        ticket = self.rt.changed()
        if action in ("delegate", "reassign") and task.assignee:
            await self.notify_candidates([task], f"Task assigned to you: {task.name}")
        await self.rt.handler_flush()
        # instances started before the change keep answering at once
        if workflow.patched(TASK_ACTION_SETTLES):
            await self.rt.settled(ticket)
        return task_view(task, self.calendar)

    @workflow.update
    async def claim(self, inp: TaskActionInput) -> TaskView:
        """A candidate takes a task; others then see it as taken."""
        return await self._task_action("claim", inp)

    @claim.validator
    def _validate_claim(self, inp: TaskActionInput) -> None:
        self.rt.board.validate_action("claim", inp, strict=True)

    @workflow.update
    async def release(self, inp: TaskActionInput) -> TaskView:
        """The assignee (or a manager) hands a task back to its candidates."""
        return await self._task_action("release", inp)

    @release.validator
    def _validate_release(self, inp: TaskActionInput) -> None:
        self.rt.board.validate_action("release", inp, strict=True)

    @workflow.update
    async def delegate(self, inp: TaskActionInput) -> TaskView:
        """The assignee, a candidate or a manager passes a task to another user."""
        return await self._task_action("delegate", inp)

    @delegate.validator
    def _validate_delegate(self, inp: TaskActionInput) -> None:
        self.rt.board.validate_action("delegate", inp, strict=True)

    @workflow.update
    async def reassign(self, inp: TaskActionInput) -> TaskView:
        """A manager assigns a task to a user, or back to the pool."""
        return await self._task_action("reassign", inp)

    @reassign.validator
    def _validate_reassign(self, inp: TaskActionInput) -> None:
        self.rt.board.validate_action("reassign", inp, strict=True)


# ----------------------------------------------------------------------------- typed handlers
async def _cancel(process: HumanProcess, inp: CancelInput) -> ProcessStatus:
    process.cancel_request = inp
    process.rt.audit(inp.actor.username, "cancel_requested", inp.reason)
    await workflow.wait_condition(lambda: process.rt.done)
    return process.status()


def _settle_handler(model: type[ProcessStatus]) -> Any:
    """`settle` answering a process's own status model (see `HumanProcess.__init_subclass__`).
    `self` stays unannotated: the SDK would take an annotated one for an argument."""

    async def settle(self) -> ProcessStatus:
        """Return the status once the instance has processed everything received so far."""
        await self.settled_now()
        return self.status()

    settle.__annotations__ = {**settle.__annotations__, "return": model}
    return workflow.update(settle)


def _cancel_handler(model: type[ProcessStatus]) -> Any:
    """`cancel` answering a process's own status model, with the kernel's validator."""

    async def cancel(self, inp: CancelInput) -> ProcessStatus:
        """The requester (or one of `CANCEL_ROLES`) cancels the instance; answered once it
        has ended."""
        return await _cancel(self, inp)

    def validate(self, inp: CancelInput) -> None:
        self.validate_cancel(inp)

    cancel.__annotations__ = {**cancel.__annotations__, "return": model}
    handler = workflow.update(cancel)
    handler.validator(validate)
    return handler
