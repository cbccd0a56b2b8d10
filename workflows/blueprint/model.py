"""The blueprint language, version 1 (`dsl: 1`): a blueprint document as frozen pydantic models.

A blueprint is a process as data: typed `input` fields (one is the business key), `stages`
from `start`, each doing `do` steps and going on by `then` (a stage, or `{when, go}` rules and a
final `{otherwise}`) until an `end` stage; process SLAs (`sla`) and external `events`. A step
is a mapping keyed by its first key, one of:

- `task: <name>`: a human task for `roles` (or one `assignee` named by a field), with typed
  `fields`, `outcomes`, `required` fields per outcome, `four_eyes` and `timers`;
- `approval: <name>`: an approval chain, `levels` by thresholds of an `amount_field`, each
  sequential, all or k_of_n;
- `call: <activity>`: an activity of the catalog with parameters (`with`), values or
  `{field: <name>}`;
- `wait: {after | until | event}`: a duration, until a date field, or an event with a
  `timeout`;
- `parallel: <name>`: named `branches` of steps, joined when every branch has ended.

Conditions are typed predicates, not expressions: `{step, outcome}`, `{field, eq|ne|lt|lte|gt|
gte|in}`, `{visits, gte}`, `{all}`, `{any}`, `{not}`.

Durations are ISO 8601 and elapsed time, or business time by the blueprint's `calendar` where
the mapping that holds them says `business_time: true` (as in a policy's timer set: the same
parsing, the same bounds, `workflows.policy.TimerDuration`).

Every model refuses unknown keys and checks what it sees by itself (names, timers in order,
required fields a task has, k <= n); errors name the YAML path (`stages.resolve.do.0.task.
outcomes`: a step's kind is part of its path). The rules across the document (references,
the stage graph, the history budget, business time against the calendar) are the checker's:
`workflows.blueprint.check.parse_blueprint` is the way in, never `Blueprint.model_validate`
alone. Pure and deterministic: nothing is read at import or validation but the document.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from core.names import MAX_NAME, MAX_TEXT, NAME_PATTERN, ROLE_PATTERN

from workflows.approval import APPROVAL_OUTCOMES, check_quorum
from workflows.calendar import BusinessCalendar, BusinessDuration
from workflows.documents import document_error, document_refusal, show_value
from workflows.human_task import TIMED_OUT, read_business_durations, timer_kind_errors
from workflows.policy import (
    MAX_AMOUNT,
    MAX_ROLES,
    MAX_TIERS,
    TimerDuration,
    printable_name,
    timer_iso,
    unique_names,
)

# names of processes, stages, steps, fields, outcomes and events; roles are kebab-case, as
# core.roles spells them
MAX_TITLE = 200
MAX_STAGES = 100
MAX_STEPS = 30  # per stage, and per parallel branch
MAX_BRANCHES = 10
MAX_FIELDS = 100  # per input, task or event
MAX_OUTCOMES = 20
MAX_OPTIONS = 50
MAX_RULES = 20  # per `then`
MAX_OPERANDS = 10  # per all / any
MAX_VISITS = 1000
MAX_PATTERN = 200
MAX_VALUE_LENGTH = 1000
MAX_INPUT_LENGTH = 100_000
MAX_LEVELS = MAX_ROLES  # escalation levels of a timer set
COMMENT = "comment"  # every task (and approval) takes a comment: `required` may name it

Loc = tuple[str | int, ...]


# ----------------------------------------------------------------------------- value types
def _snake_case(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise PydanticCustomError(
            "name",
            f"{show_value(name)} is not a name: snake_case (a-z, 0-9 and _, starting with a "
            f"letter), at most {MAX_NAME} characters",
        )
    return name


def _kebab_case(role: str) -> str:
    if len(role) > MAX_NAME or not re.fullmatch(ROLE_PATTERN, role):
        raise PydanticCustomError(
            "role_name",
            f"{show_value(role)} is not a role name: kebab-case (a-z, 0-9 and -, e.g. "
            f"service-manager), at most {MAX_NAME} characters",
        )
    return role


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as err:
        raise PydanticCustomError(
            "pattern", f"{show_value(pattern)} is not a regular expression: {err}"
        ) from None
    return pattern


def _plain_value(value: Any) -> Any:
    """A literal of a condition or a call: a string, a whole or finite number, or true/false.
    YAML's dates are read as their ISO text and integral floats as integers, so that the
    spellings of one value give one canonical text."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("value", "a number must be finite")
    if isinstance(value, str) and len(value) > MAX_VALUE_LENGTH:
        raise PydanticCustomError("value", f"a value is at most {MAX_VALUE_LENGTH} characters")
    if not isinstance(value, bool | int | float | str):
        raise PydanticCustomError("value", "a value is a string, a number or true/false")
    return value


