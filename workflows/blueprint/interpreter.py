"""The blueprint interpreter: one workflow on the kernel that runs every published blueprint.

It is a dynamic workflow: Temporal's UI and visibility show the blueprint's process name
(`complaint`) as the workflow type, and a worker needs no registration per process. Its input
(`BlueprintInput`) carries the version the API pinned at start: its content hash and canonical
JSON, which is in the history once per run (the start event) and is never "the latest" again,
not across continue-as-new (the next run's input carries the same version). The document is
parsed once per worker process and shared by content hash (`check.parsed_version`).

The engine (`workflows.blueprint.engine`) decides, the interpreter acts: each `Command` maps to
a kernel call one to one (`EnterStage` -> `set_stage`, `OpenTask` -> `open_task`,
`OpenApproval` -> `open_level`, `CallActivity` -> an activity of the catalog, `StartWait` -> a
due time, `StartSla` / `StopSla` -> `start_sla` / `stop_sla`, `Escalate` -> `widen` on the
board, `Notify` -> a mail, `Withdraw` -> `close_task(..., WITHDRAWN)`, `End` -> `finish`), and
what the kernel sees comes back as an engine event: a task closed (decided, or by its
deadline), an approval level's outcome, a wait's event or timeout, a call's result, an SLA
breached. Events are applied one at a time in a fixed order (reported ones first, in arrival
order; then the open steps in the order they opened), so a replay takes the same path.

Decisions are checked twice before anything enters history: the kernel's board (who may act,
the outcome, required fields) and the engine on a copy of the state (typed form fields, the
end's required fields): a `decide` the engine would refuse is refused by the validator, with the
engine's error type. An external event (`POST /processes/{type}/{key}/events/{name}`) is an
update named after the event (a dynamic update handler), refused unless a step waits for it.

Calls run inline, one at a time in command order (the language has no concurrent calls; a call
in one branch of a parallel stage delays the others' timers by at most its timeout and retries).
Their idempotency key is `<workflow id>:<stage>:<visit>:<step>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.blueprint_calls import BlueprintCallActivities, CallRequest
    from activities.models import NON_RETRYABLE_ERRORS, InstanceStatus

from workflows.approval import ApprovalLevel, level_outcome
from workflows.blueprint import check
from workflows.blueprint import engine as eng
from workflows.blueprint.model import Blueprint
from workflows.calendar import BusinessDuration, CalendarError, due
from workflows.errors import CONFLICT, INVALID_DECISION, NOT_PERMITTED, TASK_NOT_FOUND, refuse
from workflows.human_task import (
    APPROVAL_KIND,
    SYSTEM_ACTOR,
    WITHDRAWN,
    Actor,
    DecideInput,
    HumanTask,
)
from workflows.kernel import (
    HumanProcess,
    ProcessCarry,
    ProcessStatus,
    Stop,
    _calendar_failure,
    cause_of,
)
from workflows.runtime import DueTime

TASK_KIND = "task"
ADMIN_ROLE = "admin"  # who may move an instance to another version
COMPLETED: InstanceStatus = "completed"
# the catalog's names -> the activities that implement them (activities/blueprint_calls.py)
CALLS = MappingProxyType(
    {
        "notify_customer": BlueprintCallActivities.notify_customer,
        "notify_role": BlueprintCallActivities.notify_role,
        "record_note": BlueprintCallActivities.record_note,
    }
)
WAIT_DUE = "wait:"  # a wait's due time: `wait:<step>`


def blueprint_workflow_id(process: str, business_key: str) -> str:
    return f"{process}-{business_key}"


# ----------------------------------------------------------------------------- models
class StepLink(BaseModel):
    """What the interpreter keeps of an open engine step: its tasks, or its due time."""

    kind: eng.StepKind
    tasks: list[str] = Field(default_factory=list, description="task ids (a task, a level)")
    approval: ApprovalLevel | None = None
    level: int = 0
    due: str | None = Field(None, description="a wait's due time, by name")
    event: str | None = Field(None, description="the event a wait waits for")


class BlueprintCarry(ProcessCarry):
    engine: eng.EngineState
    links: dict[str, StepLink]
    inbox: list[eng.EngineEvent] = Field(
        default_factory=list, description="reported engine events not applied yet"
    )
    transitions: list[str] = Field(default_factory=list)


class BlueprintInput(BaseModel):
    """A blueprint instance: the pinned version (hash and canonical JSON) and the start input."""

    process: str
    version: str = Field(description="`sha256:<hex>` of the canonical JSON")
    document: str = Field(description="the version's canonical JSON")
    business_key: str
    requester: str
    values: dict[str, Any] = Field(default_factory=dict, description="the start input")
    carry: BlueprintCarry | None = None


class BlueprintStatus(ProcessStatus):
    process: str
    version: str
    title: str
    business_key: str
    fields: dict[str, Any] = Field(description="the instance's field values so far")
    visits: dict[str, int] = Field(description="entries per stage")
    outcome: str | None = Field(None, description="the end outcome, once ended")
    open_steps: list[str] = Field(description="steps waiting for a person, an event or a time")
    step_tasks: dict[str, list[str]] = Field(
        description="open task and approval steps -> the ids of their tasks"
    )
    transitions: list[str] = Field(
        description="the rules taken, in order: `<stage>.then[<i>]`, and `<stage>.max_visits` "
        "for an entry its max_visits redirected"
    )


class MigrateInput(BaseModel):
    """Move an instance to `version` (its canonical JSON in `document`); who, from the
    credentials, and why."""

    version: str
    document: str
    actor: Actor
    reason: str = Field("", max_length=2000)


class BlueprintResult(BaseModel):
    stage: str
    outcome: str | None
    fields: dict[str, Any]


# ----------------------------------------------------------------------------- the workflow
@workflow.defn(dynamic=True)
class BlueprintWorkflow(HumanProcess):
    """Every blueprint process; the workflow type is the blueprint's process name."""

    TASK_KINDS = frozenset({TASK_KIND, APPROVAL_KIND})

    @workflow.init
    def __init__(self, args: Sequence[RawValue]) -> None:
        inp = workflow.payload_converter().from_payload(args[0].payload, BlueprintInput)
        try:
            self.blueprint: Blueprint = check.parsed_version(inp.version, inp.document)
        except ValueError as err:  # never retried: the same input fails the same way
            raise ApplicationError(str(err), type="BlueprintInvalid", non_retryable=True) from None
        bp = self.blueprint
        self.version = inp.version
        self.document = inp.document  # the parsed version's text (shared, not a copy)
        self.values = inp.values
        self._adopt(bp)
        self.engine = eng.EngineState(process=bp.process, stage=bp.start)
        self.links: dict[str, StepLink] = {}
        self.inbox: list[eng.EngineEvent] = []  # reported events, in arrival order
        self.transitions: list[str] = []
        carry = inp.carry
        super().__init__(
            business_key=inp.business_key,
            requester=inp.requester,
            initial_stage=bp.start,
            carry=carry,
        )
        if carry is None:
            self.calendar = bp.calendar  # business time of its timers and SLAs
        else:
            self.engine = carry.engine
            self.links = dict(carry.links)
            self.inbox = list(carry.inbox)
            self.transitions = list(carry.transitions)
        self.business_key = inp.business_key

    @workflow.run
    async def run(self, args: Sequence[RawValue]) -> BlueprintResult:
        try:
            if "start" not in self.done_steps:
                state, commands = self._engine_call(eng.start, self.values)
                self.engine = state
                self.done_steps.append("start")
                await self._execute(commands)
            while not self.engine.ended:
                await self.wait(self._has_event, self._waiting_for())
                event = self._next_event()
                state, commands = self._engine_call(eng.apply, self.engine, event)
                self.engine = state
                await self._execute(commands)
        except Stop as stop:  # cancelled (the kernel's `cancel` update and `checkpoint`)
            await self.end_on_stop(stop)
        await self.handlers_finished()
        return BlueprintResult(
            stage=self.stage, outcome=self.engine.outcome, fields=dict(self.engine.fields)
        )

    def _adopt(self, bp: Blueprint) -> None:
        """The kernel's per-process constants, from the blueprint (per instance)."""
        self.PROCESS_TYPE = bp.process  # type: ignore[misc]
        self.NOUN = bp.title.lower()  # type: ignore[misc]
        self.OWNER_ROLE = bp.owner_role  # type: ignore[misc]
        self.CANCEL_ROLES = frozenset({bp.owner_role})  # type: ignore[misc]
        ends = {name: COMPLETED for name, stage in bp.stages.items() if stage.end is not None}
        self.END_STATUS = MappingProxyType(  # type: ignore[misc]
            {**ends, self.FAILED_STAGE: "failed", self.CANCELLED_STAGE: "cancelled"}
        )

    # ================================================================== engine
    def _engine_call(self, fn: Any, *args: Any) -> tuple[eng.EngineState, list[eng.Command]]:
        """An engine transition; a refusal here is a bug (validators check first): the
        workflow fails, never its task."""
        try:
            return fn(self.blueprint, *args)
        except eng.EngineRefusal as err:
            raise ApplicationError(
                f"the blueprint engine refused: {err.message}",
                type="BlueprintEngineRefusal",
                non_retryable=True,
            ) from None

    def _has_event(self) -> bool:
        return bool(self.inbox) or any(self._seen(k, v) is not None for k, v in self.links.items())

    def _next_event(self) -> eng.EngineEvent:
        """The next event to apply: a reported one, else the first open step's (which is then
        no longer open here: the engine's commands open what comes next)."""
        if self.inbox:
            return self.inbox.pop(0)
        for key, link in self.links.items():
            event = self._seen(key, link)
            if event is None:
                continue
            del self.links[key]
            if link.approval is not None:  # what the quorum made unnecessary is withdrawn
                self.close_level(link.approval, [self.rt.board.tasks[t] for t in link.tasks])
            if link.due is not None:
                self.rt.deadlines.stop(link.due)
            return event
        raise AssertionError("no event")  # pragma: no cover - _has_event was true

    def _seen(self, key: str, link: StepLink) -> eng.EngineEvent | None:
        """The event an open step has to report, if any (a task closed, a level decided, a
        wait's time reached)."""
        board = self.rt.board
        if link.kind == "task":
            task = board.tasks[link.tasks[0]]
            if task.is_open:
                return None
            return eng.TaskClosed(
                step=key,
                outcome=task.outcome or "",
                fields=dict(task.fields),
                comment=task.comment,
                by=task.decided_by or SYSTEM_ACTOR,
            )
        if link.kind == "approval":
            assert link.approval is not None
            tasks = [board.tasks[t] for t in link.tasks]
            outcome = level_outcome(link.approval, tasks)
            if outcome is None:
                return None
            deciders = [t.decided_by for t in tasks if t.decided_by]
            return eng.ApprovalDecided(
                step=key, level=link.level, outcome=outcome, by=deciders[-1] if deciders else ""
            )
        if link.kind == "wait" and link.due is not None:
            found = self.rt.deadlines.items.get(link.due)
            if found is not None and found.fired:
                return eng.WaitEnded(step=key, outcome="timed_out")
        return None

    def _waiting_for(self) -> str:
        kinds = {"task": "a decision", "approval": "an approval", "wait": "a time or an event"}
        what = [f"{key} ({kinds.get(link.kind, link.kind)})" for key, link in self.links.items()]
        return ", ".join(what) or "the next step"

    # ================================================================== commands
    async def _execute(self, commands: list[eng.Command]) -> None:
        for command in commands:
            await self._command(command)

    async def _command(self, c: eng.Command) -> None:
        match c:
            case eng.EnterStage():
                if c.came_from is not None:
                    self.transitions.append(f"{c.came_from}.then[{c.rule}]")
                self.transitions += [f"{name}.max_visits" for name in c.redirected_from]
                if c.came_from is None and c.visit == 1 and not c.redirected_from:
                    return  # the start stage: the kernel is in it already
                note = f"visit {c.visit}" if c.visit > 1 else ""
                if c.redirected_from:
                    note = f"{', '.join(c.redirected_from)} had its visits; " + note
                await self.set_stage(c.stage, note.strip("; "), again=True)
            case eng.OpenTask():
                task = self.open_task(
                    name=c.title,
                    kind=TASK_KIND,
                    # a task for a named user: the owner's role may act once it is released
                    roles=c.roles or [self.blueprint.owner_role],
                    outcomes=c.outcomes,
                    times=c.timers,
                    required_fields=c.required,
                    four_eyes=c.four_eyes,
                    assignee=c.assignee,
                )
                self.links[c.step] = StepLink(kind="task", tasks=[task.task_id])
                await self.notify_candidates([task], f"Task for you: {c.title}")
            case eng.OpenApproval():
                tasks = await self.open_level(c.approval, c.slot, c.timers, f"Approval: {c.title}")
                self.links[c.step] = StepLink(
                    kind="approval",
                    tasks=[t.task_id for t in tasks],
                    approval=c.approval,
                    level=c.level,
                )
            case eng.CallActivity():
                await self._call(c)
            case eng.StartWait():
                self._start_wait(c)
            case eng.StartSla():
                self.start_sla(c.name, c.within)
            case eng.StopSla():
                self.stop_sla(c.name)
            case eng.Escalate():
                self._escalate(c)
            case eng.Notify():
                await self.notify(
                    c.key,
                    f"{self.label()}: SLA {c.sla} breached",
                    f"The SLA {c.sla} of {self.label()} is breached; it is in stage {self.stage}.",
                    to_roles=[c.role],
                )
            case eng.Withdraw():
                self._withdraw(c.step, c.reason)
            case eng.End():
                reason = c.reason or f"ended {c.outcome}"
                if c.missing:
                    reason += f" (without {', '.join(c.missing)})"
                await self.finish(c.stage, reason, outcome=c.outcome)

    async def _call(self, c: eng.CallActivity) -> None:
        self.checkpoint()
        await self.rt.before_activity()
        request = CallRequest(
            idempotency_key=f"{self.rt.workflow_id}:{c.idempotency_key}",
            workflow_id=self.rt.workflow_id,
            process_type=self.PROCESS_TYPE,
            title=self.blueprint.title,
            business_key=self.business_key,
            params=dict(c.params),
            fields=dict(self.engine.fields),
        )
        try:
            output = await workflow.execute_activity_method(
                CALLS[c.activity],
                request,
                start_to_close_timeout=c.timeout,
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1),
                    maximum_interval=timedelta(seconds=30),
                    maximum_attempts=c.retries + 1,
                    non_retryable_error_types=[*NON_RETRYABLE_ERRORS, "InvalidCallParams"],
                ),
                summary=f"{c.activity} ({c.step})",
            )
        except ActivityError as err:
            self.inbox.append(eng.CallFailed(step=c.step, error=cause_of(err)))
            return
        self.inbox.append(eng.CallDone(step=c.step, output=output))

    def _start_wait(self, c: eng.StartWait) -> None:
        now = workflow.now()
        at: datetime | None = c.until
        span = c.after if c.after is not None else c.timeout
        if at is None and span is not None:
            at = self._due(f"wait {c.step!r}", now, span)
        name = None
        if at is not None:
            name = WAIT_DUE + c.step
            self.rt.deadlines.start(name, "until", at)
        self.links[c.step] = StepLink(kind="wait", due=name, event=c.event)

    def _due(self, what: str, now: datetime, span: timedelta | BusinessDuration) -> datetime:
        if isinstance(span, timedelta):
            return now + span
        try:
            if self.calendar is None:
                message = f"the business duration {span} needs the blueprint's calendar"
                raise CalendarError(message)
            return due(self.calendar, now, span)
        except CalendarError as err:
            raise _calendar_failure(what, err) from None

    def _escalate(self, c: eng.Escalate) -> None:
        now = workflow.now()
        for key in c.steps:
            link = self.links.get(key)
            for task_id in link.tasks if link else ():
                task = self.rt.board.tasks[task_id]
                if not task.is_open:
                    continue
                self.rt.board.widen(task, c.to_role, now, f"SLA {c.sla}: to {c.to_role}")
                self.rt.task_changed(task)
                self.rt.audit(
                    SYSTEM_ACTOR, "escalated", f"{task.name} to {c.to_role}", task_id=task.task_id
                )

    def _withdraw(self, key: str, reason: str) -> None:
        link = self.links.pop(key, None)
        if link is None:
            return
        for task_id in link.tasks:
            task = self.rt.board.tasks[task_id]
            if task.is_open:
                self.close_task(task, WITHDRAWN, comment=reason)
        if link.due is not None:
            self.rt.deadlines.stop(link.due)

    # ================================================================== kernel hooks
    async def on_sla_breach(self, due: DueTime) -> None:
        self.inbox.append(eng.SlaBreached(name=due.name))

    def summary(self) -> dict[str, Any]:
        return {"title": self.blueprint.title}

    def definition(self) -> dict[str, str]:
        return {"definition_kind": "blueprint", "definition_version": self.version}

    def label(self) -> str:
        return f"{self.blueprint.title} {self.rt.business_key}"

    def check_decision(self, task: HumanTask, inp: DecideInput) -> None:
        """The engine's checks of a decision (a task's typed fields; for a decision that ends
        the stage, the end's required fields), on a copy of the state: refused here, nothing
        enters history. An approval's decision is checked once it settles its level."""
        key = next((k for k, link in self.links.items() if task.task_id in link.tasks), None)
        if key is None:
            return
        link = self.links[key]
        event: eng.EngineEvent
        if link.approval is not None:  # a decision that settles its level: what comes next
            decided = task.model_copy(
                update={"status": "closed", "outcome": inp.outcome, "decided_by": "?"}
            )
            tasks = [decided if t == task.task_id else self.rt.board.tasks[t] for t in link.tasks]
            outcome = level_outcome(link.approval, tasks)
            if outcome is None:
                return
            event = eng.ApprovalDecided(
                step=key, level=link.level, outcome=outcome, by=inp.actor.username
            )
        else:
            event = eng.TaskClosed(
                step=key,
                outcome=inp.outcome,
                fields=dict(inp.fields),
                comment=inp.comment,
                by=inp.actor.username,
            )
        try:
            eng.apply(self.blueprint, self.engine, event)
        except eng.EngineRefusal as err:
            raise err.application_error() from None

    def next_run_input(self, carry: dict[str, Any]) -> BlueprintInput:
        return BlueprintInput(
            process=self.blueprint.process,
            version=self.version,
            document=self.document,
            business_key=self.business_key,
            requester=self.requester,
            values=self.values,
            carry=BlueprintCarry(
                **carry,
                engine=self.engine,
                links=self.links,
                inbox=list(self.inbox),
                transitions=self.transitions,
            ),
        )

    # ================================================================== handlers
    @workflow.query
    def status(self) -> BlueprintStatus:
        """The instance's live status: the kernel's fields and the blueprint's state."""
        return BlueprintStatus(
            **self.status_fields(),
            process=self.blueprint.process,
            version=self.version,
            title=self.blueprint.title,
            business_key=self.business_key,
            fields=dict(self.engine.fields),
            visits=dict(self.engine.visits),
            outcome=self.engine.outcome,
            open_steps=list(self.links),
            step_tasks={k: list(v.tasks) for k, v in self.links.items() if v.tasks},
            transitions=list(self.transitions),
        )

    @workflow.update
    async def migrate(self, inp: MigrateInput) -> BlueprintStatus:
        """An admin moves the waiting instance to another version of its blueprint (see
        `engine.migrate` for what is refused); audited, and the read model names the version."""
        target = check.parsed_version(inp.version, inp.document)
        before = self.version
        self.engine = eng.migrate(self.blueprint, target, self.engine)
        self.blueprint, self.version, self.document = target, inp.version, inp.document
        self._adopt(target)
        self.calendar = target.calendar
        self.rt.audit(
            inp.actor.username,
            "migrated",
            inp.reason,
            {"from_version": before, "to_version": inp.version},
        )
        self.project_instance()
        ticket = self.rt.changed()
        await self.rt.handler_flush()
        await self.rt.settled(ticket)
        return self.status()

    @migrate.validator
    def _validate_migrate(self, inp: MigrateInput) -> None:
        self.refuse_if_ended()
        if ADMIN_ROLE not in inp.actor.roles:
            raise refuse(NOT_PERMITTED, "only an admin may move an instance to another version")
        if inp.version == self.version:
            raise refuse(CONFLICT, f"the instance runs {inp.version} already")
        if self.inbox or any(self._seen(k, v) is not None for k, v in self.links.items()):
            raise refuse(CONFLICT, "the instance is acting on an event; try again")
        try:
            target = check.parsed_version(inp.version, inp.document)
            eng.migrate(self.blueprint, target, self.engine)
        except ValueError as err:
            raise refuse(INVALID_DECISION, f"version: {err}") from None
        except eng.EngineRefusal as err:
            raise err.application_error() from None

    @workflow.update(dynamic=True)
    async def report_event(self, name: str, args: Sequence[RawValue]) -> dict[str, Any]:
        """An external event of the blueprint (the update is named after it): the wait for it
        ends with its fields."""
        fields = self._event_fields(args)
        key = self._waiting_step(name)
        self._withdraw_due(key)
        self.inbox.append(eng.WaitEnded(step=key, outcome="received", fields=fields))
        await self.record_event(name, "", {"fields": fields})
        return self.status().model_dump(mode="json")

    @report_event.validator
    def _validate_report_event(self, name: str, args: Sequence[RawValue]) -> None:
        self.refuse_if_ended()
        fields = self._event_fields(args)
        key = self._waiting_step(name)
        try:
            eng.apply(
                self.blueprint,
                self.engine,
                eng.WaitEnded(step=key, outcome="received", fields=fields),
            )
        except eng.EngineRefusal as err:
            raise err.application_error() from None

    def _event_fields(self, args: Sequence[RawValue]) -> dict[str, Any]:
        if not args:
            return {}
        body = workflow.payload_converter().from_payload(args[0].payload, dict)
        return dict(body or {})

    def _waiting_step(self, name: str) -> str:
        """The open wait for the event `name`; refused when the blueprint has no such event
        or no step waits for it now."""
        if name not in self.blueprint.events:
            known = ", ".join(self.blueprint.events) or "none"
            message = f"{self.blueprint.process} has no event {name!r}; its events: {known}"
            raise refuse(TASK_NOT_FOUND, message)
        for key, link in self.links.items():
            if link.kind == "wait" and link.event == name:
                reported = any(isinstance(e, eng.WaitEnded) and e.step == key for e in self.inbox)
                if not reported:
                    return key
        raise refuse(CONFLICT, f"no step of {self.label()} waits for the event {name!r} now")

    def _withdraw_due(self, key: str) -> None:
        link = self.links.pop(key)
        if link.due is not None:
            self.rt.deadlines.stop(link.due)
