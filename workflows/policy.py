"""Policy documents (versioned business rules) validated by pydantic.

A document is stored as JSON in the policy_versions table; an instance loads the current
version at start through an activity and keeps it for its whole life. Version 0 means the
built-in defaults below (no version published yet).

Whatever validates here cannot fail inside a workflow: the validators build, with the very
functions the workflow calls (`TaskTimers.task_times`, `SalesOrderPolicy.payment_timers`,
`approval_chain`), every timer and approval chain an instance builds, and bound each value so
that `now + duration` cannot overflow and no list grows without limit. Publishing
(`validate_policy(..., strict=True)`) also requires every key: no built-in default silently
fills a gap in a published document.

**Business time.** A process policy (`ProcessPolicy`) may carry a business `calendar`; a timer
set (`TaskTimers`) with `business_time: true` reads its durations as business durations of that
calendar (`P2D` is two business days, not 48 hours), and a policy field typed
`BusinessDuration` (an SLA) is business time too. Without either key a document means what it
always meant: both keys are optional even when publishing, and a dump leaves them out while they
hold their defaults (today's documents, their dumps and the seeded default stay as they were).
The policy checks business timers with its calendar: in order in business terms, and short
enough that `due` finds their due from any start (`due_always_exists`), so that no loaded
policy makes a task raise `CalendarError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from decimal import Decimal
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType
from temporalio import workflow

from core.roles import KNOWN_ROLES
from workflows.approval import approval_chain, check_quorum
from workflows.calendar import (
    BusinessCalendar,
    BusinessDuration,
    business_minutes,
    day_minutes,
    due_always_exists,
)
from workflows.documents import Loc, document_error, document_refusal, show_value
from workflows.human_task import (
    DURATION_KEYS,
    Escalation,
    TaskTimes,
    read_business_durations,
    timer_kind_errors,
)

with workflow.unsafe.imports_passed_through():
    # its database is read from files, which the sandbox forbids: read it once, outside
    import pycountry

# Every duration lies in [MIN_DURATION, MAX_DURATION]: a timer fires (no zero "no timer"),
# never in the past, and `now + duration` stays far from datetime.max.
MIN_DURATION = timedelta(seconds=1)
MAX_DURATION = timedelta(days=366)
MAX_AMOUNT = Decimal(10**14)
MAX_TIERS = 10
MAX_ROLES = 10  # per tier, and special_change_roles
MAX_CURRENCIES = 20
MAX_NAME_LENGTH = 100
ISO_4217_CODES: frozenset[str] = frozenset(c.alpha_3 for c in pycountry.currencies)

# validation context key: every key of the document must be given (publishing)
STRICT = "strict"
_KNOWN_ERROR_TYPES: frozenset[str] = frozenset(get_args(ErrorType))


def _again(e: ErrorDetails) -> InitErrorDetails:
    """An error pydantic reported, to be raised again together with others."""
    if e["type"] in _KNOWN_ERROR_TYPES:
        details = InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"])
        if "ctx" in e:
            details["ctx"] = e["ctx"]
        return details
    return document_error(e["loc"], e["type"], e["msg"], e["input"])


# ----------------------------------------------------------------------------- value types
def _duration(d: timedelta) -> timedelta:
    if not MIN_DURATION <= d <= MAX_DURATION:
        raise PydanticCustomError(
            "duration_out_of_range",
            f"a duration must be at least {MIN_DURATION.total_seconds():g} second and at most "
            f"{MAX_DURATION.days} days, not {d}",
        )
    return d


def _known_role(role: str) -> str:
    if role not in KNOWN_ROLES:
        raise PydanticCustomError(
            "unknown_role",
            f"unknown role {show_value(role)}; known roles: {', '.join(sorted(KNOWN_ROLES))}",
        )
    return role


def _iso_4217(code: str, info: ValidationInfo) -> str:
    # Publishing checks the code against ISO 4217 as pycountry knows it today; an instance
    # loading a stored version only checks its form, so that a code withdrawn in a later
    # pycountry neither breaks new instances nor the replay of old ones.
    strict = (info.context or {}).get(STRICT)
    well_formed = len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()
    if not well_formed or (strict and code not in ISO_4217_CODES):
        raise PydanticCustomError(
            "unknown_currency", f"{show_value(code)} is not an ISO 4217 currency code (e.g. EUR)"
        )
    return code


def unique_names(values: list[str]) -> list[str]:
    seen: set[str] = set()
    errors = []
    for i, v in enumerate(values):
        if v in seen:
            errors.append(document_error((i,), "duplicate", f"{show_value(v)} is listed twice", v))
        seen.add(v)
    if errors:
        raise document_refusal("list", errors)
    return values


def printable_name(name: str) -> str:
    if not name.strip():
        raise PydanticCustomError("blank", "a name must not be blank")
    if not name.isprintable():  # it goes into task names, mails and the read model
        raise PydanticCustomError("unprintable", "a name must not contain control characters")
    return name


Duration = Annotated[timedelta, AfterValidator(_duration)]


class _Elapsed(BaseModel):
    span: Duration


def _timer_duration(value: Any) -> timedelta | BusinessDuration:
    """A business duration (read as one by its timer set) as it is; anything else is elapsed
    time, refused as a `Duration` is (the same errors, at the same place)."""
    if isinstance(value, BusinessDuration):
        return value
    try:
        return _Elapsed(span=value).span
    except ValidationError as err:
        errors = [_again({**e, "loc": e["loc"][1:]}) for e in err.errors()]
        raise document_refusal("Duration", errors) from None


def timer_iso(value: timedelta | BusinessDuration) -> str:
    if isinstance(value, BusinessDuration):
        return value.isoformat()
    return _Elapsed.model_construct(span=value).model_dump(mode="json")["span"]


# a timer of a `TaskTimers`: elapsed time, or business time when the set says `business_time`
# (validated as one or the other, never tried as both: a bad elapsed duration is refused as it
# always was; shown in JSON as ISO 8601 either way)
TimerDuration = Annotated[
    timedelta | BusinessDuration,
    PlainValidator(_timer_duration),
    PlainSerializer(timer_iso, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "format": "duration",
            "description": "ISO 8601; business time (days, hours, minutes) when the timers say "
            "business_time",
        }
    ),
]
RoleName = Annotated[str, AfterValidator(_known_role)]
RoleList = Annotated[
    list[RoleName], Field(min_length=1, max_length=MAX_ROLES), AfterValidator(unique_names)
]
CurrencyCode = Annotated[str, AfterValidator(_iso_4217)]
Amount = Annotated[Decimal, Field(ge=0, le=MAX_AMOUNT, decimal_places=2)]
TierName = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_LENGTH), AfterValidator(printable_name)
]


class PolicyModel(BaseModel):
    """Base of policy documents and their parts: unknown keys refused; in strict mode (the
    validation context of `validate_policy(..., strict=True)`) every key must be given, but
    those whose default is None (nothing to fill), those `REPLACED_BY` a key that is given and
    the `OPTIONAL` ones (added later; a dump leaves them out while they hold their default)."""

    model_config = ConfigDict(extra="forbid")
    # key -> the key that, when given, stands for it (strict mode does not require it then)
    REPLACED_BY: ClassVar[Mapping[str, str]] = MappingProxyType({})
    # keys added after documents were published: never required, not dumped at their default
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _without_unused_options(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self.OPTIONAL:
                field = type(self).model_fields.get(name)
                if field is not None and name in data and getattr(self, name) == field.default:
                    del data[name]
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _complete(
        cls, data: Any, handler: ModelWrapValidatorHandler[Self], info: ValidationInfo
    ) -> Self:
        if not (info.context or {}).get(STRICT) or not isinstance(data, dict):
            return handler(data)
        errors = [
            InitErrorDetails(type="missing", loc=(name,), input=data)
            for name, f in cls.model_fields.items()
            if name not in data
            and not f.is_required()
            and f.default is not None
            and cls.REPLACED_BY.get(name) not in data
            and name not in cls.OPTIONAL
        ]
        if not errors:
            return handler(data)
        try:
            handler(data)
        except ValidationError as err:
            errors += [_again(e) for e in err.errors()]
        raise document_refusal(cls.__name__, errors)


# ----------------------------------------------------------------------------- the models
class ApprovalTier(PolicyModel):
    """Orders with amount_due >= min_amount need this level (levels run lowest first)."""

    min_amount: Amount
    name: TierName
    roles: RoleList
    mode: Literal["sequential", "all", "k_of_n"] = Field(
        "sequential",
        description="sequential: one task for the roles; all: one task per role, all must "
        "approve; k_of_n: one task per role, k approvals suffice",
    )
    k: int | None = Field(None, ge=1, le=MAX_ROLES, description="k_of_n only")

    @model_validator(mode="after")
    def _k_fits(self) -> Self:
        check_quorum(self.mode, self.k, len(self.roles), missing="k_missing", too_large="the tier")
        return self


class EscalationStep(PolicyModel):
    """One level of a task's escalation: `after` the task opened, `to_role` may act too."""

    after: TimerDuration
    to_role: RoleName