def _normalized(number: Decimal) -> Decimal:
    return number.normalize()


def _plain_number(number: Decimal) -> str:
    """A number as written: no exponent, no trailing zeros (500, 0.5)."""
    return format(number, "f")


Name = Annotated[str, AfterValidator(_snake_case)]
Role = Annotated[str, AfterValidator(_kebab_case)]
Title = Annotated[str, Field(min_length=1, max_length=MAX_TITLE), AfterValidator(printable_name)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Scalar = Annotated[bool | int | float | str, BeforeValidator(_plain_value)]
# numbers of thresholds and bounds: exact, shown without exponent or trailing zeros
Number = Annotated[
    Decimal,
    Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT, max_digits=30),
    AfterValidator(_normalized),
    PlainSerializer(_plain_number, when_used="json"),
]
Amount = Annotated[Number, Field(ge=0)]
Names = Annotated[
    list[Name], Field(min_length=1, max_length=MAX_OUTCOMES), AfterValidator(unique_names)
]
Roles = Annotated[
    list[Role], Field(min_length=1, max_length=MAX_ROLES), AfterValidator(unique_names)
]


class FrozenModel(BaseModel):
    """Frozen, unknown keys refused: the base of a blueprint's parts, the catalog's parameters
    and results, and the engine's commands and events."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class BlueprintModel(FrozenModel):
    """Base of every part of a blueprint."""


def _check(title: str, errors: list[InitErrorDetails]) -> None:
    if errors:
        raise document_refusal(title, errors)


def _given(model: BaseModel, *keys: str) -> list[str]:
    return [key for key in keys if getattr(model, key) is not None]


def _business_spans(*keys: str) -> Callable[[Any], Any]:
    """A `before` validator: the duration strings at `keys` read as business durations when
    the mapping says `business_time: true` (as `read_business_durations` does for a timer
    set); a string that is none is refused at its key."""

    def read(data: Any) -> Any:
        if not isinstance(data, dict) or data.get("business_time") is not True:
            return data
        data = dict(data)
        errors = []
        for key in keys:
            if isinstance(data.get(key), str):
                try:
                    data[key] = BusinessDuration.parse(data[key])
                except ValidationError as err:
                    e = err.errors()[0]
                    errors.append(document_error((key,), e["type"], e["msg"], data[key]))
        _check("business time", errors)
        return data

    return read


def _kind_errors(model: WaitSpec | StageSla, keys: Sequence[str]) -> list[InitErrorDetails]:
    """Durations of the wrong kind for the model's `business_time`."""
    spans = [((key,), getattr(model, key)) for key in keys if getattr(model, key) is not None]
    return [
        document_error(loc, "timer_kind", message, str(getattr(model, str(loc[0]))))
        for loc, message in timer_kind_errors(model.business_time, spans)
    ]


# ----------------------------------------------------------------------------- fields
FieldType = Literal[
    "string", "text", "email", "int", "decimal", "date", "datetime", "bool", "choice"
]
TEXT_TYPES = ("string", "text", "email")
NUMBER_TYPES = ("int", "decimal")
ORDERED_TYPES = ("int", "decimal", "date", "datetime")


