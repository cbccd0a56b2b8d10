"""The blueprint checker: everything a blueprint must satisfy to be published, as pure functions.

`parse_blueprint(document)` returns the `Blueprint` or raises one pydantic `ValidationError`
whose every error names its path (`stages.resolve.do.0.task.outcomes`), as a policy's does; the
API answers it with 422. Beyond the models' own checks (unknown keys, names and types,
durations from 1 second to 366 days, timers in order, fields a task's `required` names, k <= n,
`then` rules ending with `otherwise`), it checks the document as a whole:

- references: the business key, `start`, `then` targets, `on_max_visits`, SLA stages, stage
  `visits`, steps and their outcomes in a stage's conditions, fields (of the input, any task or
  any event: one name, one type), activities of the catalog and their parameters, events;
- business time: it needs the blueprint's `calendar`; timers in order in business terms, and
  short enough that the calendar always gives a due;
- the stage graph: every stage reachable from `start`, an end reachable from every stage, every
  loop bounded by a stage's `max_visits` (an `on_max_visits` that leads back into the loop
  counts as part of it), no `on_max_visits` chain that comes back on itself;
- the history budget: the worst case of Temporal history events and updates of one instance,
  estimated per construct (`Cost`) and multiplied by the visits each stage can get, stays
  within `EVENT_BUDGET` and `UPDATE_BUDGET`, well under Temporal's limits.

`warnings` names what is allowed but suspicious (roles no one holds, events no one waits for);
`canonical_json` / `version_id` name a version by its content; `diff` says what a new version
changes; `load_yaml` reads a document. No I/O: `load_yaml` takes the text.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass
from datetime import date, datetime
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import InitErrorDetails

from workflows.blueprint.catalog import CATALOG
from workflows.blueprint.model import (
    COMMENT,
    ORDERED_TYPES,
    ORDERINGS,
    ApprovalStep,
    Blueprint,
    CallStep,
    FieldIs,
    FieldRef,
    FieldSpec,
    Loc,
    ParallelStep,
    Predicate,
    Stage,
    StageSla,
    Step,
    StepIs,
    TaskStep,
    Timers,
    VisitsAtLeast,
    WaitSpec,
    WaitStep,
    operands,
    walk_steps,
)
from workflows.calendar import BusinessDuration, business_minutes, day_minutes, due_always_exists
from workflows.documents import document_error, document_refusal, show_value
from workflows.kernel import HumanProcess

# Temporal refuses a history beyond 51,200 events and 2,000 updates; a blueprint stays well
# under both in its worst case (the kernel continues as new long before, when Temporal says so)
TEMPORAL_EVENT_LIMIT = 51_200
TEMPORAL_UPDATE_LIMIT = 2_000
EVENT_BUDGET = 10_000
PARSED_KEPT = 64  # parsed versions a worker keeps (parsed_version)
UPDATE_BUDGET = 1_000

# History events per construct, as the kernel records them
WORKFLOW_TASK = 3  # scheduled, started, completed: after each thing the workflow waited for
PROJECTION = 2  # the projection's local-activity marker and search-attribute upsert, per wait
UPDATE = 2 + WORKFLOW_TASK + 2  # accepted, completed; the wait's timer cancelled and started again
TIMER = 2 + WORKFLOW_TASK  # started, fired
ACTIVITY = 3 + WORKFLOW_TASK  # scheduled, started, completed (retries add no events)
TASK_UPDATES = 4  # a decision, and the claims, releases or delegations before it
START_AND_END = 2 + WORKFLOW_TASK + PROJECTION + 1  # started, first task, last write, completed

# the stages the kernel ends an instance in by itself: no blueprint stage may take their names
RESERVED_STAGES = (HumanProcess.FAILED_STAGE, HumanProcess.CANCELLED_STAGE)
KEY_TYPES = ("string", "email", "int")
ASSIGNEE_TYPES = ("string", "email")
AMOUNT_TYPES = ("int", "decimal")
UNTIL_TYPES = ("date", "datetime")
VALUE_WORDS: Mapping[str, str] = MappingProxyType(
    {
        "bool": "true or false",
        "int": "a whole number",
        "decimal": "a number",
        "date": "a date (YYYY-MM-DD)",
        "datetime": "a date and time (ISO 8601)",
    }
)


@dataclass(frozen=True)
class Problem:
    """A warning: allowed, but probably not what the author meant."""

    loc: Loc
    kind: str
    message: str

    @property
    def path(self) -> str:
        return _path(self.loc)


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (`*name`): a blueprint spells every part out, and
    a few nested aliases would make a document that expands to billions of nodes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a blueprint", event.start_mark
            )
        return super().compose_node(parent, index)


# ----------------------------------------------------------------------------- entry points
def load_yaml(text: str) -> dict[str, Any]:
    """The document a YAML text holds (PyYAML's safe loader, aliases refused); a ValidationError
    if it is not YAML or not a mapping."""
    try:
        document = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, RecursionError) as err:
        raise document_refusal(
            "Blueprint", [document_error((), "yaml", f"not YAML: {err}", None)]
        ) from None
    if not isinstance(document, dict):
        message = "a blueprint is a YAML mapping (process: ..., stages: ...), "
        message += f"not {type(document).__name__}"
        raise document_refusal("Blueprint", [document_error((), "not_a_mapping", message, None)])
    return document


def parse_blueprint(document: dict[str, Any]) -> Blueprint:
    """The blueprint of a document, checked as a whole; a ValidationError naming every
    problem's path otherwise."""
    blueprint = Blueprint.model_validate(document)
    errors = document_errors(blueprint)
    if errors:
        raise document_refusal("Blueprint", errors)
    return blueprint


def canonical_json(document: dict[str, Any]) -> str:
    """The document's one text: the parsed blueprint in JSON (defaults left out), keys sorted,
    no whitespace; spellings of the same blueprint in YAML give the same text."""
    return _json(_dump(parse_blueprint(document)))


def version_id(document: dict[str, Any]) -> str:
    """The name of the document's version: `sha256:` and the hex digest of its canonical JSON."""
    return canonical(document)[0]


def canonical(document: dict[str, Any]) -> tuple[str, str]:
    """The document's version name and canonical JSON (`version_id`, `canonical_json`)."""
    text = canonical_json(document)
    return _version_of(text), text


def _version_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=PARSED_KEPT)
def parsed_version(version: str, text: str) -> Blueprint:
    """The blueprint of a published version's canonical JSON `text`, parsed once per worker
    process and shared by every instance that runs it (content-addressed: the same `version`
    is always the same text, and a `Blueprint` is frozen, so no instance can change what
    another sees). ValueError if `text` is not the version it claims to be."""
    if _version_of(text) != version:
        raise ValueError(f"the document given for {version} is not that version")
    return parse_blueprint(json.loads(text))


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def document_errors(blueprint: Blueprint) -> list[InitErrorDetails]:
    """What is wrong with a blueprint as a whole (its parts are valid by themselves)."""
    fields, errors = _field_index(blueprint)
    errors += _reference_errors(blueprint)
    for name, stage in blueprint.stages.items():
        errors += _stage_errors(blueprint, name, stage, fields)
    errors += _sla_errors(blueprint)
    errors += _business_time_errors(blueprint)
    successors = _successors(blueprint)
    unbounded = _redirect_errors(blueprint) + _loop_errors(blueprint, successors)
    errors += _reach_errors(blueprint, successors) + unbounded
    errors += _end_field_errors(blueprint)
    if not unbounded:  # with an unbounded loop the worst case has no bound
        errors += _budget_errors(blueprint, successors)
    return errors


