"""The blueprint engine: one instance of a blueprint as a pure state machine.

`start(blueprint, input_values)` and `apply(blueprint, state, event)` return the next
`EngineState` and the `Command`s the interpreter workflow runs with the kernel, one to one
(`EnterStage` -> `set_stage`, `OpenTask` -> `open_task`, `OpenApproval` -> `approval_level`,
`CallActivity` -> an activity of the catalog, `StartWait` -> `wait_until` or an event wait,
`StartSla` / `StopSla` -> `start_sla` / `stop_sla`, `Escalate` / `Notify` -> the breach's
mails and board changes, `Withdraw` -> `close_task(..., WITHDRAWN)`, `End` -> `finish`). The
interpreter never reads the document: a command carries everything it needs. Events are what
the kernel saw: `TaskClosed`, `ApprovalDecided` (a level of a chain), `WaitEnded`, `CallDone`,
`CallFailed`, `SlaBreached`. An event that does not fit the state raises `EngineRefusal`
(its `error_type` is one of `workflows.errors`, for the update validator's 4xx) and changes
nothing: `apply` works on a copy of the state.

Semantics (the language is `workflows.blueprint.model`):

- **Stages.** Entering a stage counts a visit, resets the outcomes of the visit, runs its
  `do` steps in order and, once they have all ended, chooses the next stage by the first
  `then` rule whose condition holds. An entry into a stage that has had its `max_visits`
  goes to its `on_max_visits` instead (chains followed; the redirected entry counts for the
  stage it lands in). An `end` stage is entered (`EnterStage`) and ends the instance (`End`,
  with every field value); its `required` fields without a value: a person's event that
  would end there is refused, a system's (deadline, call, timeout) ends with them listed in
  `End.missing`.
- **Steps.** A task opens and waits for `TaskClosed`; a deadline closes it with the
  kernel's `timed_out`, read as the task's `on_deadline` outcome (no required fields then).
  A field with `required: true` on a task's form is required for every outcome a person
  chooses, besides those `required` names per outcome. An assignee named by an empty field
  leaves the task to the blueprint's `owner_role`. An approval opens the levels its amount
  needs (those with `min_amount` <= the amount; every level when the amount has no value),
  one at a time: approved once every level approved, else the first refusal's outcome; no
  level needed: approved at once. A call waits for `CallDone`; `CallFailed` ends the instance
  `failed` in the stage `failed` (the kernel's FAILED_STAGE), its other open steps withdrawn:
  the language has no failure branch. A wait `after` a duration or for an event waits for
  `WaitEnded`; a wait `until` a date or datetime field waits until the instant the field
  gives (a date: its midnight; without an offset: in the blueprint calendar's zone, else
  UTC), and is passed at once when the field has no value. A time wait ends `timed_out`.
  A `parallel` step starts its branches in order and ends when every branch has ended.
- **Fields.** The input, and the fields of each task and event as they arrive, typed by
  their declaration (strings from a form are read: "3" for an int); a value that does not
  fit is refused, an empty one is no value. Decimals, dates and datetimes are kept as their
  ISO text, so the state is plain JSON. Conditions compare typed values; a field without a
  value satisfies only `ne`.
- **SLAs.** A stage's SLA runs for each visit (named `stage:<stage>`); a process SLA starts
  when its `from` stage is entered and it is not running, and stops when one of its `until`
  stages is entered. Every running SLA stops at the end. A breach runs its actions once:
  `Escalate` (the open tasks and approvals of the stage) and `Notify`.
- **Keys.** `CallActivity.idempotency_key` is `<stage>:<visit>:<step>`, the same for the
  same events, another for each visit; the interpreter prefixes the workflow id. A step
  without a name (a wait `until` or `after`) is named by its place: `#0.wait`.

`walk(blueprint)` explores every path an instance can take (each outcome of each task and
approval level, deadlines, each wait outcome, each call's success and failure, field values
on both sides of every condition, parallel branches in every order) and returns them with
their end outcomes and worst counts of commands, events and Temporal history (the checker's
per-construct costs); the tests use it to prove that each seed blueprint ends on every path
within the checker's budget.

Pure and deterministic: no I/O, no clock (instants come in with the fields), no randomness,
no set iteration, no module state; importable in the workflow sandbox.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from temporalio.exceptions import ApplicationError

from workflows.approval import APPROVED, ApprovalLevel
from workflows.blueprint import check
from workflows.blueprint.catalog import CATALOG
from workflows.blueprint.model import (
    COMMENT,
    MAX_INPUT_LENGTH,
    RECEIVED,
    AllOf,
    AnyOf,
    ApprovalStep,
    Blueprint,
    CallStep,
    FieldIs,
    FieldRef,
    FieldSpec,
    FrozenModel,
    NotOf,
    ParallelStep,
    Predicate,
    Stage,
    StageSla,
    Step,
    StepIs,
    TaskStep,
    Timers,
    VisitsAtLeast,
    WaitStep,
    _business_spans,
    operands,
)
from workflows.errors import CONFLICT, INVALID_DECISION, TASK_NOT_FOUND, refuse
from workflows.human_task import SYSTEM_ACTOR, TIMED_OUT, TaskTimes
from workflows.human_task import Escalation as TaskEscalation
from workflows.kernel import HumanProcess
from workflows.policy import TimerDuration

MAIN = "main"  # the branch of a stage's own steps; a parallel's are `<parallel>.<branch>`
FAILED = HumanProcess.FAILED_STAGE  # the stage and outcome of an instance whose call failed
STAGE_SLA = "stage:"  # a stage SLA's name: `stage:<stage>`
EMAIL_PATTERN = r"[^@\s]+@[^@\s]+\.[^@\s]+"

# a field's value as the state keeps it: decimals, dates and datetimes as their ISO text
# (smart mode keeps true, 1 and "1" apart; Annotated keeps the alias a typing construct)
FieldValue = Annotated[bool | int | str, Field(union_mode="smart")]
StepKind = Literal["task", "approval", "call", "wait"]


class EngineRefusal(Exception):
    """An event (or start input) that does not fit the state: refused, nothing changed.

    `error_type` is one of `workflows.errors` (TaskNotFound: 404, Conflict: 409,
    InvalidDecision: 422); `application_error()` is what an update validator raises."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    def application_error(self) -> ApplicationError:
        return refuse(self.error_type, self.message)


# ----------------------------------------------------------------------------- state
class OpenStep(BaseModel):
    """A step that waits for its event."""

    model_config = ConfigDict(extra="forbid")

    kind: StepKind
    branch: str
    chain: list[int] = Field(
        default_factory=list, description="approval: the levels its amount needs (indexes)"
    )
    level: int = Field(0, description="approval: the position in `chain` of the open level")