class FieldSpec(BlueprintModel):
    """A typed field of the input, a task's form or an event."""

    type: FieldType
    label: Title | None = None
    required: bool = False
    pattern: Annotated[str, Field(max_length=MAX_PATTERN), AfterValidator(_regex)] | None = None
    min: Number | None = None
    max: Number | None = None
    max_length: int | None = Field(None, ge=1, le=MAX_INPUT_LENGTH)
    options: (
        Annotated[
            list[Title], Field(min_length=1, max_length=MAX_OPTIONS), AfterValidator(unique_names)
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _fits_type(self) -> Self:
        allowed = {
            "pattern": ("string", "text"),
            "max_length": TEXT_TYPES,
            "min": NUMBER_TYPES,
            "max": NUMBER_TYPES,
            "options": ("choice",),
        }
        errors = [
            document_error(
                (key,), "not_for_type", f"{key} does not apply to a {self.type} field", None
            )
            for key, types in allowed.items()
            if getattr(self, key) is not None and self.type not in types
        ]
        if self.type == "choice" and self.options is None:
            errors.append(
                document_error(("options",), "missing", "a choice field needs options", None)
            )
        for key in ("min", "max"):
            bound = getattr(self, key)
            if self.type == "int" and bound is not None and bound != bound.to_integral_value():
                errors.append(
                    document_error((key,), "not_int", f"{key} of an int field is whole", 0)
                )
        if self.min is not None and self.max is not None and self.min > self.max:
            message = f"min ({_plain_number(self.min)}) is greater than max "
            message += f"({_plain_number(self.max)})"
            errors.append(document_error(("max",), "bounds_order", message, str(self.max)))
        _check("FieldSpec", errors)
        return self


Fields = Annotated[dict[Name, FieldSpec], Field(max_length=MAX_FIELDS)]


# ----------------------------------------------------------------------------- timers
class Escalation(BlueprintModel):
    """One level of a task's escalation: `after` the task opened, `to_role` may act too."""

    after: TimerDuration
    to_role: Role


class Timers(BlueprintModel):
    """When a task reminds, escalates (levels stacked, earliest first) and reaches its
    deadline, where a task closes with the `on_deadline` outcome (an approval's level ends
    timed_out). Every key is optional; those
    given go in that order. `business_time: true` reads them as business time by the
    blueprint's calendar (their order is then checked in business terms by the checker)."""

    business_time: bool = False
    remind_after: TimerDuration | None = None
    escalations: list[Escalation] = Field(default_factory=list, max_length=MAX_LEVELS)
    deadline: TimerDuration | None = None
    on_deadline: Name | None = None

    _business = model_validator(mode="before")(read_business_durations)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        spans = [(loc, span) for loc, _, span in self.spans()]
        values = dict(spans)
        errors = [
            document_error(loc, "timer_kind", message, str(values[loc]))
            for loc, message in timer_kind_errors(self.business_time, spans)
        ]
        _check("Timers", errors)
        if self.on_deadline is not None and self.deadline is None:
            message = "on_deadline is the outcome at the deadline: give the deadline"
            errors.append(document_error(("deadline",), "missing", message, None))
        if not self.business_time:
            errors += self.order_errors(lambda span: span)
        _check("Timers", errors)
        return self

    def spans(self) -> list[tuple[Loc, str, timedelta | BusinessDuration]]:
        """The timers given, in the order they must fire: (loc, what, duration)."""
        spans: list[tuple[Loc, str, timedelta | BusinessDuration]] = []
        if self.remind_after is not None:
            spans.append((("remind_after",), "remind_after", self.remind_after))
        for i, level in enumerate(self.escalations):
            spans.append((("escalations", i, "after"), f"escalation {i + 1}", level.after))
        if self.deadline is not None:
            spans.append((("deadline",), "deadline", self.deadline))
        return spans

    def order_errors(self, length: Callable[[Any], Any], terms: str = "") -> list[InitErrorDetails]:
        """Timers out of order by `length` (how a duration measures): each must come after the
        one before it, the last escalation at the deadline at the latest. `terms` ends each
        message (how they compare)."""
        errors = []
        spans = self.spans()
        for (_, before, earlier), (loc, what, later) in zip(spans, spans[1:], strict=False):
            at_deadline = what == "deadline" and before.startswith("escalation")
            if length(later) < length(earlier) or (
                length(later) == length(earlier) and not at_deadline
            ):
                message = f"{what} ({timer_iso(later)}) must come after {before} "
                message += f"({timer_iso(earlier)}): reminder, "
                message += f"escalations earliest first, then the deadline{terms}"
                errors.append(document_error(loc, "timer_order", message, timer_iso(later)))
        return errors


# ----------------------------------------------------------------------------- predicates
def _first_kind(value: Any, kinds: tuple[str, ...]) -> str | None:
    """The kind of a tagged mapping (its first key that is a kind) or model (its KIND)."""
    if isinstance(value, dict):
        return next((key for key in value if key in kinds), None)
    kind = getattr(type(value), "KIND", None)
    return kind if kind in kinds else None


def _by_kind(kinds: tuple[str, ...], error_type: str, message: str) -> Discriminator:
    """The discriminator of a union of tagged models: `_first_kind` among `kinds`, and the
    error (`error_type`, `message`) of a value that is none of them."""
    return Discriminator(
        lambda value: _first_kind(value, kinds),
        custom_error_type=error_type,
        custom_error_message=message,
    )


PREDICATE_KINDS = ("step", "field", "visits", "all", "any", "not")
COMPARISONS = ("eq", "ne", "lt", "lte", "gt", "gte", "in")
ORDERINGS = ("lt", "lte", "gt", "gte")


class StepIs(BlueprintModel):
    """True once the named step of this stage has ended with `outcome`."""

    KIND: ClassVar[str] = "step"
    step: Name
    outcome: Name


class FieldIs(BlueprintModel):
    """Compares a field of the instance with a value: exactly one of the comparisons."""

    KIND: ClassVar[str] = "field"
    field: Name
    eq: Scalar | None = None
    ne: Scalar | None = None
    lt: Scalar | None = None
    lte: Scalar | None = None
    gt: Scalar | None = None
    gte: Scalar | None = None
    in_: Annotated[list[Scalar], Field(min_length=1, max_length=MAX_OPTIONS)] | None = Field(
        None, alias="in"
    )

    @model_validator(mode="after")
    def _one_comparison(self) -> Self:
        given = [op for op in COMPARISONS if getattr(self, _attribute(op)) is not None]
        if len(given) != 1:
            message = f"a field condition has one of {', '.join(COMPARISONS)}"
            message += f", not {', '.join(given)}" if given else ""
            raise PydanticCustomError("comparison", message)
        return self

    @property
    def comparison(self) -> tuple[str, Any]:
        """(operator, value): the one comparison given."""
        op = next(op for op in COMPARISONS if getattr(self, _attribute(op)) is not None)
        return op, getattr(self, _attribute(op))


def _attribute(op: str) -> str:
    return "in_" if op == "in" else op


class VisitsAtLeast(BlueprintModel):
    """True once the instance has entered stage `visits` at least `gte` times."""

    KIND: ClassVar[str] = "visits"
    visits: Name
    gte: int = Field(ge=1, le=MAX_VISITS)


class AllOf(BlueprintModel):
    """True when every condition is."""

    KIND: ClassVar[str] = "all"
    all: list[Predicate] = Field(min_length=1, max_length=MAX_OPERANDS)


class AnyOf(BlueprintModel):
    """True when some condition is."""

    KIND: ClassVar[str] = "any"
    any: list[Predicate] = Field(min_length=1, max_length=MAX_OPERANDS)


class NotOf(BlueprintModel):
    """True when the condition is not."""

    KIND: ClassVar[str] = "not"
    not_: Predicate = Field(alias="not")


Predicate = Annotated[
    Annotated[StepIs, Tag("step")]
    | Annotated[FieldIs, Tag("field")]
    | Annotated[VisitsAtLeast, Tag("visits")]
    | Annotated[AllOf, Tag("all")]
    | Annotated[AnyOf, Tag("any")]
    | Annotated[NotOf, Tag("not")],
    _by_kind(
        PREDICATE_KINDS,
        "condition",
        "a condition is one of {step, outcome}, {field, eq|ne|lt|lte|gt|gte|in}, {visits, gte}, "
        "{all: [...]}, {any: [...]}, {not: ...}",
    ),
]


def operands(predicate: Predicate) -> Iterator[tuple[Loc, Predicate]]:
    """The conditions directly inside an all / any / not, with their locations in it."""
    match predicate:
        case AllOf(all=inner) | AnyOf(any=inner):
            kind = predicate.KIND
            for i, p in enumerate(inner):
                yield (kind, i, p.KIND), p
        case NotOf(not_=inner):
            yield ("not", inner.KIND), inner


# ----------------------------------------------------------------------------- steps
class StepModel(BlueprintModel):
    """Base of the steps. A step is named by its kind's key (`task: record`) unless it says
    otherwise, and has no outcomes a stage's condition can name unless it says which."""

    KIND: ClassVar[str]

    @property
    def step_name(self) -> str | None:
        return str(getattr(self, self.KIND))

    @property
    def step_outcomes(self) -> tuple[str, ...]:
        return ()


class TaskStep(StepModel):
    """A human task: who acts (`roles`, or the user a field names), the form, the outcomes."""

    KIND: ClassVar[str] = "task"
    task: Name
    title: Title
    description: Text | None = None
    roles: Roles | None = None
    assignee: Name | None = Field(
        None, description="a field (input or an earlier task) holding the username who acts"
    )
    fields: Fields = Field(default_factory=dict)
    outcomes: Names
    required: dict[Name, Annotated[list[Name], AfterValidator(unique_names)]] = Field(
        default_factory=dict, description="outcome -> fields that must be filled in for it"
    )
    four_eyes: bool = Field(True, description="the requester may not decide the task")
    timers: Timers | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        errors = []
        if (self.roles is None) == (self.assignee is None):
            key = "roles" if self.roles is None else "assignee"
            message = "a task is for roles or for an assignee"
            message += ", not both" if self.roles is not None else ""
            errors.append(document_error((key,), "task_actor", message, None))
        if COMMENT in self.fields:
            message = f"{COMMENT} is every task's own field: give this one another name"
            errors.append(document_error(("fields", COMMENT), "reserved", message, COMMENT))
        for outcome, names in self.required.items():
            if outcome not in self.outcomes:
                errors.append(_not_outcome(("required", outcome), outcome, self.outcomes))
            for i, name in enumerate(names):
                if name not in self.fields and name != COMMENT:
                    known = ", ".join([*self.fields, COMMENT])
                    message = f"the task has no field {name!r}; its fields: {known}"
                    errors.append(
                        document_error(("required", outcome, i), "unknown_field", message, name)
                    )
        if self.timers and self.timers.deadline is not None and self.timers.on_deadline is None:
            message = "a deadline needs on_deadline, the outcome the task closes with then"
            errors.append(document_error(("timers", "on_deadline"), "missing", message, None))
        on_deadline = self.timers.on_deadline if self.timers else None
        if on_deadline is not None and on_deadline not in self.outcomes:
            errors.append(_not_outcome(("timers", "on_deadline"), on_deadline, self.outcomes))
        _check("TaskStep", errors)
        return self

    @property
    def step_outcomes(self) -> tuple[str, ...]:
        return tuple(self.outcomes)

    def needs(self) -> dict[str, list[str]]:
        """Outcome -> what a person choosing it must give: the fields `required` names for it,
        and every field of the form that says `required: true` (and `comment`, if named)."""
        always = [name for name, spec in self.fields.items() if spec.required]
        needed = {
            outcome: list(dict.fromkeys([*self.required.get(outcome, []), *always]))
            for outcome in self.outcomes
        }
        return {outcome: names for outcome, names in needed.items() if names}


def _not_outcome(loc: Loc, outcome: str, outcomes: Sequence[str]) -> InitErrorDetails:
    message = f"{outcome!r} is not an outcome of the task; its outcomes: {', '.join(outcomes)}"
    return document_error(loc, "unknown_outcome", message, outcome)


class ApprovalTier(BlueprintModel):
    """A level of an approval chain: needed when the amount is at least `min_amount`."""

    name: Title
    min_amount: Amount = Decimal(0)
    roles: Roles
    mode: Literal["sequential", "all", "k_of_n"] = Field(
        "sequential",
        description="sequential: one task for the roles; all: one task per role, all must "
        "approve; k_of_n: one task per role, k approvals suffice",
    )
    k: int | None = Field(None, ge=1, le=MAX_ROLES, description="k_of_n only")

    @model_validator(mode="after")
    def _k_fits(self) -> Self:
        too_large = "the level: it could never approve"
        check_quorum(self.mode, self.k, len(self.roles), missing="missing", too_large=too_large)
        return self


class ApprovalStep(StepModel):
    """An approval chain: the levels the amount needs, lowest first; approved once every
    level approved, rejected at the first refusal (timed_out past a deadline)."""

    KIND: ClassVar[str] = "approval"
    approval: Name
    title: Title
    amount_field: Name | None = Field(None, description="an int or decimal field")
    levels: list[ApprovalTier] = Field(min_length=1, max_length=MAX_TIERS)
    timers: Timers | None = None

    @model_validator(mode="after")
    def _levels_ascend(self) -> Self:
        errors = []
        for i, level in enumerate(self.levels):
            if self.amount_field is None and level.min_amount:
                message = "a threshold needs the approval's amount_field"
                errors.append(document_error(("levels", i, "min_amount"), "no_amount", message, 0))
            elif self.amount_field and i and level.min_amount <= self.levels[i - 1].min_amount:
                previous = _plain_number(self.levels[i - 1].min_amount)
                message = f"min_amount {_plain_number(level.min_amount)} must be greater than "
                message += f"the previous level's {previous} (levels go lowest first)"
                errors.append(document_error(("levels", i, "min_amount"), "tier_order", message, 0))
        if self.timers and self.timers.on_deadline is not None:
            message = "an approval past its deadline ends timed_out: no on_deadline"
            errors.append(
                document_error(("timers", "on_deadline"), "not_for_approval", message, None)
            )
        _check("ApprovalStep", errors)
        return self

    @property
    def step_outcomes(self) -> tuple[str, ...]:
        if self.timers and self.timers.deadline is not None:
            return (*APPROVAL_OUTCOMES, TIMED_OUT)
        return APPROVAL_OUTCOMES


class FieldRef(BlueprintModel):
    """A parameter's value taken from a field of the instance."""

    field: Name


def _parameter(value: Any) -> Any:
    if isinstance(value, dict):
        return FieldRef.model_validate(value)
    return _plain_value(value)


Parameter = Annotated[FieldRef | bool | int | float | str, BeforeValidator(_parameter)]


class CallStep(StepModel):
    """A call of a catalogued activity (`workflows.blueprint.catalog`), with its parameters;
    its timeout and retries are the catalog's, never the blueprint's."""

    KIND: ClassVar[str] = "call"
    call: Name
    name: Name | None = Field(None, description="the step's name; default: the activity's")
    with_: Annotated[dict[Name, Parameter], Field(max_length=MAX_FIELDS)] = Field(
        default_factory=dict, alias="with"
    )

    @property
    def step_name(self) -> str:
        return self.name or self.call


RECEIVED = "received"


class WaitSpec(BlueprintModel):
    """What a wait waits for: a duration (`after`), a date or datetime field (`until`), or an
    event (`event`) at most `timeout` long."""

    business_time: bool = False
    after: TimerDuration | None = None
    until: Name | None = None
    event: Name | None = None
    timeout: TimerDuration | None = None

    _business = model_validator(mode="before")(_business_spans("after", "timeout"))

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        given = _given(self, "after", "until", "event")
        if len(given) != 1:
            message = "a wait has one of after, until, event"
            message += f", not {', '.join(given)}" if given else ""
            raise PydanticCustomError("wait", message)
        errors = _kind_errors(self, ("after", "timeout"))
        if self.event is not None and self.timeout is None:
            message = "an event wait needs a timeout: without one an instance may wait forever"
            errors.append(document_error(("timeout",), "missing", message, None))
        if self.event is None and self.timeout is not None:
            errors.append(
                document_error(("timeout",), "timeout_unused", "timeout is for events", None)
            )
        if self.business_time and self.until is not None:
            message = "business_time is for durations, not a date"
            errors.append(document_error(("business_time",), "not_for_until", message, True))
        _check("WaitSpec", errors)
        return self


class WaitStep(StepModel):
    """A wait. An event wait ends `received` or `timed_out`, which conditions may read."""

    KIND: ClassVar[str] = "wait"
    wait: WaitSpec
    name: Name | None = Field(None, description="the step's name; default: the event's")

    @property
    def step_name(self) -> str | None:
        return self.name or self.wait.event

    @property
    def step_outcomes(self) -> tuple[str, ...]:
        return (RECEIVED, TIMED_OUT) if self.wait.event is not None else ()


class ParallelStep(StepModel):
    """Named branches of steps run side by side; the step ends when every branch has."""

    KIND: ClassVar[str] = "parallel"
    parallel: Name
    branches: dict[Name, Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS)]] = Field(
        min_length=2, max_length=MAX_BRANCHES
    )