class TaskTimers(PolicyModel):
    """When a human task reminds, escalates (SLA) and finally times out.

    Escalation is `escalate_after` + `escalation_role` (one level), or `escalations`: levels
    stacked in time order, each firing at its own time and widening the candidate roles to
    its role (`escalate_after`/`escalation_role` then follow its first level).

    `business_time: true` reads every duration of the set as business time by the policy's
    calendar (`P2D` two business days, `PT4H` four business hours; ISO 8601 days, hours and
    minutes only); the built-in defaults then count business days. Their order is checked by
    the policy that holds the set, in business terms of its calendar (`ProcessPolicy`)."""

    REPLACED_BY: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"escalate_after": "escalations", "escalation_role": "escalations"}
    )
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"business_time"})

    business_time: bool = Field(
        False,
        description="durations are business time by the policy's calendar (P2D: two business "
        "days, not 48 hours); default: elapsed time",
    )
    remind_after: TimerDuration = timedelta(days=1)
    escalate_after: TimerDuration = timedelta(days=2)
    deadline: TimerDuration = timedelta(days=7)
    escalation_role: RoleName = "manager"
    escalations: list[EscalationStep] | None = Field(
        None, min_length=1, max_length=MAX_ROLES, description="levels, earliest first"
    )

    _business = model_validator(mode="before")(read_business_durations)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        given = set(self.model_fields_set)  # before the defaults below are converted
        errors = [
            document_error(loc, "timer_kind", message, getattr(self, str(loc[0]), None))
            for loc, message in timer_kind_errors(self.business_time, self._given_spans())
        ]
        if errors:
            raise document_refusal("TaskTimers", errors)
        if self.business_time:
            for key in DURATION_KEYS:  # the built-in defaults, in business days
                value = getattr(self, key)
                if isinstance(value, timedelta):
                    setattr(self, key, BusinessDuration(days=value.days))
        if self.escalations:
            first = self.escalations[0]
            for key, value in (("escalate_after", first.after), ("escalation_role", first.to_role)):
                if key in given and getattr(self, key) != value:
                    message = f"{key} ({getattr(self, key)}) differs from the first level of "
                    message += f"escalations ({value}): give one of them"
                    errors.append(document_error((key,), "escalation_conflict", message, value))
            self.escalate_after, self.escalation_role = first.after, first.to_role
        if not self.business_time:
            errors += self.order_errors(lambda d: d)
        if errors:
            raise document_refusal("TaskTimers", errors)
        self.task_times()
        return self

    def _given_spans(self) -> list[tuple[Loc, object]]:
        spans: list[tuple[Loc, object]] = [
            ((key,), getattr(self, key)) for key in DURATION_KEYS if key in self.model_fields_set
        ]
        spans += [
            (("escalations", i, "after"), e.after) for i, e in enumerate(self.escalations or [])
        ]
        return spans

    def spans(self) -> list[tuple[Loc, timedelta | BusinessDuration]]:
        """Every duration of the set that makes a timer, with its location."""
        spans: list[tuple[Loc, timedelta | BusinessDuration]] = [
            (("remind_after",), self.remind_after),
            (("deadline",), self.deadline),
        ]
        if self.escalations:
            spans += [
                (("escalations", i, "after"), e.after) for i, e in enumerate(self.escalations)
            ]
        else:
            spans.append((("escalate_after",), self.escalate_after))
        return spans

    def order_errors(self, key: Callable[[Any], Any], terms: str = "") -> list[InitErrorDetails]:
        """The set's timers out of order, compared by `key` (a duration's length): a reminder
        before the first escalation, levels increasing, none after the deadline. `terms` ends
        each message (how they compare)."""
        errors = []
        if self.escalations:
            for i in range(1, len(self.escalations)):
                before, level = self.escalations[i - 1], self.escalations[i]
                if key(level.after) <= key(before.after):
                    message = f"after ({level.after}) must be longer than the previous level's "
                    message += f"({before.after}): levels go earliest first{terms}"
                    errors.append(
                        document_error(("escalations", i, "after"), "timer_order", message, 0)
                    )
            last = self.escalations[-1].after
            if key(last) > key(self.deadline):
                message = f"the last level ({last}) must not be later than deadline "
                message += f"({self.deadline}){terms}"
                loc = ("escalations", len(self.escalations) - 1, "after")
                errors.append(document_error(loc, "timer_order", message, str(last)))
        if key(self.remind_after) >= key(self.escalate_after):
            errors.append(
                document_error(
                    ("remind_after",),
                    "timer_order",
                    f"remind_after ({self.remind_after}) must be shorter than escalate_after "
                    f"({self.escalate_after}){terms}",
                    str(self.remind_after),
                )
            )
        if not self.escalations and key(self.escalate_after) > key(self.deadline):
            errors.append(
                document_error(
                    ("escalate_after",),
                    "timer_order",
                    f"escalate_after ({self.escalate_after}) must not be longer than deadline "
                    f"({self.deadline}){terms}",
                    str(self.escalate_after),
                )
            )
        return errors

    def task_times(self) -> TaskTimes:
        """What `TaskBoard.open` takes: the same durations and escalation role."""
        levels = self.escalations or []
        return TaskTimes(
            business_time=self.business_time,
            remind_after=self.remind_after,
            escalate_after=self.escalate_after,
            deadline=self.deadline,
            escalation_role=self.escalation_role,
            # one level: exactly today's times (and commands)
            escalations=[Escalation(after=e.after, to_role=e.to_role) for e in levels]
            if len(levels) > 1
            else [],
        )