class EngineState(BaseModel):
    """Everything an instance is, as plain JSON: what the interpreter carries across
    continue-as-new (with the blueprint's version, never the blueprint)."""

    model_config = ConfigDict(extra="forbid")

    process: str
    stage: str = Field(description="the stage the instance is in (or ended in)")
    visits: dict[str, int] = Field(default_factory=dict, description="entries per stage")
    branches: dict[str, int] = Field(
        default_factory=dict, description="running branch -> the index of its current step"
    )
    ended_branches: list[str] = Field(default_factory=list, description="in this visit")
    fields: dict[str, FieldValue] = Field(default_factory=dict)
    outcomes: dict[str, str] = Field(
        default_factory=dict, description="step -> outcome, of the steps of this visit"
    )
    open: dict[str, OpenStep] = Field(default_factory=dict, description="by step, opened first")
    slas: list[str] = Field(default_factory=list, description="running SLAs, started first")
    sla_rounds: dict[str, int] = Field(default_factory=dict, description="starts per SLA")
    outcome: str | None = Field(None, description="the end outcome, once ended")

    @property
    def visit(self) -> int:
        """The current visit's number (1 for the first entry into the stage)."""
        return self.visits.get(self.stage, 0)

    @property
    def ended(self) -> bool:
        return self.outcome is not None


# ----------------------------------------------------------------------------- commands
class CommandModel(FrozenModel):
    """Base of the commands: frozen, unknown keys refused."""


class EnterStage(CommandModel):
    """The instance enters `stage` for the `visit`-th time (`set_stage`)."""

    kind: Literal["enter_stage"] = "enter_stage"
    stage: str
    visit: int
    title: str | None = None
    came_from: str | None = Field(None, description="the stage it left; None at the start")
    rule: int | None = Field(None, description="the `then` rule of came_from that led here")
    redirected_from: list[str] = Field(
        default_factory=list, description="stages past their max_visits, in the order skipped"
    )


class OpenTask(CommandModel):
    """A human task to open (`open_task`): for `roles`, or for the user `assignee`."""

    kind: Literal["open_task"] = "open_task"
    step: str
    branch: str
    title: str
    description: str | None = None
    roles: list[str]
    assignee: str | None = None
    fields: dict[str, FieldSpec] = Field(default_factory=dict, description="the form")
    outcomes: list[str]
    required: dict[str, list[str]] = Field(
        default_factory=dict, description="outcome -> the fields (and comment) it needs"
    )
    four_eyes: bool = True
    timers: TaskTimes = Field(default_factory=TaskTimes)
    on_deadline: str | None = Field(None, description="the outcome a deadline closes it with")


class OpenApproval(CommandModel):
    """One level of an approval chain to run (`approval_level`); its outcome comes back as
    `ApprovalDecided(step, level, ...)`."""

    kind: Literal["open_approval"] = "open_approval"
    step: str
    branch: str
    title: str
    level: int = Field(description="the level's position in the chain the amount needs")
    levels: int = Field(description="how many levels the chain has")
    approval: ApprovalLevel
    slot: str = Field(description="`<stage>:<visit>:<step>:<level>`, the tasks' slot")
    timers: TaskTimes = Field(default_factory=TaskTimes)
    amount: str | None = None


class CallActivity(CommandModel):
    """A catalogued activity to run with `params` (the fields they name resolved)."""

    kind: Literal["call_activity"] = "call_activity"
    step: str
    branch: str
    activity: str
    params: dict[str, FieldValue | float]
    idempotency_key: str = Field(description="`<stage>:<visit>:<step>`; prefix the workflow id")
    timeout: timedelta
    retries: int


class StartWait(CommandModel):
    """A wait: `after` a duration, `until` an instant, or for `event` at most `timeout`."""

    kind: Literal["start_wait"] = "start_wait"
    step: str
    branch: str
    business_time: bool = False
    after: TimerDuration | None = None
    until: datetime | None = None
    event: str | None = None
    timeout: TimerDuration | None = None

    _business = model_validator(mode="before")(_business_spans("after", "timeout"))


class StartSla(CommandModel):
    """An SLA from now (`start_sla`); its breach comes back as `SlaBreached(name)`."""

    kind: Literal["start_sla"] = "start_sla"
    name: str
    within: TimerDuration
    business_time: bool = False
    stage: str | None = Field(None, description="a stage SLA's stage; None: a process SLA")

    _business = model_validator(mode="before")(_business_spans("within"))


class StopSla(CommandModel):
    kind: Literal["stop_sla"] = "stop_sla"
    name: str


class Escalate(CommandModel):
    """An SLA breached: `to_role` may act on the open tasks and approvals `steps` too."""

    kind: Literal["escalate"] = "escalate"
    sla: str
    to_role: str
    steps: list[str]
    key: str = Field(description="`sla:<name>:<round>:<action>`; prefix the workflow id")


class Notify(CommandModel):
    """An SLA breached: the holders of `role` are told."""

    kind: Literal["notify"] = "notify"
    sla: str
    role: str
    key: str = Field(description="`sla:<name>:<round>:<action>`; prefix the workflow id")


class Withdraw(CommandModel):
    """An open step that will never be decided (the instance ends): withdraw it."""

    kind: Literal["withdraw"] = "withdraw"
    step: str
    step_kind: StepKind
    reason: str


class End(CommandModel):
    """The instance ends (`finish`) in `stage` with `outcome` and its field values."""

    kind: Literal["end"] = "end"
    stage: str
    outcome: str
    fields: dict[str, FieldValue]
    missing: list[str] = Field(
        default_factory=list, description="required fields of the end without a value"
    )
    reason: str = ""


Command = Annotated[
    EnterStage
    | OpenTask
    | OpenApproval
    | CallActivity
    | StartWait
    | StartSla
    | StopSla
    | Escalate
    | Notify
    | Withdraw
    | End,
    Field(discriminator="kind"),
]


# ----------------------------------------------------------------------------- events
class EventModel(FrozenModel):
    """Base of the events: frozen, unknown keys refused."""


class TaskClosed(EventModel):
    """A task was decided by `by`, or closed by its deadline (`timed_out`, by the system)."""

    kind: Literal["task_closed"] = "task_closed"
    step: str
    outcome: str
    fields: dict[str, Any] = Field(default_factory=dict)
    comment: str = ""
    by: str


class ApprovalDecided(EventModel):
    """A level of an approval chain ended (the kernel's `approval_level`): approved,
    rejected, or timed_out past its deadline."""

    kind: Literal["approval_decided"] = "approval_decided"
    step: str
    level: int
    outcome: str
    by: str


class WaitEnded(EventModel):
    """A wait ended: its event `received` (with the event's fields), or its time reached."""

    kind: Literal["wait_ended"] = "wait_ended"
    step: str
    outcome: Literal["received", "timed_out"]
    fields: dict[str, Any] = Field(default_factory=dict)