STEP_KINDS = ("task", "approval", "call", "wait", "parallel")


Step = Annotated[
    Annotated[TaskStep, Tag("task")]
    | Annotated[ApprovalStep, Tag("approval")]
    | Annotated[CallStep, Tag("call")]
    | Annotated[WaitStep, Tag("wait")]
    | Annotated[ParallelStep, Tag("parallel")],
    _by_kind(
        STEP_KINDS,
        "step_kind",
        "a step is one of task, approval, call, wait, parallel: its first key says which",
    ),
]


def walk_steps(steps: Sequence[Step], loc: Loc) -> Iterator[tuple[Loc, Step]]:
    """Every step, those of parallel branches too (after their parallel step), with its
    location: `loc + (index, kind)`."""
    for i, step in enumerate(steps):
        here = (*loc, i, step.KIND)
        yield here, step
        if isinstance(step, ParallelStep):
            for branch, inner in step.branches.items():
                yield from walk_steps(inner, (*here, "branches", branch))


def name_loc(step: Step) -> Loc:
    """Where a step's name is written, relative to the step."""
    if isinstance(step, CallStep | WaitStep) and step.name is not None:
        return ("name",)
    if isinstance(step, WaitStep):
        return ("wait", "event")
    return (step.KIND,)


# ----------------------------------------------------------------------------- stages
class EscalateTo(BlueprintModel):
    to_role: Role


