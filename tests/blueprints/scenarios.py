"""Scenario files of the seed blueprints, and their runner.

A scenario file lies beside its seed (`blueprints/complaint.scenarios.yml` beside
`blueprints/complaint.yaml`; `.yml`, because the seed loader publishes every `*.yaml`). Each
scenario starts one instance of the seed on a Temporal server and drives it through the same
contract the API uses (the `decide`, event and `cancel` updates with an actor's credentials,
the event's gateway model), checking what it expects on the way:

```yaml
blueprint: complaint            # the seed's file name (blueprints/complaint.yaml)
actors:                         # username -> roles: the credentials a decision comes with
  sam: [support]                # (every `by` must be listed; `[]`: a user holding no role)
  max: [service-manager]
scenarios:
  - name: resolved_first_time   # [a-z0-9_]; unique in the file; names the recorded history
    description: ...            # optional
    requester: rita             # who starts the instance (the four-eyes rule's requester)
    start: {ticket_no: T-100, ...}   # the start body, checked by the type's start model;
                                     # its business key is unique in the file
    steps:                      # each step is a mapping of exactly one of these keys:
      - decide: {step: acknowledge, by: sam, outcome: acknowledged}
        # decide the open task of the engine step `step` (the `task:` name in the blueprint,
        # found through `status.step_tasks`); optional `comment` and `fields` (form values:
        # scalars, sent as the form's strings)
      - event: {name: feedback_received, fields: {score: 5}}
        # an external event, through the event's gateway model, then its update
      - cancel: {by: max, reason: duplicate ticket}
      - refused: {decide: {...}, error: FourEyesViolation}
        # one `decide`, `event` or `cancel` that the instance must refuse with that
        # ApplicationError type (workflows/errors.py); its status must be unchanged afterwards
      - advance: P2DT1H         # ISO 8601 duration: time passes on the time-skipping server
      - advance_until: "2035-01-08T10:00:01+00:00"
        # time passes until that instant: less than ten years ahead of the instance's start
        # (the test server's default execution timeout; the instance would time out)
      - expect:                 # at least one of (all must hold, checked on the status):
          stage: record         # the current stage
          open: [record]        # the open steps, exactly (any order)
          fields: {severity: low}      # a subset of the instance's fields (typed by their
                                       # declaration: 5 and "5" are the same int)
          visits: {resolve: 3}         # a subset of the entries per stage
          candidates: {resolve: [support, service-manager]}
            # step -> the candidate roles of its open task, exactly (any order): an escalation
          mails: ["Customer complaint T-100: SLA resolution breached"]
            # subjects that must have been queued so far (others may have been too)
          calls: [notify_customer:complaint_acknowledged]
            # the catalog calls so far, exactly and in order: `<activity>:<template>`, or
            # `<activity>` for a call without a template
    end: {stage: closed, outcome: closed}
      # the instance has ended there; `outcome` is the engine's end outcome (null for a
      # cancellation, whose stage is `cancelled`)
    running: true               # instead of `end`: the instance is still running at the end
```

`load(path)` reads a file into the models below, refusing unknown keys, and checks it against
its seed: step, stage, event and field names, actors, error types, the start body. Every
error names the file, the scenario and the step index. `run(worker, loaded, name)` runs one
scenario on a `ScenarioWorker`: `scenario_worker(env)` (the interpreter with the fake
activities of `tests/blueprints/conftest.py`), or one the caller runs beside the real
activities (tests/blueprints/test_scenarios_real.py). A step that does not hold raises
`ScenarioFailed` naming the scenario, the step index and what was found.

What a run checks besides the instance's status (`mails`, `calls`) it reads through the
worker's `Observer`, since the instance's start: `FakeObserver` (what the fakes were asked)
or `DatabaseObserver` (what the real activities wrote: the outbox's subjects; the catalog
calls from the rows they write, keyed by the call's idempotency key). With `inspect`, `run`
hands the `Outcome` to the caller once every step and the end held, before it terminates an
instance that still runs. With `record` (a directory), it writes the instance's history as
`blueprint__<process>__<scenario>.json` (`{"workflow_id", "history"}`), the format of
`tests/histories/`: record only on the dev server (a scenario with `advance` cannot run there).
"""

from __future__ import annotations