class CallDone(EventModel):
    kind: Literal["call_done"] = "call_done"
    step: str
    output: dict[str, Any] = Field(default_factory=dict)


class CallFailed(EventModel):
    """A call failed after the catalog's retries."""

    kind: Literal["call_failed"] = "call_failed"
    step: str
    error: str


class SlaBreached(EventModel):
    kind: Literal["sla_breached"] = "sla_breached"
    name: str


EngineEvent = Annotated[
    TaskClosed | ApprovalDecided | WaitEnded | CallDone | CallFailed | SlaBreached,
    Field(discriminator="kind"),
]


# ----------------------------------------------------------------------------- entry points
def start(
    blueprint: Blueprint, input_values: Mapping[str, Any]
) -> tuple[EngineState, list[Command]]:
    """A new instance with `input_values`: in its start stage (or past it), with the
    commands to run. `EngineRefusal` for input that does not fit the blueprint's."""
    run = _Run(blueprint, EngineState(process=blueprint.process, stage=blueprint.start))
    values = run.read_fields(blueprint.input, input_values, "input")
    missing = [
        name for name, spec in blueprint.input.items() if spec.required and name not in values
    ]
    if missing:
        raise EngineRefusal(INVALID_DECISION, f"input: {', '.join(missing)} required")
    run.state.fields = values
    run.enter(blueprint.start, came_from=None, rule=None)
    return run.state, run.commands


def apply(
    blueprint: Blueprint, state: EngineState, event: EngineEvent
) -> tuple[EngineState, list[Command]]:
    """The state after `event`, and the commands to run; `state` itself is left as it was.
    `EngineRefusal` for an event that does not fit it."""
    if state.process != blueprint.process:
        raise ValueError(f"a {state.process} instance, not one of {blueprint.process}")
    run = _Run(blueprint, state.model_copy(deep=True))
    run.handle(event)
    return run.state, run.commands


def migrate(old: Blueprint, new: Blueprint, state: EngineState) -> EngineState:
    """The state of a waiting instance of `old`, moved to `new` (another version of the same
    process): the same stage, visits, fields and open steps, read by `new` from now on.
    `EngineRefusal` (Conflict) when the move is not safe: the instance has ended, is inside a
    parallel step, is in a stage `new` lacks (unmapped), waits on a step that `new`'s stage
    lacks or has of another kind, has an open task whose outcomes `new` does not offer, an open
    approval `new` defines otherwise, a running SLA `new` does not have, or a field value of a
    type `new` declares otherwise."""
    if old.process != new.process:
        raise EngineRefusal(CONFLICT, f"{new.process} is another process than {old.process}")

    def refuse_(message: str) -> EngineRefusal:
        return EngineRefusal(CONFLICT, message)

    if state.ended:
        raise refuse_(f"the instance has ended ({state.outcome}); there is nothing to move")
    if set(state.branches) - {MAIN}:
        raise refuse_(f"the instance is inside a parallel step of stage {state.stage!r}")
    target = new.stages.get(state.stage)
    if target is None or target.end is not None:
        raise refuse_(f"stage {state.stage!r} does not exist in the target version (unmapped)")
    was, now = stage_layout(old.stages[state.stage]), stage_layout(target)
    for key, opened in state.open.items():
        place = now.places.get(key)
        moved = place is not None and place.index != was.places[key].index
        if (
            place is None
            or moved
            or place.step.KIND != opened.kind
            or place.branch != opened.branch
        ):
            message = f"the open {opened.kind} {key!r} does not exist in stage {state.stage!r} "
            raise refuse_(message + "of the target version")
        before = was.places[key].step
        if isinstance(before, TaskStep) and isinstance(place.step, TaskStep):
            dropped = sorted(set(before.outcomes) - set(place.step.outcomes))
            if dropped:
                message = f"the open task {key!r} offers outcomes the target version drops"
                raise refuse_(f"{message}: {', '.join(dropped)}")
        elif before != place.step:
            raise refuse_(f"the open {opened.kind} {key!r} is defined otherwise in the target")
    if (
        was.keys[MAIN][: state.branches.get(MAIN, 0)]
        != now.keys[MAIN][: state.branches.get(MAIN, 0)]
    ):
        raise refuse_(f"the steps of stage {state.stage!r} done so far differ in the target")
    for name in state.slas:
        try:
            sla_spec(new, name)
        except (KeyError, AssertionError, StopIteration):
            raise refuse_(f"the SLA {name!r} is running and the target version has none") from None
    specs = field_specs(new)
    for name in state.fields:
        before_spec, after = field_specs(old).get(name), specs.get(name)
        if after is not None and before_spec is not None and after.type != before_spec.type:
            message = f"field {name!r} is a {before_spec.type} and the target declares a "
            raise refuse_(message + after.type)
    return state.model_copy(deep=True)


def field_specs(blueprint: Blueprint) -> dict[str, FieldSpec]:
    """The instance's fields by name (input, tasks, events: the first declaration)."""
    return check._field_index(blueprint)[0]


def task_required(step: TaskStep) -> dict[str, list[str]]:
    """Outcome -> what it needs (`TaskStep.needs`)."""
    return step.needs()


def task_times(timers: Timers | None) -> TaskTimes:
    """A blueprint's timer set as the kernel's `TaskTimes`."""
    if timers is None:
        return TaskTimes()
    return TaskTimes(
        business_time=timers.business_time,
        remind_after=timers.remind_after,
        deadline=timers.deadline,
        escalations=[TaskEscalation(after=e.after, to_role=e.to_role) for e in timers.escalations],
    )


def sla_spec(blueprint: Blueprint, name: str) -> StageSla:
    """The SLA a name stands for: a stage's (`stage:<stage>`) or a process SLA."""
    if name.startswith(STAGE_SLA):
        sla = blueprint.stages[name.removeprefix(STAGE_SLA)].sla
        assert sla is not None
        return sla
    return next(sla for sla in blueprint.sla if sla.name == name)


def idempotency_key(stage: str, visit: int, step: str) -> str:
    """The workflow-independent part of a call's idempotency key."""
    return f"{stage}:{visit}:{step}"


# ----------------------------------------------------------------------------- stage layout
@dataclass(frozen=True)
class Place:
    """Where a step is: its branch and index there."""

    branch: str
    index: int
    step: Step


@dataclass(frozen=True)
class StageLayout:
    """A stage's steps by branch, each with its key (its name, or `#<place>`)."""

    keys: dict[str, list[str]]  # branch -> the keys of its steps, in order
    places: dict[str, Place]  # key -> place
    parents: dict[str, str]  # a parallel's branch -> the parallel's key
    children: dict[str, list[str]]  # a parallel's key -> its branches