class NotifyRole(BlueprintModel):
    role: Role


class BreachAction(BlueprintModel):
    """What an SLA breach does: `{escalate: {to_role}}` (its open tasks' candidates widen to
    the role) or `{notify: {role}}` (the role's holders are told)."""

    escalate: EscalateTo | None = None
    notify: NotifyRole | None = None

    @model_validator(mode="after")
    def _one_action(self) -> Self:
        if len(_given(self, "escalate", "notify")) != 1:
            raise PydanticCustomError("breach_action", "an action is one of escalate, notify")
        return self

    @property
    def role(self) -> str:
        if self.escalate is not None:
            return self.escalate.to_role
        assert self.notify is not None
        return self.notify.role


BreachActions = Annotated[list[BreachAction], Field(min_length=1, max_length=MAX_ROLES)]


class StageSla(BlueprintModel):
    """Time allowed in one visit of the stage."""

    within: TimerDuration
    business_time: bool = False
    on_breach: BreachActions

    _business = model_validator(mode="before")(_business_spans("within"))

    @model_validator(mode="after")
    def _kind(self) -> Self:
        _check("StageSla", _kind_errors(self, ("within",)))
        return self


class ProcessSla(StageSla):
    """Time allowed from entering stage `from` until entering one of the `until` stages."""

    name: Name
    from_: Name = Field(alias="from")
    until: Names