class ProcessPolicy(PolicyModel):
    """Base of a process's policy document: what every process's policy may carry.

    `calendar`: the business calendar of the process's business time (absent: every timer is
    elapsed time, as before). A timer set with `business_time` and a `BusinessDuration` field
    (an SLA) need it; their timers are checked in business terms of it."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"calendar"})

    calendar: BusinessCalendar | None = Field(
        None,
        description="working days and hours, holidays and time zone of business time; "
        "absent: timers count elapsed time",
    )

    @model_validator(mode="after")
    def _business_time(self) -> Self:
        errors: list[InitErrorDetails] = []
        calendar = self.calendar
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, TaskTimers) and value.business_time:
                if calendar is None:
                    message = "business_time needs the policy's calendar"
                    errors.append(
                        document_error((name, "business_time"), "no_calendar", message, True)
                    )
                    continue
                errors += [_under(name, e) for e in _business_timer_errors(value, calendar)]
            elif isinstance(value, BusinessDuration):
                if calendar is None:
                    message = "a business duration needs the policy's calendar"
                    errors.append(document_error((name,), "no_calendar", message, str(value)))
                elif not due_always_exists(calendar, value):
                    errors.append(_too_long((name,), value))
        if errors:
            raise document_refusal(type(self).__name__, errors)
        return self


def _business_timer_errors(
    timers: TaskTimers, calendar: BusinessCalendar
) -> list[InitErrorDetails]:
    """A business timer set's timers out of order in business terms of `calendar`, or too
    long for it."""
    hours = day_minutes(calendar) / 60
    terms = f", in business time (a business day is {hours:g} working hours of the calendar)"
    errors = timers.order_errors(lambda span: business_minutes(calendar, span), terms)
    errors += [
        _too_long(loc, span)
        for loc, span in timers.spans()
        if isinstance(span, BusinessDuration) and not due_always_exists(calendar, span)
    ]
    return errors


def _under(name: str, error: InitErrorDetails) -> InitErrorDetails:
    return {**error, "loc": (name, *error.get("loc", ()))}


def _too_long(loc: Loc, span: BusinessDuration) -> InitErrorDetails:
    message = f"{span} is too long for the calendar: it has too little working time to be sure "
    message += "of a due within 20 years"
    return document_error(loc, "business_duration_too_long", message, str(span))


class SalesOrderPolicy(ProcessPolicy):
    approval_tiers: list[ApprovalTier] = Field(
        default_factory=lambda: [
            ApprovalTier(
                min_amount=Decimal(500_000),
                name="vice-president approval",
                roles=["vice-president"],
            ),
            ApprovalTier(
                min_amount=Decimal(1_000_000),
                name="sales director approval",
                roles=["sales-director"],
            ),
        ],
        max_length=MAX_TIERS,
        description="ascending, distinct min_amount; none: no order needs approval",
    )
    prepaid_exempt_from_approval: bool = True
    loyalty_discount_pct: Decimal = Field(Decimal(5), ge=0, le=100, decimal_places=2)
    approval_timers: TaskTimers = Field(default_factory=TaskTimers)
    acknowledgement_timers: TaskTimers = Field(
        default_factory=lambda: TaskTimers(
            remind_after=timedelta(hours=8),
            escalate_after=timedelta(days=1),
            deadline=timedelta(days=5),
        )
    )
    special_change_roles: RoleList = Field(
        default_factory=lambda: ["procurement", "production", "inspection"]
    )
    payment_deadline: Duration = Field(
        timedelta(days=14), description="prepaid orders are cancelled if unpaid by then"
    )
    payment_reminder_after: Duration = Field(
        timedelta(days=3), description="shorter than payment_deadline"
    )
    currencies: Annotated[list[CurrencyCode], AfterValidator(unique_names)] = Field(
        default_factory=lambda: ["EUR", "USD", "GBP", "CHF", "RON"],
        min_length=1,
        max_length=MAX_CURRENCIES,
        description="ISO 4217 codes an order may be placed in (checked at submission)",
    )
    max_open_special_changes: int = Field(
        3, ge=1, le=20, description="special changes an order may have unacknowledged at once"
    )
    max_actions_per_task: int = Field(
        200,
        ge=1,
        le=10_000,
        description="claims, releases, delegations and reassignments one task accepts",
    )
    overpayment: Literal["refund", "finance_task"] = Field(
        "refund",
        description="money received beyond the amount due: refunded at once, or a finance task",
    )

    @field_validator("approval_tiers")
    @classmethod
    def _ascending(cls, tiers: list[ApprovalTier]) -> list[ApprovalTier]:
        """Given lowest first, thresholds distinct: refused otherwise, never re-sorted."""
        errors = [
            document_error(
                (i, "min_amount"),
                "tier_order",
                f"min_amount {tier.min_amount} must be greater than the previous tier's "
                f"{tiers[i - 1].min_amount} (tiers go lowest first, thresholds distinct)",
                tier.min_amount,
            )
            for i, tier in enumerate(tiers)
            if i > 0 and tier.min_amount <= tiers[i - 1].min_amount
        ]
        if errors:
            raise document_refusal("approval_tiers", errors)
        return tiers

    @model_validator(mode="after")
    def _buildable(self) -> Self:
        """Build what an instance builds from this policy, with the workflow's own functions."""
        if self.payment_reminder_after >= self.payment_deadline:
            message = (
                f"payment_reminder_after ({self.payment_reminder_after}) must be shorter than "
                f"payment_deadline ({self.payment_deadline})"
            )
            error = document_error(
                ("payment_reminder_after",), "timer_order", message, self.payment_reminder_after
            )
            raise document_refusal("SalesOrderPolicy", [error])
        for timers in (self.payment_timers(), self.approval_timers, self.acknowledgement_timers):
            timers.task_times()
        if self.approval_tiers:
            # the largest threshold needs every level: the longest chain an order can get
            levels = approval_chain(self.approval_tiers, self.approval_tiers[-1].min_amount)
            errors = [
                document_error(
                    ("approval_tiers", i),
                    "unreachable_level",
                    f"level {level.name!r} needs {level.needed()} approvals from "
                    f"{len(level.task_roles())} tasks",
                    level.name,
                )
                for i, level in enumerate(levels)
                if not 1 <= level.needed() <= len(level.task_roles())
            ]
            if errors:
                raise document_refusal("SalesOrderPolicy", errors)
        return self

    def payment_timers(self) -> TaskTimers:
        """Timers of a prepaid order's payment task: reminded, then escalated and timed out at
        the payment deadline, to the approval escalation role."""
        return TaskTimers(
            remind_after=self.payment_reminder_after,
            escalate_after=self.payment_deadline,
            deadline=self.payment_deadline,
            escalation_role=self.approval_timers.escalation_role,
        )


POLICY_MODELS: Mapping[str, type[PolicyModel]] = MappingProxyType({"sales_order": SalesOrderPolicy})


def default_policy_document(process_type: str) -> dict:
    return POLICY_MODELS[process_type]().model_dump(mode="json")


def validate_policy(process_type: str, document: dict, *, strict: bool = False) -> PolicyModel:
    """Raise KeyError for an unknown process type, pydantic.ValidationError for a bad document.

    strict (publishing): every key must be given; a missing one is an error naming it.
    """
    return POLICY_MODELS[process_type].model_validate(document, context={STRICT: strict})