def stage_layout(stage: Stage) -> StageLayout:
    """The layout of a stage's `do`, its parallels' branches included."""
    layout = StageLayout({}, {}, {}, {})

    def add(branch: str, steps: Sequence[Step], loc: tuple[str | int, ...]) -> None:
        layout.keys[branch] = []
        for i, step in enumerate(steps):
            here = (*loc, i, step.KIND)
            key = step.step_name or "#" + ".".join(map(str, here))
            layout.keys[branch].append(key)
            layout.places[key] = Place(branch, i, step)
            if isinstance(step, ParallelStep):
                layout.children[key] = []
                for name, inner in step.branches.items():
                    child = f"{step.parallel}.{name}"
                    layout.children[key].append(child)
                    layout.parents[child] = key
                    add(child, inner, (*here, "branches", name))

    add(MAIN, stage.do, ())
    return layout


# ----------------------------------------------------------------------------- one transition
class _Run:
    """One transition: the state (a copy, changed in place) and the commands so far."""

    def __init__(self, blueprint: Blueprint, state: EngineState) -> None:
        self.blueprint = blueprint
        self.state = state
        self.commands: list[Command] = []
        self.specs = field_specs(blueprint)
        self.by_person = False  # the event is a person's: an end missing fields refuses it
        self._layouts: dict[str, StageLayout] = {}

    @property
    def stage(self) -> Stage:
        return self.blueprint.stages[self.state.stage]

    @property
    def layout(self) -> StageLayout:
        name = self.state.stage
        if name not in self._layouts:
            self._layouts[name] = stage_layout(self.blueprint.stages[name])
        return self._layouts[name]

    def emit(self, command: Command) -> None:
        self.commands.append(command)

    # ================================================================== events
    def handle(self, event: EngineEvent) -> None:
        match event:
            case TaskClosed():
                self.task_closed(event)
            case ApprovalDecided():
                self.approval_decided(event)
            case WaitEnded():
                self.wait_ended(event)
            case CallDone():
                self.call_done(event)
            case CallFailed():
                self.open_step(event.step, "call")
                self.fail(event.step, event.error)
            case SlaBreached():
                self.sla_breached(event.name)

    def open_step(self, key: str, kind: StepKind) -> tuple[OpenStep, Step]:
        """The open step an event names, of the kind the event is for; refused otherwise."""
        self.refuse_if_ended()
        place = self.layout.places.get(key)
        if place is None:
            known = ", ".join(self.layout.places) or "none"
            message = f"no step {key!r} in stage {self.state.stage!r}; its steps: {known}"
            raise EngineRefusal(TASK_NOT_FOUND, message)
        opened = self.state.open.get(key)
        if opened is None:
            done = self.state.outcomes.get(key)
            message = f"step {key!r} is not open" + (f" (it ended {done})" if done else "")
            raise EngineRefusal(CONFLICT, message)
        if opened.kind != kind:
            raise EngineRefusal(CONFLICT, f"step {key!r} is a {opened.kind}, not a {kind}")
        return opened, place.step

    def refuse_if_ended(self) -> None:
        if self.state.ended:
            message = f"the instance has ended ({self.state.outcome}, in {self.state.stage})"
            raise EngineRefusal(CONFLICT, message)

    def task_closed(self, event: TaskClosed) -> None:
        _, step = self.open_step(event.step, "task")
        assert isinstance(step, TaskStep)
        outcome, by_deadline = event.outcome, False
        if event.outcome == TIMED_OUT and step.timers and step.timers.on_deadline is not None:
            outcome, by_deadline = step.timers.on_deadline, True  # the kernel's deadline close
        elif event.outcome not in step.outcomes:
            offered = ", ".join(step.outcomes)
            message = f"outcome: {event.outcome!r} is not one of the task's: {offered}"
            raise EngineRefusal(INVALID_DECISION, message)
        values = self.read_fields(step.fields, event.fields, f"task {event.step!r}")
        if not by_deadline:
            needed = task_required(step).get(outcome, [])
            given = {**values, COMMENT: event.comment.strip() or None}
            missing = [name for name in needed if given.get(name) is None]
            if missing:
                message = f"{', '.join(missing)}: required when the outcome is {outcome!r}"
                raise EngineRefusal(INVALID_DECISION, message)
        self.by_person = not by_deadline and event.by != SYSTEM_ACTOR
        self.state.fields.update(values)
        self.step_done(event.step, outcome)

    def approval_decided(self, event: ApprovalDecided) -> None:
        opened, step = self.open_step(event.step, "approval")
        assert isinstance(step, ApprovalStep)
        if event.level != opened.level:
            message = f"level {event.level} of approval {event.step!r} is not open; level "
            raise EngineRefusal(CONFLICT, message + f"{opened.level} is")
        if event.outcome not in step.step_outcomes:
            offered = ", ".join(step.step_outcomes)
            message = f"outcome: {event.outcome!r} is not one of the approval's: {offered}"
            raise EngineRefusal(INVALID_DECISION, message)
        self.by_person = event.by != SYSTEM_ACTOR
        if event.outcome == APPROVED and opened.level + 1 < len(opened.chain):
            opened.level += 1
            self.open_level(event.step, step, opened)
            return
        self.step_done(event.step, event.outcome)

    def wait_ended(self, event: WaitEnded) -> None:
        _, step = self.open_step(event.step, "wait")
        assert isinstance(step, WaitStep)
        name = step.wait.event
        values: dict[str, FieldValue] = {}
        if name is None and event.outcome != TIMED_OUT:
            message = f"wait {event.step!r} waits for a time: it ends timed_out"
            raise EngineRefusal(INVALID_DECISION, message)
        if event.outcome == TIMED_OUT and event.fields:
            raise EngineRefusal(INVALID_DECISION, "fields: a wait that timed out has none")
        if name is not None and event.outcome == RECEIVED:
            specs = self.blueprint.events[name].fields
            values = self.read_fields(specs, event.fields, f"event {name!r}")
            missing = [f for f, spec in specs.items() if spec.required and f not in values]
            if missing:
                message = f"{', '.join(missing)}: required by the event {name!r}"
                raise EngineRefusal(INVALID_DECISION, message)
            self.by_person = True
        self.state.fields.update(values)
        self.step_done(event.step, event.outcome if name is not None else None)

    def call_done(self, event: CallDone) -> None:
        _, step = self.open_step(event.step, "call")
        assert isinstance(step, CallStep)
        try:
            CATALOG[step.call].output_model.model_validate(event.output)
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(map(str, e["loc"]))
            message = f"output of {step.call}: {where + ': ' if where else ''}{e['msg']}"
            raise EngineRefusal(INVALID_DECISION, message) from None
        self.step_done(event.step, None)

    def sla_breached(self, name: str) -> None:
        self.refuse_if_ended()
        if name not in self.state.slas:
            running = ", ".join(self.state.slas) or "none"
            raise EngineRefusal(CONFLICT, f"SLA {name!r} is not running; running: {running}")
        self.state.slas.remove(name)
        rounds = self.state.sla_rounds[name]
        steps = [key for key, o in self.state.open.items() if o.kind in ("task", "approval")]
        for i, action in enumerate(sla_spec(self.blueprint, name).on_breach):
            key = f"sla:{name}:{rounds}:{i}"
            if action.escalate is not None:
                self.emit(Escalate(sla=name, to_role=action.role, steps=steps, key=key))
            else:
                self.emit(Notify(sla=name, role=action.role, key=key))

    # ================================================================== stages
    def enter(self, target: str, came_from: str | None, rule: int | None) -> None:
        """Enter `target` (or where its max_visits sends the entry) and run it."""
        name, redirected = self.redirect(target)
        if came_from is not None:
            self.stop_sla(STAGE_SLA + came_from)
        state = self.state
        state.stage = name
        state.visits[name] = state.visits.get(name, 0) + 1
        assert not state.open, state.open  # every step of the visit left has ended
        state.outcomes, state.branches, state.ended_branches = {}, {}, []
        stage = self.stage
        self.emit(
            EnterStage(
                stage=name,
                visit=state.visit,
                title=stage.title,
                came_from=came_from,
                rule=rule,
                redirected_from=redirected,
            )
        )
        self.process_slas(name)
        if stage.sla is not None:
            self.start_sla(STAGE_SLA + name, stage.sla, stage=name)
        if stage.end is not None:
            self.end(name, stage.end.outcome, stage.end.required)
            return
        state.branches = {MAIN: 0}
        self.run(MAIN)

    def redirect(self, target: str) -> tuple[str, list[str]]:
        """Where an entry into `target` goes: the first stage on its on_max_visits chain that
        has not had its max_visits, and the stages skipped."""
        name, skipped = target, list[str]()
        while True:
            stage = self.blueprint.stages[name]
            if stage.max_visits is None or self.state.visits.get(name, 0) < stage.max_visits:
                return name, skipped
            assert stage.on_max_visits is not None and stage.on_max_visits not in skipped
            skipped.append(name)
            name = stage.on_max_visits

    def leave(self) -> None:
        """The stage's steps have ended: go where its first `then` rule that holds says."""
        for i, rule in enumerate(self.stage.then or ()):
            if rule.when is None or self.holds(rule.when):
                self.enter(rule.target, came_from=self.state.stage, rule=i)
                return
        raise AssertionError(f"no rule of {self.state.stage}.then holds (the checker's otherwise)")

    def end(self, stage: str, outcome: str, required: Sequence[str], reason: str = "") -> None:
        missing = [name for name in required if name not in self.state.fields]
        if missing and self.by_person:
            message = f"{', '.join(missing)}: the end {stage!r} needs them, and they have no "
            raise EngineRefusal(INVALID_DECISION, message + "value")
        for name in list(self.state.slas):
            self.stop_sla(name)
        fields = dict(self.state.fields)
        self.emit(End(stage=stage, outcome=outcome, fields=fields, missing=missing, reason=reason))
        self.state.stage = stage
        self.state.outcome = outcome
        self.state.branches = {}

    def fail(self, key: str, error: str) -> None:
        """A call failed: the other open steps are withdrawn and the instance ends failed."""
        reason = f"{key} failed: {error}"
        for other, opened in self.state.open.items():
            if other != key:
                self.emit(Withdraw(step=other, step_kind=opened.kind, reason=reason))
        self.state.open = {}
        self.end(FAILED, FAILED, (), reason)

    # ================================================================== SLAs
    def process_slas(self, stage: str) -> None:
        for sla in self.blueprint.sla:
            if stage in sla.until:
                self.stop_sla(sla.name)
        for sla in self.blueprint.sla:
            if sla.from_ == stage and sla.name not in self.state.slas:
                self.start_sla(sla.name, sla, stage=None)

    def start_sla(self, name: str, sla: StageSla, stage: str | None) -> None:
        self.state.slas.append(name)
        self.state.sla_rounds[name] = self.state.sla_rounds.get(name, 0) + 1
        self.emit(
            StartSla(name=name, within=sla.within, business_time=sla.business_time, stage=stage)
        )

    def stop_sla(self, name: str) -> None:
        if name in self.state.slas:
            self.state.slas.remove(name)
            self.emit(StopSla(name=name))

    # ================================================================== branches and steps
    def run(self, branch: str) -> None:
        """Run a branch from its current step until a step waits or the branch ends."""
        keys = self.layout.keys[branch]
        while True:
            index = self.state.branches[branch]
            if index >= len(keys):
                self.branch_ended(branch)
                return
            if self.begin(keys[index], branch):
                return
            self.state.branches[branch] = index + 1

    def branch_ended(self, branch: str) -> None:
        if branch == MAIN:
            self.leave()
            return
        del self.state.branches[branch]
        self.state.ended_branches.append(branch)
        parallel = self.layout.parents[branch]
        if not any(child in self.state.branches for child in self.layout.children[parallel]):
            self.step_done(parallel, None)

    def step_done(self, key: str, outcome: str | None) -> None:
        """A step ended (with `outcome`, which conditions may read): its branch goes on."""
        place = self.layout.places[key]
        if outcome is not None:
            self.state.outcomes[key] = outcome
        self.state.open.pop(key, None)
        self.state.branches[place.branch] = place.index + 1
        self.run(place.branch)

    def begin(self, key: str, branch: str) -> bool:
        """Start a step; True while it waits, False when it ended at once."""
        match self.layout.places[key].step:
            case TaskStep() as step:
                self.open_task(key, step, branch)
            case ApprovalStep() as step:
                return self.open_approval(key, step, branch)
            case CallStep() as step:
                self.call(key, step, branch)
            case WaitStep() as step:
                return self.wait(key, step, branch)
            case ParallelStep():
                children = self.layout.children[key]
                self.state.branches |= {child: 0 for child in children}
                for child in children:
                    self.run(child)  # the last to end joins: the parallel's branch goes on
        return True

    def open_task(self, key: str, step: TaskStep, branch: str) -> None:
        self.state.open[key] = OpenStep(kind="task", branch=branch)
        roles, assignee = list(step.roles or ()), None
        if step.assignee is not None:
            value = self.state.fields.get(step.assignee)
            if isinstance(value, str) and value:
                assignee = value
            else:  # nobody named: the blueprint's owner decides who acts
                roles = [self.blueprint.owner_role]
        self.emit(
            OpenTask(
                step=key,
                branch=branch,
                title=step.title,
                description=step.description,
                roles=roles,
                assignee=assignee,
                fields=dict(step.fields),
                outcomes=list(step.outcomes),
                required=task_required(step),
                four_eyes=step.four_eyes,
                timers=task_times(step.timers),
                on_deadline=step.timers.on_deadline if step.timers else None,
            )
        )

    def open_approval(self, key: str, step: ApprovalStep, branch: str) -> bool:
        amount = self.amount(step)
        chain = [
            i for i, tier in enumerate(step.levels) if amount is None or amount >= tier.min_amount
        ]
        if not chain:  # below every threshold: nothing to approve
            self.state.outcomes[key] = APPROVED
            return False
        opened = OpenStep(kind="approval", branch=branch, chain=chain)
        self.state.open[key] = opened
        self.open_level(key, step, opened)
        return True

    def amount(self, step: ApprovalStep) -> Decimal | None:
        """The approval's amount; None (every level) without an amount field or value."""
        value = self.state.fields.get(step.amount_field) if step.amount_field else None
        return None if value is None else Decimal(str(value))

    def open_level(self, key: str, step: ApprovalStep, opened: OpenStep) -> None:
        tier = step.levels[opened.chain[opened.level]]
        amount = self.amount(step)
        self.emit(
            OpenApproval(
                step=key,
                branch=opened.branch,
                title=step.title,
                level=opened.level,
                levels=len(opened.chain),
                approval=ApprovalLevel(name=tier.name, roles=tier.roles, mode=tier.mode, k=tier.k),
                slot=f"{idempotency_key(self.state.stage, self.state.visit, key)}:{opened.level}",
                timers=task_times(step.timers),
                amount=None if amount is None else format(amount, "f"),
            )
        )

    def call(self, key: str, step: CallStep, branch: str) -> None:
        self.state.open[key] = OpenStep(kind="call", branch=branch)
        params: dict[str, FieldValue | float] = {}
        for name, value in step.with_.items():
            if not isinstance(value, FieldRef):
                params[name] = value
            elif (found := self.state.fields.get(value.field)) is not None:
                params[name] = found  # a field without a value: the parameter's default
        entry = CATALOG[step.call]
        self.emit(
            CallActivity(
                step=key,
                branch=branch,
                activity=step.call,
                params=params,
                idempotency_key=idempotency_key(self.state.stage, self.state.visit, key),
                timeout=entry.timeout,
                retries=entry.retries,
            )
        )

    def wait(self, key: str, step: WaitStep, branch: str) -> bool:
        spec = step.wait
        until = None
        if spec.until is not None:
            value = self.state.fields.get(spec.until)
            if value is None:  # no instant to wait for
                return False
            until = self.instant(self.specs[spec.until], str(value))
        self.state.open[key] = OpenStep(kind="wait", branch=branch)
        self.emit(
            StartWait(
                step=key,
                branch=branch,
                business_time=spec.business_time,
                after=spec.after,
                until=until,
                event=spec.event,
                timeout=spec.timeout,
            )
        )
        return True

    # ================================================================== fields and conditions
    @property
    def zone(self) -> tzinfo:
        """Where a date or a datetime without an offset is read: the calendar's zone, or UTC."""
        calendar = self.blueprint.calendar
        return calendar.zone if calendar is not None else timezone.utc  # noqa: UP017

    def instant(self, spec: FieldSpec, value: str) -> datetime:
        """The instant a date (its midnight) or datetime field's value stands for, in UTC."""
        if spec.type == "date":
            at = datetime.combine(date.fromisoformat(value), time(0), tzinfo=self.zone)
        else:
            at = self.aware(datetime.fromisoformat(value))
        return at.astimezone(timezone.utc)  # noqa: UP017

    def aware(self, at: datetime) -> datetime:
        return at if at.tzinfo is not None else at.replace(tzinfo=self.zone)

    def read_fields(
        self, specs: Mapping[str, FieldSpec], given: Mapping[str, Any], what: str
    ) -> dict[str, FieldValue]:
        """The values given for the fields `specs` declares, as the state keeps them (empty
        ones left out); refused for a field `what` does not have or a value that does not
        fit."""
        unknown = [name for name in given if name not in specs]
        if unknown:
            known = ", ".join(specs) or "none"
            message = f"{', '.join(unknown)}: not a field of the {what}; its fields: {known}"
            raise EngineRefusal(INVALID_DECISION, message)
        values = {}
        for name, value in given.items():
            try:
                kept = coerce(specs[name], value)
            except (ValueError, TypeError, ArithmeticError) as err:
                raise EngineRefusal(INVALID_DECISION, f"{name}: {err}") from None
            if kept is not None:
                values[name] = kept
        return values

    def holds(self, predicate: Predicate) -> bool:
        match predicate:
            case StepIs():
                return self.state.outcomes.get(predicate.step) == predicate.outcome
            case FieldIs():
                return self.compare(predicate)
            case VisitsAtLeast():
                return self.state.visits.get(predicate.visits, 0) >= predicate.gte
            case AllOf():
                return all(self.holds(p) for p in predicate.all)
            case AnyOf():
                return any(self.holds(p) for p in predicate.any)
            case NotOf():
                return not self.holds(predicate.not_)
        raise AssertionError(predicate)

    def compare(self, predicate: FieldIs) -> bool:
        op, literal = predicate.comparison
        spec = self.specs[predicate.field]
        value = self.state.fields.get(predicate.field)
        if value is None:
            return op == "ne"
        left = self.typed(spec, value)
        if op == "in":
            return any(left == self.typed(spec, item) for item in literal)
        right = self.typed(spec, literal)
        match op:
            case "eq":
                return bool(left == right)
            case "ne":
                return bool(left != right)
            case "lt":
                return bool(left < right)
            case "lte":
                return bool(left <= right)
            case "gt":
                return bool(left > right)
            case "gte":
                return bool(left >= right)
        raise AssertionError(op)

    def typed(self, spec: FieldSpec, value: Any) -> Any:
        """A kept value, or a condition's literal, as the field's type compares."""
        match spec.type:
            case "decimal" | "int":
                return Decimal(str(value))
            case "date":
                return date.fromisoformat(str(value))
            case "datetime":
                return self.aware(datetime.fromisoformat(str(value)))
        return value