import contextlib
import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.blueprint_calls import NOTE, SYSTEM
from core.db import AuditEntry, OutboxMessage
from tests.blueprints.conftest import SEEDS, BlueprintHarness, CallFakes
from workflows import errors
from workflows.blueprint import check, types
from workflows.blueprint import engine as eng
from workflows.blueprint.interpreter import BlueprintResult, BlueprintStatus, BlueprintWorkflow
from workflows.blueprint.model import ApprovalStep, Blueprint, CallStep, FieldSpec, TaskStep
from workflows.human_task import Actor, DecideInput
from workflows.kernel import CancelInput, HumanProcess
from workflows.registry import ProcessType

ERROR_TYPES = frozenset(v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str))
KERNEL_STAGES = (HumanProcess.CANCELLED_STAGE, HumanProcess.FAILED_STAGE)
Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]
Scalar = str | bool | int | float


# ----------------------------------------------------------------------------- the format
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Decide(Strict):
    step: str
    by: str
    outcome: str
    comment: str = ""
    fields: dict[str, Scalar | None] = Field(default_factory=dict)


class Event(Strict):
    name: str
    fields: dict[str, Any] = Field(default_factory=dict)


class Cancel(Strict):
    by: str
    reason: str = Field(min_length=1)


class Refused(Strict):
    decide: Decide | None = None
    event: Event | None = None
    cancel: Cancel | None = None
    error: str

    @model_validator(mode="after")
    def _one_action(self) -> Refused:
        given = [k for k in ("decide", "event", "cancel") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"one of decide, event, cancel to refuse, not {given or 'none'}")
        return self

    @field_validator("error")
    @classmethod
    def _known_error(cls, value: str) -> str:
        if value not in ERROR_TYPES:
            raise ValueError(
                f"{value!r} is not an error type of workflows/errors.py: "
                f"{', '.join(sorted(ERROR_TYPES))}"
            )
        return value

    @property
    def action(self) -> Decide | Event | Cancel:
        return self.decide or self.event or self.cancel  # type: ignore[return-value]


class Expect(Strict):
    stage: str | None = None
    open: list[str] | None = None
    fields: dict[str, Any] | None = None
    visits: dict[str, int] | None = None
    candidates: dict[str, list[str]] | None = None
    mails: list[str] | None = None
    calls: list[str] | None = None

    @model_validator(mode="after")
    def _something(self) -> Expect:
        if not self.model_fields_set:
            raise ValueError("an expect checks at least one of " + ", ".join(Expect.model_fields))
        return self


def _duration(value: Any) -> timedelta:
    if not isinstance(value, str) or not value.startswith("P"):
        raise ValueError(f"an ISO 8601 duration such as P2DT1H, not {value!r}")
    span = TypeAdapter(timedelta).validate_python(value)
    if span <= timedelta(0):
        raise ValueError(f"a positive duration, not {value}")
    return span


def _instant(value: Any) -> datetime:
    found = value if isinstance(value, datetime) else None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            found = datetime.fromisoformat(value)
    if found is None or found.tzinfo is None:
        raise ValueError(f"an ISO 8601 instant with its offset, not {value!r}")
    return found