def _unknown(loc: Loc, what: str, name: str, known: Mapping[str, Any]) -> InitErrorDetails:
    message = f"no {what} {name!r}"
    message += f"; known: {', '.join(known)}" if known else f"; there is no {what}"
    return document_error(loc, "unknown_" + what.split()[0], message, name)


def _path(loc: Loc) -> str:
    return ".".join(map(str, loc))


# ----------------------------------------------------------------------------- fields
def _declarations(blueprint: Blueprint) -> Iterator[tuple[Loc, FieldSpec]]:
    """Every field declared: of the input, of each task, of each event."""
    for name, spec in blueprint.input.items():
        yield ("input", name), spec
    for stage_name, stage in blueprint.stages.items():
        for loc, step in walk_steps(stage.do, ("stages", stage_name, "do")):
            if isinstance(step, TaskStep):
                for name, spec in step.fields.items():
                    yield (*loc, "fields", name), spec
    for event_name, event in blueprint.events.items():
        for name, spec in event.fields.items():
            yield ("events", event_name, "fields", name), spec


def _field_index(blueprint: Blueprint) -> tuple[dict[str, FieldSpec], list[InitErrorDetails]]:
    """The instance's fields by name (the first declaration of each), and the names declared
    again with another type or other options."""
    first: dict[str, tuple[Loc, FieldSpec]] = {}
    errors = []
    for loc, spec in _declarations(blueprint):
        name = str(loc[-1])
        where, known = first.setdefault(name, (loc, spec))
        if (known.type, known.options) != (spec.type, spec.options):
            message = f"field {name!r} is of type {spec.type} here but {known.type} at "
            message += f"{_path(where)}: one name, one type (and the same options)"
            errors.append(document_error(loc, "field_conflict", message, name))
    return {name: spec for name, (_, spec) in first.items()}, errors