class Rule(BlueprintModel):
    """One rule of a `then`: `{when: <condition>, go: <stage>}`, or the last, `{otherwise:
    <stage>}`. The first rule whose condition holds decides."""

    when: Predicate | None = None
    go: Name | None = None
    otherwise: Name | None = None

    @model_validator(mode="after")
    def _shape(self) -> Self:
        if self.otherwise is None and (self.when is None or self.go is None):
            key = "when" if self.when is None else "go"
            raise document_refusal(
                "Rule", [document_error((key,), "missing", "a rule is {when, go}", None)]
            )
        if self.otherwise is not None and (self.when is not None or self.go is not None):
            message = "otherwise stands alone: {otherwise: <stage>}"
            raise document_refusal(
                "Rule", [document_error(("otherwise",), "otherwise_alone", message, None)]
            )
        return self

    @property
    def target(self) -> str:
        target = self.go or self.otherwise
        assert target is not None
        return target


class End(BlueprintModel):
    """The instance ends here with `outcome`; the `required` fields must be filled in."""

    outcome: Name
    required: Annotated[list[Name], Field(max_length=MAX_FIELDS), AfterValidator(unique_names)] = (
        Field(default_factory=list)
    )


class Stage(BlueprintModel):
    """A stage: `do` its steps in order, then go on by `then`; or an `end`.

    `max_visits` bounds how often an instance enters the stage: the next entry goes to
    `on_max_visits` instead (every loop of the stage graph needs such a bound)."""

    title: Title | None = None
    description: Text | None = None
    do: list[Step] = Field(default_factory=list, max_length=MAX_STEPS)
    then: list[Rule] | None = Field(None, min_length=1, max_length=MAX_RULES)
    max_visits: int | None = Field(None, ge=1, le=MAX_VISITS)
    on_max_visits: Name | None = None
    sla: StageSla | None = None
    end: End | None = None

    @field_validator("then", mode="before")
    @classmethod
    def _single_stage(cls, value: Any) -> Any:
        """`then: <stage>` is the rule `{otherwise: <stage>}`."""
        return [{"otherwise": _snake_case(value)}] if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _then_as_written(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A `then` without conditions is shown as its stage, as it is usually written."""
        data = handler(self)
        if isinstance(data, dict) and "then" in data and self.next_stage is not None:
            data["then"] = self.next_stage
        return data

    @model_validator(mode="after")
    def _shape(self) -> Self:
        errors = self._end_errors() if self.end is not None else self._then_errors()
        if (self.max_visits is None) != (self.on_max_visits is None):
            key = "on_max_visits" if self.max_visits is not None else "max_visits"
            message = "max_visits and on_max_visits go together: the bound, and where the "
            message += "entry after the last goes"
            errors.append(document_error((key,), "missing", message, None))
        errors += self._duplicate_steps()
        _check("Stage", errors)
        return self

    def _end_errors(self) -> list[InitErrorDetails]:
        return [
            document_error((key,), "end_stage", f"an end stage only ends: no {key}", None)
            for key in ("do", "then", "max_visits", "on_max_visits", "sla")
            if key in self.model_fields_set
        ]

    def _then_errors(self) -> list[InitErrorDetails]:
        if self.then is None:
            return [document_error(("then",), "missing", "a stage needs then (or end)", None)]
        errors = [
            document_error((i,), "otherwise_last", "only the last rule is {otherwise}", None)
            for i, rule in enumerate(self.then[:-1])
            if rule.otherwise is not None
        ]
        if self.then[-1].otherwise is None:
            message = "the last rule is {otherwise: <stage>}: some rule must always apply"
            errors.append(document_error((len(self.then) - 1,), "otherwise_missing", message, None))
        return [{**e, "loc": ("then", *e["loc"])} for e in errors]

    def _duplicate_steps(self) -> list[InitErrorDetails]:
        seen: dict[str, Loc] = {}
        errors = []
        for loc, step in walk_steps(self.do, ("do",)):
            name = step.step_name
            if name is None:
                continue
            if name in seen:
                message = f"a step named {name!r} is already in this stage (at "
                message += f"{'.'.join(map(str, seen[name]))}): step names are unique in a stage"
                errors.append(
                    document_error((*loc, *name_loc(step)), "duplicate_step", message, name)
                )
            seen.setdefault(name, loc)
        return errors

    @property
    def next_stage(self) -> str | None:
        """The stage `then` always goes to, when it has no conditions."""
        if self.then is not None and len(self.then) == 1:
            return self.then[0].otherwise
        return None

    def steps(self) -> dict[str, Step]:
        """The stage's named steps (those of parallel branches too), by name."""
        found: dict[str, Step] = {}
        for _, step in walk_steps(self.do, ()):
            if step.step_name is not None:
                found.setdefault(step.step_name, step)
        return found


class Event(BlueprintModel):
    """An external event the gateway accepts for an instance, with its typed fields."""

    description: Text | None = None
    fields: Fields = Field(default_factory=dict)
    roles: Annotated[list[Role], Field(max_length=MAX_ROLES), AfterValidator(unique_names)] = Field(
        default_factory=list, description="who may report it; none: any signed-in user"
    )


class Blueprint(BlueprintModel):
    """A blueprint document (`dsl: 1`)."""

    process: Name
    dsl: Literal[1]
    title: Title
    description: Text
    owner_role: Role
    business_key: Name = Field(description="a required input field, unique per process")
    calendar: BusinessCalendar | None = Field(
        None, description="the business time of timers and SLAs that say business_time"
    )
    input: Annotated[dict[Name, FieldSpec], Field(min_length=1, max_length=MAX_FIELDS)]
    sla: list[ProcessSla] = Field(default_factory=list, max_length=MAX_ROLES)
    start: Name
    stages: Annotated[dict[Name, Stage], Field(min_length=1, max_length=MAX_STAGES)]
    events: Annotated[dict[Name, Event], Field(max_length=MAX_FIELDS)] = Field(default_factory=dict)


# the recursive ones: conditions of conditions, steps of branches
AllOf.model_rebuild()
AnyOf.model_rebuild()
NotOf.model_rebuild()
ParallelStep.model_rebuild()