def coerce(spec: FieldSpec, value: Any) -> FieldValue | None:
    """A value given for a field of `spec`, as the state keeps it; None for no value (None or
    blank text). ValueError (or TypeError) saying why it does not fit."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    match spec.type:
        case "string" | "text" | "email":
            return _text(spec, value)
        case "int":
            whole = _int(value)
            return _bounded(spec, Decimal(whole), whole)
        case "decimal":
            number = _decimal(value)
            return _bounded(spec, number, format(number.normalize(), "f"))
        case "bool":
            return _bool(value)
        case "date":
            if isinstance(value, datetime):
                raise ValueError("a date (YYYY-MM-DD), not a date and time")
            return (value if isinstance(value, date) else date.fromisoformat(value)).isoformat()
        case "datetime":
            found = value if isinstance(value, datetime) else datetime.fromisoformat(value)
            return found.isoformat()
        case "choice":
            if value not in (spec.options or ()):
                raise ValueError(f"{value!r} is not one of {', '.join(spec.options or ())}")
            return str(value)
    raise AssertionError(spec.type)


def _text(spec: FieldSpec, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a string, not {type(value).__name__}")
    limit = spec.max_length or MAX_INPUT_LENGTH
    if len(value) > limit:
        raise ValueError(f"at most {limit} characters")
    if spec.pattern is not None and not re.search(spec.pattern, value):
        raise ValueError(f"{value!r} does not match {spec.pattern}")
    if spec.type == "email" and not re.fullmatch(EMAIL_PATTERN, value):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise TypeError(f"a whole number, not {type(value).__name__}")
    number = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    if not number.is_finite() or number != number.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise TypeError(f"a number, not {type(value).__name__}")
    try:
        number = Decimal(value.strip() if isinstance(value, str) else str(value))
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _bounded(spec: FieldSpec, number: Decimal, kept: FieldValue) -> FieldValue:
    if spec.min is not None and number < spec.min:
        raise ValueError(f"at least {format(spec.min, 'f')}")
    if spec.max is not None and number > spec.max:
        raise ValueError(f"at most {format(spec.max, 'f')}")
    return kept


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{value!r} is not true or false")


# ----------------------------------------------------------------------------- walk
WALK_ACTOR = "walker"
WALK_COMMENT = "walked"
MAX_COMBINATIONS = 64  # field values tried per event
SAMPLE_TEXTS = ("sample", "SAMPLE-1", "AB-123", "a1", "A", "1", "someone@example.com")


@dataclass(frozen=True)
class WalkPath:
    """One path: the events that led it to its end (or to where nothing can go on)."""

    events: tuple[EngineEvent, ...]
    stages: tuple[str, ...]  # entered, in order
    rules: tuple[tuple[str, int], ...]  # (stage, index) of each `then` rule taken
    end_stage: str | None
    outcome: str | None  # None: stuck, no event fits
    commands: int
    history: check.Cost  # Temporal history events and updates, as the checker estimates

    @property
    def ended(self) -> bool:
        return self.outcome is not None


@dataclass(frozen=True)
class Walk:
    """Every path of a blueprint (`truncated` when there were more than `max_paths`)."""

    paths: tuple[WalkPath, ...]
    truncated: bool

    @property
    def stuck(self) -> list[WalkPath]:
        return [path for path in self.paths if not path.ended]

    @property
    def outcomes(self) -> list[str]:
        return list(dict.fromkeys(p.outcome for p in self.paths if p.outcome is not None))

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys(stage for p in self.paths for stage in p.stages))

    @property
    def rules(self) -> list[tuple[str, int]]:
        return list(dict.fromkeys(rule for p in self.paths for rule in p.rules))

    @property
    def worst_commands(self) -> int:
        return max((p.commands for p in self.paths), default=0)

    @property
    def worst_events(self) -> int:
        return max((len(p.events) for p in self.paths), default=0)

    @property
    def worst_history_events(self) -> int:
        return max((p.history.events for p in self.paths), default=0)

    @property
    def worst_updates(self) -> int:
        return max((p.history.updates for p in self.paths), default=0)


@dataclass(frozen=True)
class _Trail:
    """A path so far."""

    events: tuple[EngineEvent, ...] = ()
    stages: tuple[str, ...] = ()
    rules: tuple[tuple[str, int], ...] = ()
    commands: int = 0
    history: check.Cost = field(default_factory=check.Cost)

    def then(
        self, blueprint: Blueprint, stage: str, event: EngineEvent | None, commands: list[Command]
    ) -> _Trail:
        """The trail after `event` (None: the start) in `stage` and its commands."""
        stages, rules, cost = list(self.stages), list(self.rules), self.history
        for command in commands:
            if isinstance(command, EnterStage):
                if command.came_from is not None and command.rule is not None:
                    rules.append((command.came_from, command.rule))
                stages.append(command.stage)
                stage = command.stage
            cost += command_cost(blueprint, stage, command)
        return replace(
            self,
            events=self.events if event is None else (*self.events, event),
            stages=tuple(stages),
            rules=tuple(rules),
            commands=self.commands + len(commands),
            history=cost,
        )

    def path(self, state: EngineState) -> WalkPath:
        ended = state.ended
        return WalkPath(
            events=self.events,
            stages=self.stages,
            rules=self.rules,
            end_stage=state.stage if ended else None,
            outcome=state.outcome,
            commands=self.commands,
            history=self.history + check.Cost(check.START_AND_END) if ended else self.history,
        )


def command_cost(blueprint: Blueprint, stage: str, command: Command) -> check.Cost:
    """The Temporal history a command costs, by the checker's estimate of its construct
    (`stage`: where the command's step is). An SLA's breach actions are counted with it."""
    match command:
        case EnterStage():
            return check.Cost(check.PROJECTION)
        case OpenTask() | CallActivity() | StartWait():
            return check._step_cost(stage_layout(blueprint.stages[stage]).places[command.step].step)
        case OpenApproval():
            step = stage_layout(blueprint.stages[stage]).places[command.step].step
            assert isinstance(step, ApprovalStep)
            return check._task_cost(step.timers) * len(command.approval.task_roles())
        case StartSla():
            return check._sla_cost(sla_spec(blueprint, command.name))
    return check.Cost()


def walk(
    blueprint: Blueprint,
    input_values: Mapping[str, Any] | None = None,
    *,
    max_paths: int = 10_000,
    max_events: int = 5_000,
    call_failures: bool = True,
    breaches: bool = True,
) -> Walk:
    """Every path of `blueprint` from `input_values` (by default: sample inputs, on both sides
    of every condition on an input field), depth first, the first choice first. Each path
    chooses, at every point, an event of one open step: each outcome of a task (with sample
    field values, both sides of every condition on them) and its deadline, each outcome of an
    approval level, a call's success and (with `call_failures`) its failure, each outcome of
    a wait. With `breaches`, each SLA is breached as soon as it starts (a breach does not
    change the way; its commands count). A path longer than `max_events` counts as stuck."""
    samples = _Samples(blueprint)
    inputs = [dict(input_values)] if input_values is not None else samples.inputs()
    stack: list[tuple[EngineState, _Trail]] = []
    for values in reversed(inputs):
        state, commands = start(blueprint, values)
        trail = _Trail().then(blueprint, blueprint.start, None, commands)
        stack.append(_breach_all(blueprint, state, trail) if breaches else (state, trail))
    paths: list[WalkPath] = []
    while stack and len(paths) < max_paths:
        state, trail = stack.pop()
        if state.ended or len(trail.events) >= max_events:
            paths.append(trail.path(state))
            continue
        onward = []
        for event in _choices(blueprint, state, samples, call_failures):
            try:
                after, commands = apply(blueprint, state, event)
            except EngineRefusal:
                continue  # a sample that does not fit (an end missing fields): not a way on
            step = trail.then(blueprint, state.stage, event, commands)
            onward.append(_breach_all(blueprint, after, step) if breaches else (after, step))
        if not onward:
            paths.append(trail.path(state))
        stack.extend(reversed(onward))
    return Walk(paths=tuple(paths), truncated=bool(stack))


def _breach_all(
    blueprint: Blueprint, state: EngineState, trail: _Trail
) -> tuple[EngineState, _Trail]:
    for name in list(state.slas):
        event = SlaBreached(name=name)
        stage = state.stage
        state, commands = apply(blueprint, state, event)
        trail = trail.then(blueprint, stage, event, commands)
    return state, trail


def _choices(
    blueprint: Blueprint, state: EngineState, samples: _Samples, call_failures: bool
) -> Iterator[EngineEvent]:
    """The events that could come next: for each open step, in the order they opened."""
    places = stage_layout(blueprint.stages[state.stage]).places
    for key, opened in state.open.items():
        match places[key].step:
            case TaskStep() as step:
                required = task_required(step)
                for outcome in step.outcomes:
                    for values in samples.values(step.fields, required.get(outcome, ())):
                        yield TaskClosed(
                            step=key,
                            outcome=outcome,
                            fields=values,
                            comment=WALK_COMMENT,
                            by=WALK_ACTOR,
                        )
                if step.timers is not None and step.timers.deadline is not None:
                    yield TaskClosed(step=key, outcome=TIMED_OUT, by=SYSTEM_ACTOR)
            case ApprovalStep() as step:
                for outcome in step.step_outcomes:
                    by = SYSTEM_ACTOR if outcome == TIMED_OUT else WALK_ACTOR
                    yield ApprovalDecided(step=key, level=opened.level, outcome=outcome, by=by)
            case CallStep() as step:
                output = _sample_output(CATALOG[step.call].output_model)
                yield CallDone(step=key, output=output)
                if call_failures:
                    yield CallFailed(step=key, error="walked")
            case WaitStep(wait=spec) if spec.event is not None:
                fields = blueprint.events[spec.event].fields
                needed = [name for name, f in fields.items() if f.required]
                for values in samples.values(fields, needed):
                    yield WaitEnded(step=key, outcome=RECEIVED, fields=values)
                yield WaitEnded(step=key, outcome=TIMED_OUT)
            case WaitStep():
                yield WaitEnded(step=key, outcome=TIMED_OUT)


def _sample_output(model: type[BaseModel]) -> dict[str, Any]:
    """A result of a catalogued activity: a sample of each required field (a number, true or
    a text, by its annotation)."""
    output: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.is_required():
            kind = info.annotation
            output[name] = 1 if kind in (int, float) else True if kind is bool else WALK_COMMENT
    return output


class _Samples:
    """Sample field values for the walk: one for a field no condition compares; for one
    compared, values on both sides of each comparison (and no value, where none is needed)."""

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint
        self.specs = field_specs(blueprint)
        self.compared: dict[str, list[Any]] = {}
        for stage in blueprint.stages.values():
            for rule in stage.then or ():
                if rule.when is not None:
                    for predicate in _leaves(rule.when):
                        if isinstance(predicate, FieldIs):
                            self._add(predicate)

    def _add(self, predicate: FieldIs) -> None:
        spec = self.specs[predicate.field]
        op, literal = predicate.comparison
        if op == "in":
            values = [*literal, _other(spec, literal)]
        elif op in ("eq", "ne"):
            values = [literal, _other(spec, [literal])]
        else:
            values = [_shift(spec, literal, -1), literal, _shift(spec, literal, 1)]
        found = self.compared.setdefault(predicate.field, [])
        for value in values:
            if value is not None and _fits(spec, value) and value not in found:
                found.append(value)

    def inputs(self) -> list[dict[str, FieldValue]]:
        fields = self.blueprint.input
        return self.values(fields, [name for name, spec in fields.items() if spec.required])

    def values(
        self, fields: Mapping[str, FieldSpec], required: Sequence[str]
    ) -> list[dict[str, FieldValue]]:
        """Combinations of sample values of `fields` (at most MAX_COMBINATIONS)."""
        choices: list[list[Any]] = []
        for name, spec in fields.items():
            compared = self.compared.get(name)
            if compared:
                choices.append([*compared, *([] if name in required else [None])])
            else:
                choices.append([_sample(name, spec)])
        combinations = itertools.islice(itertools.product(*choices), MAX_COMBINATIONS)
        return [
            {name: value for name, value in zip(fields, values, strict=True) if value is not None}
            for values in combinations
        ]


def _leaves(predicate: Predicate) -> Iterator[Predicate]:
    inner = list(operands(predicate))
    if not inner:
        yield predicate
    for _, p in inner:
        yield from _leaves(p)


def _fits(spec: FieldSpec, value: Any) -> bool:
    try:
        return coerce(spec, value) is not None
    except (ValueError, TypeError, ArithmeticError):
        return False


def _sample(name: str, spec: FieldSpec) -> Any:
    """A value that fits the field; ValueError when the walk finds none (a pattern)."""
    candidates: Sequence[Any]
    match spec.type:
        case "int" | "decimal":
            low = spec.min if spec.min is not None else Decimal(1)
            candidates = [int(low) if spec.type == "int" else format(low, "f")]
        case "bool":
            candidates = [True]
        case "date":
            candidates = ["2030-01-01"]
        case "datetime":
            candidates = ["2030-01-01T09:00:00+00:00"]
        case "choice":
            candidates = list(spec.options or ())
        case "email":
            candidates = ["someone@example.com"]
        case _:
            candidates = SAMPLE_TEXTS
    for value in candidates:
        if _fits(spec, value):
            return value
    raise ValueError(f"walk: no sample value fits the field {name!r}: give input_values")


def _other(spec: FieldSpec, taken: Sequence[Any]) -> Any:
    """A value of the field other than every one `taken` (None if there is none)."""
    match spec.type:
        case "choice":
            return next((o for o in spec.options or () if o not in taken), None)
        case "bool":
            return next((b for b in (True, False) if b not in taken), None)
        case "int" | "decimal":
            return _shift(spec, max(Decimal(str(v)) for v in taken), 1)
        case "date" | "datetime":
            return _shift(spec, max(str(v) for v in taken), 1)
    return next((t for t in SAMPLE_TEXTS if t not in taken), None)


def _shift(spec: FieldSpec, value: Any, step: int) -> Any:
    """The value one step (one, a day, an hour) above or below a condition's literal."""
    match spec.type:
        case "int":
            return int(value) + step
        case "decimal":
            return format(Decimal(str(value)) + step, "f")
        case "date":
            return (date.fromisoformat(str(value)) + timedelta(days=step)).isoformat()
        case "datetime":
            return (datetime.fromisoformat(str(value)) + timedelta(hours=step)).isoformat()
    return value