class Step(Strict):
    """One step: exactly one of its keys."""

    decide: Decide | None = None
    event: Event | None = None
    cancel: Cancel | None = None
    refused: Refused | None = None
    advance: str | None = None
    advance_until: str | datetime | None = None
    expect: Expect | None = None

    @model_validator(mode="after")
    def _one(self) -> Step:
        given = [k for k in Step.model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            keys = ", ".join(Step.model_fields)
            raise ValueError(f"a step is exactly one of {keys}; given: {given or 'none'}")
        return self

    @field_validator("advance")
    @classmethod
    def _advance(cls, value: str | None) -> str | None:
        if value is not None:
            _duration(value)
        return value

    @field_validator("advance_until")
    @classmethod
    def _until(cls, value: Any) -> Any:
        if value is not None:
            _instant(value)
        return value

    @property
    def kind(self) -> str:
        return next(k for k in Step.model_fields if getattr(self, k) is not None)

    @property
    def passes_time(self) -> bool:
        return self.advance is not None or self.advance_until is not None


class End(Strict):
    stage: str
    outcome: str | None


class Scenario(Strict):
    name: Name
    description: str = ""
    requester: str = Field(min_length=1)
    start: dict[str, Any]
    steps: list[Step] = Field(min_length=1)
    end: End | None = None
    running: Literal[True] | None = None

    @model_validator(mode="after")
    def _how_it_ends(self) -> Scenario:
        if (self.end is None) == (self.running is None):
            raise ValueError("a scenario has `end: {stage, outcome}` or `running: true`")
        return self

    @property
    def passes_time(self) -> bool:
        """It lets time pass: it runs on the time-skipping server only, and is not recorded."""
        return any(step.passes_time for step in self.steps)


class ScenarioFile(Strict):
    blueprint: str
    actors: dict[str, list[str]]
    scenarios: list[Scenario] = Field(min_length=1)


# ----------------------------------------------------------------------------- loading
class ScenarioFileError(ValueError):
    """A scenario file that does not read or does not fit its seed: every problem, each
    naming the scenario and the step index."""


class ScenarioFailed(AssertionError):
    """A scenario step that did not hold."""


@dataclass
class Loaded:
    path: Path
    spec: ScenarioFile
    ptype: ProcessType
    blueprint: Blueprint

    @property
    def process(self) -> str:
        return self.blueprint.process

    @functools.cached_property
    def fields(self) -> dict[str, FieldSpec]:
        """Every field the blueprint declares (input, forms, events), by name."""
        return check._field_index(self.blueprint)[0]

    def scenario(self, name: str) -> Scenario:
        found = [s for s in self.spec.scenarios if s.name == name]
        if not found:
            names = ", ".join(s.name for s in self.spec.scenarios)
            raise KeyError(f"{self.path.name} has no scenario {name!r}; its scenarios: {names}")
        return found[0]


def load(path: Path, seeds: Path = SEEDS) -> Loaded:
    """The scenario file at `path`, checked against its seed (ScenarioFileError otherwise)."""
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ScenarioFileError(f"{path.name}: not YAML: {err}") from None
    if not isinstance(document, dict):
        raise ScenarioFileError(f"{path.name}: a mapping (blueprint, actors, scenarios)")
    try:
        spec = ScenarioFile.model_validate(document)
    except ValidationError as err:
        problems = [_where(document, e["loc"]) + f"{e['msg']}" for e in err.errors()]
        raise ScenarioFileError(_listed(path, problems)) from None
    seed = seeds / f"{spec.blueprint}.yaml"
    if not seed.exists():
        raise ScenarioFileError(f"{path.name}: blueprint: no seed {seed.name} in {seeds}")
    document = check.load_yaml(seed.read_text())
    loaded = Loaded(path, spec, types.from_document(document), check.parse_blueprint(document))
    problems = _Fit(loaded).problems()
    if problems:
        raise ScenarioFileError(_listed(path, problems))
    return loaded


def _listed(path: Path, problems: list[str]) -> str:
    return f"{path.name}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)


def _where(document: Any, loc: tuple[Any, ...]) -> str:
    """`scenario 'name' (#i), step j (kind): rest: ` for a location in the document."""
    parts: list[str] = []
    rest = list(loc)
    if rest[:1] == ["scenarios"] and len(rest) > 1 and isinstance(rest[1], int):
        i = rest[1]
        listed = document.get("scenarios")
        raw = listed[i] if isinstance(listed, list) and i < len(listed) else None
        name = raw.get("name") if isinstance(raw, dict) else None
        parts.append(f"scenario {name!r} (#{i})" if name else f"scenario #{i}")
        rest = rest[2:]
        if rest[:1] == ["steps"] and len(rest) > 1 and isinstance(rest[1], int):
            parts.append(f"step {rest[1]}")
            rest = rest[2:]
    where = ", ".join(parts)
    path = ".".join(map(str, rest))
    return ": ".join(p for p in (where, path) if p) + ": "


class _Fit:
    """The names a file uses, against its seed."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        bp = loaded.blueprint
        self.stages = [*bp.stages, *KERNEL_STAGES]
        self.ends = [n for n, s in bp.stages.items() if s.end is not None] + list(KERNEL_STAGES)
        self.steps: list[str] = []
        self.task_steps: list[str] = []
        self.outcomes: dict[str, list[str]] = {}  # a task step -> its outcomes
        for stage in bp.stages.values():
            for key, place in eng.stage_layout(stage).places.items():
                self.steps.append(key)
                if isinstance(place.step, TaskStep | ApprovalStep):
                    self.task_steps.append(key)
                if isinstance(place.step, TaskStep):
                    self.outcomes.setdefault(key, []).extend(place.step.outcomes)
        self.fields = loaded.fields
        self.out: list[str] = []

    def problems(self) -> list[str]:
        spec = self.loaded.spec
        if spec.blueprint != self.loaded.path.name.removesuffix(".scenarios.yml"):
            self.out.append(f"blueprint: {spec.blueprint!r} is not this file's seed")
        seen_names: set[str] = set()
        seen_keys: dict[str, str] = {}
        for i, scenario in enumerate(spec.scenarios):
            where = f"scenario {scenario.name!r} (#{i})"
            if scenario.name in seen_names:
                self.out.append(f"{where}: name: another scenario has this name")
            seen_names.add(scenario.name)
            try:
                body = self.loaded.ptype.start_model.model_validate(scenario.start)
            except ValidationError as err:
                for e in err.errors():
                    loc = ".".join(map(str, e["loc"]))
                    self.out.append(f"{where}: start.{loc}: {e['msg']}")
            else:
                key = self.loaded.ptype.business_key(body)
                if key in seen_keys:
                    other = seen_keys[key]
                    self.out.append(f"{where}: start: business key {key} is {other!r}'s too")
                seen_keys[key] = scenario.name
            for j, step in enumerate(scenario.steps):
                self.step(f"{where}, step {j} ({step.kind})", step)
            if scenario.end is not None and scenario.end.stage not in self.ends:
                self.unknown(f"{where}: end.stage", "end stage", scenario.end.stage, self.ends)
        return self.out

    def unknown(self, where: str, what: str, name: str, known: list[str]) -> None:
        self.out.append(f"{where}: unknown {what} {name!r}; known: {', '.join(known)}")

    def actor(self, where: str, name: str) -> None:
        if name not in self.loaded.spec.actors:
            self.unknown(where, "actor (list it under actors)", name, list(self.loaded.spec.actors))

    def step(self, where: str, step: Step) -> None:
        action = step.refused.action if step.refused is not None else None
        for item in (step.decide, step.event, step.cancel, action):
            refused = item is action and action is not None
            prefix = where + (": refused" if refused else "")
            match item:
                case Decide():
                    if item.step not in self.task_steps:
                        self.unknown(f"{prefix}: step", "task step", item.step, self.task_steps)
                    outcomes = self.outcomes.get(item.step)
                    if not refused and outcomes and item.outcome not in outcomes:
                        self.unknown(f"{prefix}: outcome", "outcome", item.outcome, outcomes)
                    self.actor(f"{prefix}: by", item.by)
                    for name in item.fields:
                        if name not in self.fields:
                            self.unknown(f"{prefix}: fields", "field", name, list(self.fields))
                case Event():
                    if item.name not in self.loaded.blueprint.events:
                        events = list(self.loaded.blueprint.events)
                        self.unknown(f"{prefix}: name", "event", item.name, events)
                case Cancel():
                    self.actor(f"{prefix}: by", item.by)
        expect = step.expect
        if expect is None:
            return
        if expect.stage is not None and expect.stage not in self.stages:
            self.unknown(f"{where}: stage", "stage", expect.stage, self.stages)
        for name in expect.open or ():
            if name not in self.steps:
                self.unknown(f"{where}: open", "step", name, self.steps)
        for name in expect.candidates or {}:
            if name not in self.task_steps:
                self.unknown(f"{where}: candidates", "task step", name, self.task_steps)
        for name in expect.fields or {}:
            if name not in self.fields:
                self.unknown(f"{where}: fields", "field", name, list(self.fields))
        for name in expect.visits or {}:
            if name not in self.stages:
                self.unknown(f"{where}: visits", "stage", name, self.stages)


# ----------------------------------------------------------------------------- observers
class Observed(Protocol):
    """What one instance left outside its status since it was watched."""

    async def mails(self) -> list[str]:
        """The subjects of the mails it queued, in order."""
        ...

    async def calls(self) -> list[str]:
        """Its catalog calls in order: `<activity>:<template>`, or `<activity>` without one."""
        ...


class Observer(Protocol):
    """Where a run reads the mails and calls of an instance (see `Observed`)."""

    async def watch(self, loaded: Loaded, workflow_id: str) -> Observed:
        """Watch `workflow_id` from now on (called before the instance starts)."""
        ...


def _call_label(activity: str, template: Any) -> str:
    return f"{activity}:{template}" if template else activity


@dataclass
class FakeObserver:
    """What the fake activities (`CallFakes`) were asked."""

    fakes: CallFakes

    async def watch(self, loaded: Loaded, workflow_id: str) -> _FakeObserved:
        fakes = self.fakes
        return _FakeObserved(fakes, workflow_id, len(fakes.calls), len(fakes.batches))


@dataclass
class _FakeObserved:
    fakes: CallFakes
    workflow_id: str
    first_call: int  # where this instance's calls and mails begin among the worker's
    first_batch: int

    async def mails(self) -> list[str]:
        batches = self.fakes.batches[self.first_batch :]
        return [m.subject for b in batches for m in b.mails if m.workflow_id == self.workflow_id]

    async def calls(self) -> list[str]:
        return [
            _call_label(name, req.params.get("template"))
            for name, req in self.fakes.calls[self.first_call :]
            if req.workflow_id == self.workflow_id
        ]


# the row each catalog activity writes (activities/blueprint_calls.py), keyed by the call's
# idempotency key "<workflow_id>:<stage>:<visit>:<step>"
CALL_ROWS: dict[str, type[OutboxMessage] | type[AuditEntry]] = {
    "notify_customer": OutboxMessage,
    "notify_role": OutboxMessage,
    "record_note": AuditEntry,
}


@dataclass
class DatabaseObserver:
    """What the real activities wrote to the records database: the outbox (the mails of the
    projections and of the catalog's mail calls) and the audit log (`record_note`). A call is
    told by its row's idempotency key, whose stage and step name the blueprint's call step,
    and so its activity and its template; the calls are ordered by the (real) time their rows
    were written. A call that failed wrote nothing, and is not seen (the fakes see it)."""

    sessions: async_sessionmaker

    async def watch(self, loaded: Loaded, workflow_id: str) -> _DatabaseObserved:
        steps: dict[tuple[str, str], str] = {}  # (stage, step) -> its call's label
        for stage_name, stage in loaded.blueprint.stages.items():
            for key, place in eng.stage_layout(stage).places.items():
                if not isinstance(place.step, CallStep):
                    continue
                if place.step.call not in CALL_ROWS:
                    raise ValueError(
                        f"{loaded.path.name}: the database shows no call of {place.step.call} "
                        f"(stage {stage_name}, step {key}); it knows {', '.join(CALL_ROWS)}"
                    )
                template = place.step.with_.get("template")
                if template is not None and not isinstance(template, str):
                    raise ValueError(f"{stage_name}.{key}: a template from a field: {template}")
                steps[(stage_name, key)] = _call_label(place.step.call, template)
        async with self.sessions() as session:
            first_mail = await session.scalar(select(func.max(OutboxMessage.id)))
            first_note = await session.scalar(select(func.max(AuditEntry.id)))
        return _DatabaseObserved(
            self.sessions, workflow_id, steps, first_mail or 0, first_note or 0
        )


@dataclass
class _DatabaseObserved:
    sessions: async_sessionmaker
    workflow_id: str
    steps: dict[tuple[str, str], str]
    first_mail: int  # the newest ids when the watch began: the rows after are the instance's
    first_note: int

    async def mails(self) -> list[str]:
        async with self.sessions() as session:
            rows = await session.scalars(
                select(OutboxMessage.subject)
                .where(
                    OutboxMessage.workflow_id == self.workflow_id,
                    OutboxMessage.id > self.first_mail,
                )
                .order_by(OutboxMessage.id)
            )
            return list(rows)

    async def calls(self) -> list[str]:
        async with self.sessions() as session:
            mails = await session.execute(
                select(
                    OutboxMessage.idempotency_key, OutboxMessage.created_at, OutboxMessage.id
                ).where(
                    OutboxMessage.workflow_id == self.workflow_id,
                    OutboxMessage.id > self.first_mail,
                )
            )
            notes = await session.execute(
                select(AuditEntry.event_key, AuditEntry.at, AuditEntry.id).where(
                    AuditEntry.workflow_id == self.workflow_id,
                    AuditEntry.id > self.first_note,
                    AuditEntry.action == NOTE,
                    AuditEntry.actor == SYSTEM,
                )
            )
            found = [(at, 0, i, self._call(key, OutboxMessage)) for key, at, i in mails]
            found += [(at, 1, i, self._call(key, AuditEntry)) for key, at, i in notes]
        # the calls run one after the other: the time each wrote its row orders them
        return [label for *_, label in sorted(found) if label is not None]

    def _call(self, key: str, table: type) -> str | None:
        """The label of the call a row's key names, or None for a row no call wrote."""
        rest = key.removeprefix(f"{self.workflow_id}:")
        parts = rest.split(":")
        if rest == key or len(parts) != 3 or not parts[1].isdigit():
            return None
        label = self.steps.get((parts[0], parts[2]))
        if label is None or CALL_ROWS[label.split(":", 1)[0]] is not table:
            return None
        return label


# ----------------------------------------------------------------------------- running
@dataclass
class Outcome:
    """What a run of a scenario left: its last status and the transitions it took."""

    status: BlueprintStatus
    recorded: Path | None = None
    observed: Observed | None = None  # what the worker's observer saw of the instance

    @property
    def transitions(self) -> list[str]:
        return self.status.transitions

    @property
    def workflow_id(self) -> str:
        return self.status.workflow_id


@dataclass
class ScenarioWorker:
    """A worker running the interpreter on a task queue of `env`, shared by the scenarios run
    on it (one after the other), and where the runs read what their instances did besides
    their status: `scenario_worker` (the fakes of conftest.py), or one the caller runs beside
    the real activities, with a `DatabaseObserver`."""

    env: WorkflowEnvironment
    task_queue: str
    observer: Observer
    # the fake activities, if they run here (the harness's; nothing reads them otherwise)
    fakes: CallFakes = field(default_factory=CallFakes)


@contextlib.asynccontextmanager
async def scenario_worker(env: WorkflowEnvironment) -> AsyncIterator[ScenarioWorker]:
    fakes = CallFakes()
    task_queue = f"scenarios-{uuid.uuid4()}"
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[BlueprintWorkflow],
        activities=fakes.activities(),
    ):
        yield ScenarioWorker(env, task_queue, FakeObserver(fakes), fakes)


Inspect = Callable[[Outcome], Awaitable[None]]


async def run(
    worker: ScenarioWorker,
    loaded: Loaded,
    name: str,
    *,
    record: Path | None = None,
    inspect: Inspect | None = None,
) -> Outcome:
    """Run the scenario `name` of `loaded` on `worker` (ScenarioFailed when a step does not
    hold); with `record`, write its history there; with `inspect`, await it with the outcome
    once every step and the end held. The instance is terminated at the end if it still
    runs."""
    scenario = loaded.scenario(name)
    if record is not None and scenario.passes_time:
        raise ValueError(f"{name} lets time pass: it cannot be recorded on the dev server")
    harness = BlueprintHarness(worker.env.client, worker.env, worker.task_queue, worker.fakes)
    runner = _Runner(loaded, scenario, harness, worker.observer)
    try:
        await runner.start()
        for i, step in enumerate(scenario.steps):
            runner.at = f"step {i} ({step.kind})"
            await runner.step(step)
        runner.at = "end" if scenario.end is not None else "running"
        status = await runner.finish()
        written = None
        if record is not None:
            written = await runner.record(record)
        outcome = Outcome(status=status, recorded=written, observed=runner.observed)
        if inspect is not None:
            await inspect(outcome)
        return outcome
    finally:
        await harness.terminate_leftovers()


class _Runner:
    def __init__(
        self, loaded: Loaded, scenario: Scenario, harness: BlueprintHarness, observer: Observer
    ) -> None:
        self.loaded = loaded
        self.scenario = scenario
        self.harness = harness
        self.observer = observer
        self.observed: Observed | None = None
        self.handle: WorkflowHandle | None = None
        self.at = "start"
        self.closed: BlueprintStatus | None = None

    # ------------------------------------------------------------------ helpers
    def fail(self, message: str) -> ScenarioFailed:
        where = f"{self.loaded.path.name}: scenario {self.scenario.name!r}, {self.at}"
        return ScenarioFailed(f"{where}: {message}")

    def actor(self, username: str) -> Actor:
        return Actor(username=username, roles=list(self.loaded.spec.actors[username]))

    @property
    def h(self) -> WorkflowHandle:
        assert self.handle is not None
        return self.handle

    @property
    def obs(self) -> Observed:
        assert self.observed is not None
        return self.observed

    async def status(self) -> BlueprintStatus:
        """The status once the instance has acted on everything so far (the `settle`
        update), or the `status` query of an instance that has closed."""
        if self.closed is not None:
            return self.closed
        desc = await self.h.describe()
        if desc.status == WorkflowExecutionStatus.RUNNING:
            try:
                return await self.h.execute_update("settle", result_type=BlueprintStatus)
            except (RPCError, WorkflowUpdateFailedError):
                desc = await self.h.describe()
                if desc.status == WorkflowExecutionStatus.RUNNING:
                    raise
        if desc.status not in (
            WorkflowExecutionStatus.COMPLETED,
            WorkflowExecutionStatus.RUNNING,
        ):
            raise self.fail(f"the workflow is {desc.status.name if desc.status else '?'}")
        if self.closed is None:  # a closed instance's status no longer changes
            self.closed = await self.h.query("status", result_type=BlueprintStatus)
        return self.closed

    # ------------------------------------------------------------------ steps
    async def start(self) -> None:
        ptype = self.loaded.ptype
        try:
            details = ptype.start_model.model_validate(self.scenario.start)
        except ValidationError as err:  # load() checked it; kept for a clear message
            raise self.fail(f"start: {err}") from None
        workflow_id = ptype.workflow_id(ptype.business_key(details))
        self.observed = await self.observer.watch(self.loaded, workflow_id)
        self.handle = await self.harness.start(
            ptype, self.scenario.start, requester=self.scenario.requester
        )

    async def step(self, step: Step) -> None:
        if step.decide is not None:
            await self.send(step.decide)
        elif step.event is not None:
            await self.send(step.event)
        elif step.cancel is not None:
            await self.send(step.cancel)
        elif step.refused is not None:
            await self.refused(step.refused)
        elif step.advance is not None:
            await self.harness.env.sleep(_duration(step.advance))
        elif step.advance_until is not None:
            now = await self.harness.env.get_current_time()
            until = _instant(step.advance_until)
            if until <= now:
                raise self.fail(f"advance_until: {until} is not ahead of the server's {now}")
            await self.harness.env.sleep(until - now)
        elif step.expect is not None:
            await self.expect(step.expect)

    async def send(self, action: Decide | Event | Cancel) -> Any:
        """Send one action through its update; ScenarioFailed (with its refusal) if refused."""
        try:
            return await self._send(action)
        except WorkflowUpdateFailedError as err:
            raise self.fail(f"refused: {_refusal(err)}") from None

    async def _send(self, action: Decide | Event | Cancel) -> Any:
        match action:
            case Decide():
                task_id = await self._task_of(action.step)
                inp = DecideInput(
                    task_id=task_id,
                    outcome=action.outcome,
                    comment=action.comment,
                    fields={k: _form(v) for k, v in action.fields.items() if v is not None},
                    actor=self.actor(action.by),
                )
                return await self.h.execute_update("decide", inp)
            case Event():
                # an event comes from outside: after the instance has acted on what came
                # before (a decision is answered before the calls it causes)
                await self.status()
                event = self.loaded.ptype.events[action.name]
                try:
                    body = event.model.model_validate(action.fields)
                except ValidationError as err:
                    raise self.fail(f"the gateway refuses the event's fields: {err}") from None
                return await self.h.execute_update(event.update, body, result_type=dict)
            case Cancel():
                await self.status()
                inp = CancelInput(reason=action.reason, actor=self.actor(action.by))
                return await self.h.execute_update("cancel", inp)

    async def _task_of(self, step: str) -> str:
        status = await self.status()
        tasks = status.step_tasks.get(step)
        if not tasks:
            raise self.fail(
                f"step {step!r} has no open task; open steps: {status.open_steps} "
                f"(stage {status.stage})"
            )
        open_ids = {t.task_id for t in status.pending_tasks}
        pending = [t for t in tasks if t in open_ids]
        if len(pending) != 1:
            raise self.fail(f"step {step!r} has {len(pending)} open tasks, not one: {pending}")
        return pending[0]

    async def refused(self, refused: Refused) -> None:
        before = await self.status()
        try:
            await self._send(refused.action)
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            if not isinstance(cause, ApplicationError) or cause.type != refused.error:
                raise self.fail(f"refused with {_refusal(err)}, not {refused.error}") from None
        else:
            raise self.fail(f"accepted; expected the refusal {refused.error}")
        after = await self.status()
        if after != before:
            a, b = after.model_dump(mode="json"), before.model_dump(mode="json")
            changed = [k for k in a if a[k] != b.get(k)]
            raise self.fail(f"refused, but the status changed: {changed}")

    async def expect(self, expect: Expect) -> None:
        status = await self.status()
        wrong: list[str] = []
        if expect.stage is not None and status.stage != expect.stage:
            wrong.append(f"stage is {status.stage!r}, not {expect.stage!r}")
        if expect.open is not None and sorted(status.open_steps) != sorted(expect.open):
            wrong.append(f"open steps are {status.open_steps}, not {expect.open}")
        for name, value in (expect.fields or {}).items():
            want = self._typed(name, value)
            if name not in status.fields:
                wrong.append(f"field {name} has no value; expected {want!r}")
            elif status.fields[name] != want:
                wrong.append(f"field {name} is {status.fields[name]!r}, not {want!r}")
        for name, count in (expect.visits or {}).items():
            if status.visits.get(name, 0) != count:
                wrong.append(f"visits of {name}: {status.visits.get(name, 0)}, not {count}")
        for step, roles in (expect.candidates or {}).items():
            found = self._candidates(status, step)
            if found is None:
                wrong.append(f"candidates of {step}: it has no open task ({status.open_steps})")
            elif sorted(found) != sorted(roles):
                wrong.append(f"candidates of {step} are {found}, not {roles}")
        if expect.mails is not None:
            subjects = await self.obs.mails()
            missing = [s for s in expect.mails if s not in subjects]
            if missing:
                wrong.append(f"mails not queued: {missing}; queued: {subjects}")
        if expect.calls is not None:
            calls = await self.obs.calls()
            if calls != expect.calls:
                wrong.append(f"calls are {calls}, not {expect.calls}")
        if wrong:
            raise self.fail("; ".join(wrong))

    def _typed(self, name: str, value: Any) -> Any:
        try:
            return eng.coerce(self.loaded.fields[name], value)
        except (TypeError, ValueError, ArithmeticError) as err:
            message = f"field {name}: the expected value {value!r} does not fit: {err}"
            raise self.fail(message) from None

    @staticmethod
    def _candidates(status: BlueprintStatus, step: str) -> list[str] | None:
        ids = set(status.step_tasks.get(step, ()))
        found = [t for t in status.pending_tasks if t.task_id in ids]
        if len(found) != 1:
            return None
        return list(found[0].candidate_roles)

    async def finish(self) -> BlueprintStatus:
        status = await self.status()
        end = self.scenario.end
        if end is None:
            desc = await self.h.describe()
            if desc.status != WorkflowExecutionStatus.RUNNING:
                raise self.fail(f"the instance has ended in {status.stage} ({status.outcome})")
            return status
        ends = {n for n, s in self.loaded.blueprint.stages.items() if s.end is not None}
        if status.stage not in ends | set(KERNEL_STAGES):
            raise self.fail(
                f"still running in stage {status.stage!r} (open steps {status.open_steps}); "
                f"expected the end {end.stage!r}"
            )
        # it has ended: its result comes in real time. Never with time skipping unlocked:
        # the test server would skip to a timer of any instance (a closed one's execution
        # timeout too), moving the clock years ahead for the scenarios that follow
        no_skipping = getattr(self.harness.env, "auto_time_skipping_disabled", None)
        with no_skipping() if no_skipping is not None else contextlib.nullcontext():
            result = BlueprintResult.model_validate(await self.h.result())
        found = (result.stage, result.outcome)
        if found != (end.stage, end.outcome):
            raise self.fail(f"ended in {found}, not {(end.stage, end.outcome)}")
        return status

    async def record(self, directory: Path) -> Path:
        history = await self.h.fetch_history()
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / f"blueprint__{self.loaded.process}__{self.scenario.name}.json"
        document = {"workflow_id": history.workflow_id, "history": json.loads(history.to_json())}
        out.write_text(json.dumps(document))
        return out


def _form(value: Scalar) -> str:
    """A form value as the API receives it (a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _refusal(err: WorkflowUpdateFailedError) -> str:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}"
    return f"{type(cause).__name__}: {cause}"


def transitions_of(blueprint: Blueprint) -> list[str]:
    """Every transition a path of the blueprint can take (`walk(...).rules`), and every
    max_visits redirect: as `BlueprintStatus.transitions` names them."""
    rules = [f"{stage}.then[{i}]" for stage, i in eng.walk(blueprint).rules]
    redirects = [f"{name}.max_visits" for name, s in blueprint.stages.items() if s.max_visits]
    return rules + redirects