def _field_errors(
    loc: Loc, name: str, fields: Mapping[str, FieldSpec], types: tuple[str, ...], use: str
) -> list[InitErrorDetails]:
    """A reference to a field that must exist and be of one of `types` (for `use`)."""
    spec = fields.get(name)
    if spec is None:
        return [_unknown(loc, "field", name, fields)]
    if spec.type not in types:
        message = f"{use} is a field of type {' or '.join(types)}; {name!r} is a {spec.type}"
        return [document_error(loc, "field_type", message, name)]
    return []


def _value_error(spec: FieldSpec, value: Any) -> str | None:
    """Why a field of `spec` cannot be compared with `value`, or None."""
    kind = spec.type
    if kind == "bool":
        fits = isinstance(value, bool)
    elif kind == "int":
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "decimal":
        fits = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind in UNTIL_TYPES:
        fits = isinstance(value, str) and _iso(kind, value)
    elif kind == "choice":
        if value in (spec.options or ()):
            return None
        return f"{show_value(value)} is not an option of the field: {', '.join(spec.options or ())}"
    else:
        fits = isinstance(value, str)
    if fits:
        return None
    return (
        f"a {kind} field compares with {VALUE_WORDS.get(kind, 'a string')}, not {show_value(value)}"
    )


def _iso(kind: str, text: str) -> bool:
    try:
        (date if kind == "date" else datetime).fromisoformat(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- references
def _reference_errors(blueprint: Blueprint) -> list[InitErrorDetails]:
    errors = []
    key = blueprint.input.get(blueprint.business_key)
    if key is None:
        errors.append(
            _unknown(("business_key",), "input field", blueprint.business_key, blueprint.input)
        )
    elif not key.required or key.type not in KEY_TYPES:
        message = f"the business key is a required input field of type {', '.join(KEY_TYPES)}"
        message += f"; {blueprint.business_key!r} is {'a' if key.required else 'an optional'} "
        message += key.type
        errors.append(
            document_error(("business_key",), "business_key", message, blueprint.business_key)
        )
    if blueprint.start not in blueprint.stages:
        errors.append(_unknown(("start",), "stage", blueprint.start, blueprint.stages))
    return errors


def _stage_errors(
    blueprint: Blueprint, name: str, stage: Stage, fields: Mapping[str, FieldSpec]
) -> list[InitErrorDetails]:
    loc = ("stages", name)
    errors = []
    if name in RESERVED_STAGES:
        message = f"the stage name {name!r} is reserved: the kernel ends instances there itself"
        errors.append(document_error(loc, "reserved_stage", message, name))
    for step_loc, step in walk_steps(stage.do, (*loc, "do")):
        errors += _step_errors(blueprint, step_loc, step, fields)
    steps = stage.steps()
    single = stage.next_stage is not None  # written `then: <stage>`
    for i, rule in enumerate(stage.then or ()):
        rule_loc: Loc = (*loc, "then") if single else (*loc, "then", i)
        if rule.target not in blueprint.stages:
            where = rule_loc if single else (*rule_loc, "go" if rule.go else "otherwise")
            errors.append(_unknown(where, "stage", rule.target, blueprint.stages))
        if rule.when is not None:
            when_loc = (*rule_loc, "when", rule.when.KIND)
            errors += _condition_errors(blueprint, when_loc, rule.when, steps, fields)
    if stage.on_max_visits is not None and stage.on_max_visits not in blueprint.stages:
        where = (*loc, "on_max_visits")
        errors.append(_unknown(where, "stage", stage.on_max_visits, blueprint.stages))
    for i, field in enumerate(stage.end.required if stage.end else ()):
        if field not in fields:
            errors.append(_unknown((*loc, "end", "required", i), "field", field, fields))
    return errors


def _step_errors(
    blueprint: Blueprint, loc: Loc, step: Step, fields: Mapping[str, FieldSpec]
) -> list[InitErrorDetails]:
    match step:
        case TaskStep(assignee=str(assignee)):
            return _field_errors((*loc, "assignee"), assignee, fields, ASSIGNEE_TYPES, "assignee")
        case ApprovalStep(amount_field=str(amount)):
            where = (*loc, "amount_field")
            return _field_errors(where, amount, fields, AMOUNT_TYPES, "amount_field")
        case CallStep():
            return _call_errors(loc, step, fields)
        case WaitStep(wait=WaitSpec(until=str(until))):
            where = (*loc, "wait", "until")
            return _field_errors(where, until, fields, UNTIL_TYPES, "until")
        case WaitStep(wait=WaitSpec(event=str(event))) if event not in blueprint.events:
            return [_unknown((*loc, "wait", "event"), "event", event, blueprint.events)]
    return []


def _call_errors(
    loc: Loc, step: CallStep, fields: Mapping[str, FieldSpec]
) -> list[InitErrorDetails]:
    """The activity is catalogued; its parameters exist, values fit them, fields exist."""
    entry = CATALOG.get(step.call)
    if entry is None:
        return [_unknown((*loc, "call"), "activity", step.call, CATALOG)]
    parameters = entry.input_model.model_fields
    errors = []
    values = {}
    for name, value in step.with_.items():
        where = (*loc, "with", name)
        if name not in parameters:
            message = f"{step.call} has no parameter {name!r}; its parameters: "
            message += ", ".join(parameters)
            errors.append(document_error(where, "unknown_parameter", message, name))
        elif isinstance(value, FieldRef):
            if value.field not in fields:
                errors.append(_unknown((*where, "field"), "field", value.field, fields))
        else:
            values[name] = value
    try:
        entry.input_model.model_validate(values)
    except ValidationError as err:
        for e in err.errors():
            parameter = e["loc"][0] if e["loc"] else ""
            if e["type"] == "missing" and parameter in step.with_:
                continue  # given as a field, or not a parameter (said above)
            message = f"{step.call} needs {parameter}" if e["type"] == "missing" else e["msg"]
            errors.append(document_error((*loc, "with", *e["loc"]), e["type"], message, e["input"]))
    return errors


def _condition_errors(
    blueprint: Blueprint,
    loc: Loc,
    predicate: Predicate,
    steps: Mapping[str, Step],
    fields: Mapping[str, FieldSpec],
) -> list[InitErrorDetails]:
    """What a condition names that does not exist (its steps are this stage's)."""
    match predicate:
        case StepIs():
            step = steps.get(predicate.step)
            if step is None:
                return [_unknown((*loc, "step"), "step", predicate.step, steps)]
            if predicate.outcome not in step.step_outcomes:
                outcomes = ", ".join(step.step_outcomes) or "none"
                message = f"step {predicate.step!r} has no outcome {predicate.outcome!r}; "
                message += f"its outcomes: {outcomes}"
                return [
                    document_error((*loc, "outcome"), "unknown_outcome", message, predicate.outcome)
                ]
            return []
        case FieldIs():
            spec = fields.get(predicate.field)
            if spec is None:
                return [_unknown((*loc, "field"), "field", predicate.field, fields)]
            op, value = predicate.comparison
            problem = _comparison_error(spec, op, value)
            return [document_error((*loc, op), "comparison", problem, value)] if problem else []
        case VisitsAtLeast():
            if predicate.visits not in blueprint.stages:
                return [_unknown((*loc, "visits"), "stage", predicate.visits, blueprint.stages)]
            return []
    errors = []
    for inner_loc, inner in operands(predicate):
        errors += _condition_errors(blueprint, (*loc, *inner_loc), inner, steps, fields)
    return errors


def _comparison_error(spec: FieldSpec, op: str, value: Any) -> str | None:
    if op in ORDERINGS and spec.type not in ORDERED_TYPES:
        return f"{op} compares numbers, dates and datetimes, not a {spec.type} field"
    for item in value if op == "in" else (value,):
        message = _value_error(spec, item)
        if message:
            return message
    return None


def _sla_errors(blueprint: Blueprint) -> list[InitErrorDetails]:
    errors = []
    names: set[str] = set()
    for i, sla in enumerate(blueprint.sla):
        if sla.name in names:
            message = f"another SLA is named {sla.name!r}"
            errors.append(document_error(("sla", i, "name"), "duplicate", message, sla.name))
        names.add(sla.name)
        if sla.from_ not in blueprint.stages:
            errors.append(_unknown(("sla", i, "from"), "stage", sla.from_, blueprint.stages))
        for j, stage in enumerate(sla.until):
            if stage not in blueprint.stages:
                errors.append(_unknown(("sla", i, "until", j), "stage", stage, blueprint.stages))
    return errors


# ----------------------------------------------------------------------------- business time
def _timed(blueprint: Blueprint) -> Iterator[tuple[Loc, Timers | WaitSpec | StageSla]]:
    """Every mapping that holds durations, with its location."""
    for i, sla in enumerate(blueprint.sla):
        yield ("sla", i), sla
    for name, stage in blueprint.stages.items():
        if stage.sla is not None:
            yield ("stages", name, "sla"), stage.sla
        for loc, step in walk_steps(stage.do, ("stages", name, "do")):
            if isinstance(step, TaskStep | ApprovalStep) and step.timers is not None:
                yield (*loc, "timers"), step.timers
            elif isinstance(step, WaitStep):
                yield (*loc, "wait"), step.wait


def _spans(timed: Timers | WaitSpec | StageSla) -> list[tuple[Loc, Any]]:
    if isinstance(timed, Timers):
        return [(loc, span) for loc, _, span in timed.spans()]
    if isinstance(timed, WaitSpec):
        return [(("after",), timed.after), (("timeout",), timed.timeout)]
    return [(("within",), timed.within)]


def _business_time_errors(blueprint: Blueprint) -> list[InitErrorDetails]:
    """Business durations need the calendar, go in order in its terms and always get a due."""
    calendar = blueprint.calendar
    errors = []
    for loc, timed in _timed(blueprint):
        if not timed.business_time:
            continue
        if calendar is None:
            message = "business_time needs the blueprint's calendar"
            errors.append(document_error((*loc, "business_time"), "no_calendar", message, True))
            continue
        if isinstance(timed, Timers):
            hours = day_minutes(calendar) / 60
            terms = f", in business time (a business day is {hours:g} working hours)"
            order = timed.order_errors(lambda span: business_minutes(calendar, span), terms)
            errors += [{**e, "loc": (*loc, *e["loc"])} for e in order]
        for span_loc, span in _spans(timed):
            if isinstance(span, BusinessDuration) and not due_always_exists(calendar, span):
                message = f"{span} is too long for the calendar: it has too little working "
                message += "time to be sure of a due within 20 years"
                errors.append(document_error((*loc, *span_loc), "too_long", message, str(span)))
    return errors


# ----------------------------------------------------------------------------- stage graph
def _redirected(blueprint: Blueprint, name: str) -> list[str]:
    """`name` and where its entries go once each stage on the way has had its max_visits:
    the chain of on_max_visits (known stages, none twice)."""
    chain = [name]
    while True:
        after = blueprint.stages[chain[-1]].on_max_visits
        if after is None or after not in blueprint.stages or after in chain:
            return chain
        chain.append(after)


def _successors(blueprint: Blueprint) -> dict[str, list[str]]:
    """Where an instance can go from each stage: the `then` targets, and where an entry into
    each of them is sent once it has had its max_visits."""
    return {
        name: list(
            dict.fromkeys(
                redirected
                for rule in stage.then or ()
                if rule.target in blueprint.stages
                for redirected in _redirected(blueprint, rule.target)
            )
        )
        for name, stage in blueprint.stages.items()
    }


def _guaranteed_by(stage: Stage, blueprint: Blueprint) -> set[str]:
    """The fields every run of the stage's steps leaves with a value: those a task requires
    for each of its outcomes (a task without a deadline: a deadline closes it without any),
    and the required fields of an event waited for without a timeout."""
    found: set[str] = set()
    for _, step in walk_steps(stage.do, ()):
        if isinstance(step, TaskStep) and not (step.timers and step.timers.deadline):
            needs = step.needs()
            if len(needs) == len(step.outcomes):
                found |= set.intersection(*(set(n) for n in needs.values())) - {COMMENT}
        elif isinstance(step, WaitStep) and step.wait.event and step.wait.timeout is None:
            event = blueprint.events.get(step.wait.event)
            found |= {f for f, spec in (event.fields if event else {}).items() if spec.required}
    return found


def _end_field_errors(blueprint: Blueprint) -> list[InitErrorDetails]:
    """An end's required fields must have a value on every path into it: a person's decision
    that would end there without one is refused, and an instance with no other way on would
    wait forever. Fields only ever gain values, so a must-analysis over the stage graph."""
    if blueprint.start not in blueprint.stages:
        return []
    every = set(_field_index(blueprint)[0]) | {COMMENT}
    start = {name for name, spec in blueprint.input.items() if spec.required}
    before = {name: set(every) for name in blueprint.stages}  # what holds on entry
    before[blueprint.start] = set(start)
    gains = {name: _guaranteed_by(stage, blueprint) for name, stage in blueprint.stages.items()}
    changed = True
    while changed:
        changed = False
        for name, stage in blueprint.stages.items():
            for rule in stage.then or ():
                if rule.target not in blueprint.stages:
                    continue
                after = before[name] | gains[name]
                # an entry max_visits sends on: each stage skipped had a visit (or more)
                for target in _redirected(blueprint, rule.target):
                    narrowed = before[target] & after
                    if target != blueprint.start and narrowed != before[target]:
                        before[target], changed = narrowed, True
                    after = after | gains[target]
    errors = []
    for name, stage in blueprint.stages.items():
        for i, field in enumerate(stage.end.required if stage.end else ()):
            if field in every and field not in before[name]:  # (an unknown one: said above)
                message = f"no path guarantees {field!r} a value before this end: give it "
                message += "by a required input field, a task that requires it for each of its "
                message += "outcomes (and has no deadline), or an event waited for without a "
                message += "timeout, on every path here"
                loc = ("stages", name, "end", "required", i)
                errors.append(document_error(loc, "end_field_unset", message, field))
    return errors


def _reachable(successors: Mapping[str, list[str]], start: str) -> dict[str, None]:
    """The stages reachable from `start` (itself included), in the order found."""
    found = {start: None}
    queue = [start]
    while queue:
        for after in successors[queue.pop(0)]:
            if after not in found:
                found[after] = None
                queue.append(after)
    return found


def _components(graph: Mapping[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of `graph` (edges out of it ignored), each listed
    after every component it leads to (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for after in graph[node]:
            if after not in graph:
                continue
            if after not in index:
                visit(after)
                low[node] = min(low[node], low[after])
            elif after in stack:
                low[node] = min(low[node], index[after])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _cyclic(component: list[str], graph: Mapping[str, list[str]]) -> bool:
    return len(component) > 1 or component[0] in graph[component[0]]


def _in_order(blueprint: Blueprint, names: list[str]) -> list[str]:
    """Stage names in the order the document lists them."""
    return [name for name in blueprint.stages if name in names]


def _reach_errors(
    blueprint: Blueprint, successors: Mapping[str, list[str]]
) -> list[InitErrorDetails]:
    errors = []
    if blueprint.start in blueprint.stages:
        reachable = _reachable(successors, blueprint.start)
        message = f"unreachable: no then or on_max_visits leads here from start ({blueprint.start})"
        errors += [
            document_error(("stages", name), "unreachable", message, name)
            for name in blueprint.stages
            if name not in reachable
        ]
    predecessors: dict[str, list[str]] = {name: [] for name in blueprint.stages}
    for name, afters in successors.items():
        for after in afters:
            predecessors[after].append(name)
    ending: dict[str, None] = {}
    for name, stage in blueprint.stages.items():
        if stage.end is not None and name not in ending:
            ending |= _reachable(predecessors, name)
    message = "no end stage can be reached from here: an instance here could never end"
    errors += [
        document_error(("stages", name), "no_end", message, name)
        for name in blueprint.stages
        if name not in ending
    ]
    return errors


def _loop_errors(
    blueprint: Blueprint, successors: Mapping[str, list[str]]
) -> list[InitErrorDetails]:
    """Loops that no max_visits bounds: cycles among the stages without max_visits."""

    def unbounded(graph: Mapping[str, list[str]]) -> dict[str, list[str]]:
        return {
            name: [after for after in afters if blueprint.stages[after].max_visits is None]
            for name, afters in graph.items()
            if blueprint.stages[name].max_visits is None
        }

    loose = unbounded(successors)
    direct = unbounded(
        {
            name: [rule.target for rule in stage.then or () if rule.target in blueprint.stages]
            for name, stage in blueprint.stages.items()
        }
    )
    errors = []
    for component in _components(loose):
        if not _cyclic(component, loose):
            continue
        stages = _in_order(blueprint, component)
        if any(_cyclic(c, direct) for c in _components({n: direct[n] for n in component})):
            message = f"stages {', '.join(stages)} loop without a bound: give one of them "
            message += "max_visits, with an on_max_visits that leaves the loop"
        else:
            message = f"stages {', '.join(stages)} loop without a bound: an entry past a "
            message += "stage's max_visits goes on_max_visits back into them"
        errors.append(document_error(("stages", stages[0]), "unbounded_loop", message, stages[0]))
    return errors


def _redirect_errors(blueprint: Blueprint) -> list[InitErrorDetails]:
    """on_max_visits chains that come back on themselves (reported at their first stage)."""
    errors = []
    for name, stage in blueprint.stages.items():
        chain = _redirected(blueprint, name)
        after = blueprint.stages[chain[-1]].on_max_visits
        if (
            stage.on_max_visits is not None
            and after == name
            and _in_order(blueprint, chain)[0] == name
        ):
            message = f"on_max_visits comes back here ({' -> '.join([*chain, name])}): an "
            message += "entry past every max_visits would have nowhere to go"
            errors.append(
                document_error(("stages", name, "on_max_visits"), "redirect_loop", message, name)
            )
    return errors


# ----------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Cost:
    """Temporal history events and updates (an estimate of the worst case)."""

    events: int = 0
    updates: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.events + other.events, self.updates + other.updates)

    def __mul__(self, times: int) -> Cost:
        return Cost(self.events * times, self.updates * times)


def _task_cost(timers: Timers | None) -> Cost:
    """A task: the mail to its candidates, its updates (each answered at the next wait) and
    its timers (each with a mail)."""
    fired = len(timers.spans()) if timers else 0
    updates = Cost(UPDATE + PROJECTION, 1) * TASK_UPDATES
    return Cost(ACTIVITY) + updates + Cost(TIMER + ACTIVITY + PROJECTION) * fired


def _wait_cost(wait: WaitSpec) -> Cost:
    if wait.event is not None:
        return Cost(UPDATE + TIMER + PROJECTION, 1)
    return Cost(TIMER + PROJECTION)


def _step_cost(step: Step) -> Cost:
    match step:
        case TaskStep():
            return _task_cost(step.timers)
        case ApprovalStep():
            tasks = sum(
                1 if level.mode == "sequential" else len(level.roles) for level in step.levels
            )
            return _task_cost(step.timers) * tasks
        case CallStep():
            return Cost(ACTIVITY)
        case WaitStep():
            return _wait_cost(step.wait)
        case ParallelStep():
            return _sum(_step_cost(inner) for branch in step.branches.values() for inner in branch)
    raise AssertionError(step)


def _sla_cost(sla: StageSla) -> Cost:
    return Cost(TIMER + ACTIVITY * len(sla.on_breach))


def _stage_cost(stage: Stage) -> Cost:
    cost = Cost(PROJECTION) + _sum(_step_cost(step) for step in stage.do)
    return cost + _sla_cost(stage.sla) if stage.sla else cost


def _sum(costs: Iterator[Cost] | list[Cost]) -> Cost:
    total = Cost()
    for cost in costs:
        total += cost
    return total


def _visits(blueprint: Blueprint, component: list[str], cyclic: bool) -> dict[str, int]:
    """The most visits each stage of a component gets in one pass through it. Outside loops,
    one; in a loop, a stage's max_visits, or (without one) one more than all the max_visits of
    the loop: two visits of a stage without max_visits have a bounded one between them."""
    if not cyclic:
        return {name: 1 for name in component}
    bound = sum(blueprint.stages[name].max_visits or 0 for name in component)
    return {name: blueprint.stages[name].max_visits or 1 + bound for name in component}


def _budget_errors(
    blueprint: Blueprint, successors: Mapping[str, list[str]]
) -> list[InitErrorDetails]:
    """The worst path's events and updates over the budget. An instance passes each loop
    (component) at most once, in the order of the graph: the worst case is the heaviest path
    of components from the start, each weighing its stages' cost times their visits."""
    if blueprint.start not in blueprint.stages:
        return []
    graph = {name: successors[name] for name in _reachable(successors, blueprint.start)}
    visits: dict[str, int] = {}
    for component in _components(graph):
        visits |= _visits(blueprint, component, _cyclic(component, graph))
    costs = {name: _stage_cost(blueprint.stages[name]) * n for name, n in visits.items()}
    for sla in blueprint.sla:
        if sla.from_ in costs:
            costs[sla.from_] += _sla_cost(sla) * visits[sla.from_]
    errors = []
    budgets = (
        ("events", EVENT_BUDGET, TEMPORAL_EVENT_LIMIT),
        ("updates", UPDATE_BUDGET, TEMPORAL_UPDATE_LIMIT),
    )
    for what, budget, limit in budgets:
        weights = {name: getattr(cost, what) for name, cost in costs.items()}
        total, path = _heaviest(graph, blueprint.start, weights)
        total += START_AND_END if what == "events" else 0
        if total > budget:
            stages = ", ".join(f"{name} x{visits[name]}" for name in _in_order(blueprint, path))
            message = f"the worst case is about {total:,} history {what} ({stages}), over the "
            message += f"budget of {budget:,} (Temporal's limit: {limit:,}): lower max_visits, "
            message += "or split the process"
            errors.append(document_error(("stages",), "over_budget", message, total))
    return errors


def _heaviest(
    graph: Mapping[str, list[str]], start: str, weights: Mapping[str, int]
) -> tuple[int, list[str]]:
    """The heaviest path of components from the start's: its weight and stages."""
    best: dict[int, tuple[int, list[str]]] = {}
    owner: dict[str, int] = {}
    for i, component in enumerate(_components(graph)):  # later ones first
        owner |= {name: i for name in component}
        onward = {owner[after] for name in component for after in graph[name]} - {i}
        tail = max((best[j] for j in sorted(onward)), default=(0, []), key=lambda b: b[0])
        best[i] = (sum(weights[name] for name in component) + tail[0], component + tail[1])
    return best[owner[start]]


# ----------------------------------------------------------------------------- warnings
def _roles(blueprint: Blueprint) -> Iterator[tuple[Loc, str]]:
    """Every role the blueprint names, with its location."""
    yield ("owner_role",), blueprint.owner_role
    for name, event in blueprint.events.items():
        for i, role in enumerate(event.roles):
            yield ("events", name, "roles", i), role
    for loc, timed in _timed(blueprint):
        if isinstance(timed, Timers):
            for i, level in enumerate(timed.escalations):
                yield (*loc, "escalations", i, "to_role"), level.to_role
        elif isinstance(timed, StageSla):
            for i, action in enumerate(timed.on_breach):
                where = ("escalate", "to_role") if action.escalate else ("notify", "role")
                yield (*loc, "on_breach", i, *where), action.role
    for name, stage in blueprint.stages.items():
        for loc, step in walk_steps(stage.do, ("stages", name, "do")):
            if isinstance(step, TaskStep):
                for i, role in enumerate(step.roles or ()):
                    yield (*loc, "roles", i), role
            elif isinstance(step, ApprovalStep):
                for i, tier in enumerate(step.levels):
                    for j, role in enumerate(tier.roles):
                        yield (*loc, "levels", i, "roles", j), role
            elif isinstance(step, CallStep) and isinstance(step.with_.get("role"), str):
                yield (*loc, "with", "role"), str(step.with_["role"])


def warnings(blueprint: Blueprint, known_roles: Set[str]) -> list[Problem]:
    """What a valid blueprint names that probably does not work as meant: roles no one holds
    (their tasks would wait for nobody), events no wait waits for (reporting one does
    nothing)."""
    problems = [
        Problem(loc, "unknown_role", f"no one holds the role {role!r}")
        for loc, role in _roles(blueprint)
        if role not in known_roles
    ]
    awaited = {
        step.wait.event
        for stage in blueprint.stages.values()
        for _, step in walk_steps(stage.do, ())
        if isinstance(step, WaitStep)
    }
    problems += [
        Problem(("events", name), "unused_event", f"no wait waits for the event {name!r}")
        for name in blueprint.events
        if name not in awaited
    ]
    return problems


# ----------------------------------------------------------------------------- diff
def diff(old: Blueprint, new: Blueprint) -> list[str]:
    """What `new` changes from `old`, one line each: the document's own keys, input fields,
    SLAs and events added, removed or changed; stages added, removed or changed (their steps
    added, removed, reordered or changed: outcomes, timers, roles...)."""
    parts = ("input", "sla", "events", "stages")
    before, after = _dump(old), _dump(new)
    changes = _key_changes(
        {k: v for k, v in before.items() if k not in parts},
        {k: v for k, v in after.items() if k not in parts},
    )
    changes += _named_changes("input field", before.get("input", {}), after.get("input", {}))
    changes += _named_changes(
        "sla",
        {s["name"]: s for s in before.get("sla", [])},
        {s["name"]: s for s in after.get("sla", [])},
    )
    changes += _named_changes("event", before.get("events", {}), after.get("events", {}))
    changes += [f"stage added: {name}" for name in new.stages if name not in old.stages]
    changes += [f"stage removed: {name}" for name in old.stages if name not in new.stages]
    for name, stage in new.stages.items():
        if name in old.stages:
            changes += [f"stage {name}: {line}" for line in _stage_changes(old.stages[name], stage)]
    return changes


def _show_json(value: Any) -> str:
    return "(none)" if value is None else _json(value)


def _key_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    return [
        f"{key} changed: {_show_json(before.get(key))} -> {_show_json(after.get(key))}"
        for key in dict.fromkeys([*before, *after])
        if before.get(key) != after.get(key)
    ]


def _named_changes(what: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    changes = [f"{what} added: {name}" for name in after if name not in before]
    changes += [f"{what} removed: {name}" for name in before if name not in after]
    for name, value in after.items():
        if name in before and before[name] != value:
            changes.append(
                f"{what} changed: {name}: {'; '.join(_key_changes(before[name], value))}"
            )
    return changes


def _labelled_steps(stage: Stage) -> dict[str, dict[str, Any]]:
    """A stage's steps (branches' too) by label (`task resolve`), each dumped without its
    branches' steps (a parallel step shows its branch names)."""
    steps: dict[str, dict[str, Any]] = {}
    for loc, step in walk_steps(stage.do, ()):
        name = step.step_name or f"#{_path(loc)}"
        dumped = _dump(step)
        if isinstance(step, ParallelStep):
            dumped["branches"] = list(step.branches)
        steps.setdefault(f"{step.KIND} {name}", dumped)
    return steps


def _stage_changes(old: Stage, new: Stage) -> list[str]:
    before, after = _dump(old), _dump(new)
    before.pop("do", None)
    after.pop("do", None)
    changes = _key_changes(before, after)
    old_steps, new_steps = _labelled_steps(old), _labelled_steps(new)
    changes += [f"step added: {label}" for label in new_steps if label not in old_steps]
    changes += [f"step removed: {label}" for label in old_steps if label not in new_steps]
    kept_before = [label for label in old_steps if label in new_steps]
    kept_after = [label for label in new_steps if label in old_steps]
    if kept_before != kept_after:
        changes.append(f"steps reordered: {', '.join(kept_before)} -> {', '.join(kept_after)}")
    for label, step in new_steps.items():
        if label in old_steps and old_steps[label] != step:
            changes += [f"{label}: {line}" for line in _key_changes(old_steps[label], step)]
    return changes
