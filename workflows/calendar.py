"""The business calendar: working days and hours, holidays and a time zone, as policy data.

Durations such as "2 business days" or "4 business hours" are turned into an absolute instant
when a timer starts; the timer itself then runs on Temporal's clock. The API is small:

```python
calendar = BusinessCalendar(
    timezone="Europe/Bucharest",
    working_days=("mon", "tue", "wed", "thu", "fri"),  # the default
    hours=WorkingHours(start=time(9), end=time(17)),   # the default, local wall-clock times
    holidays=HolidaySource(country="RO"),              # the `holidays` library; optional
    extra_holidays=(date(2027, 11, 1),),               # the company's own days off
    extra_working_days=(),                             # e.g. a Saturday worked for a bridge day
)
wait = BusinessDuration.parse("P2D")                   # or any pydantic input: "P2D" in JSON
due_at = due(calendar, workflow.now(), wait)           # an aware datetime in UTC
await workflow.sleep(due_at - workflow.now())
local_isoformat(calendar, due_at)                      # "2027-11-02T17:00:00+02:00" for the API
```

`BusinessCalendar()` is Mon-Fri 09:00-17:00 UTC without holidays. Both models are frozen,
refuse unknown keys and name the field they refuse; `BusinessDuration` is written and shown
as an ISO 8601 duration string. Build a changed calendar by validating its data again
(`BusinessCalendar.model_validate({...})`), not with `model_copy(update=...)`, which pydantic
does not validate (the zone and date sets prepared at validation would be stale).

**Working time.** A date is a working day when it is listed in `extra_working_days`, or when
its weekday is a working day and it is neither a holiday of the library's country (and
subdivision) nor listed in `extra_holidays`. On a working day the working time is the closed
interval [opening, closing] of `hours` in the calendar's zone: 17:00 is still Friday's working
time when the hours end at 17:00. A wall-clock time that a DST change skips is read with the
offset before the change (02:30 on a spring-forward night is 03:30 after it); one it repeats is
its first occurrence.

**The rules of `due(calendar, start, duration)`**, in the order they apply:

1. *Business days, start in working time*: the due is the same local wall-clock time on the
   n-th following working day (Friday 17:00 + P2D = Tuesday 17:00, whatever DST did between).
2. *Business days, start outside working time* (before opening, after closing, on a day off):
   the duration counts from the next opening and ends at the closing of the n-th working day,
   counting the opening's day as the first (Saturday 10:00 + P1D = Monday 17:00; Friday
   17:00:01 + P2D = Tuesday 17:00, the same as Friday 17:00, so a start a second after closing
   does not push the due to the next morning).
3. *Business hours and minutes* (after the days, if there are both: P1DT2H is one business day,
   then two business hours): only working time counts, as elapsed time, across nights, days off
   and DST changes; a start outside working time counts from the next opening. A due that falls
   exactly on a closing stays there (Friday 16:00 + PT1H = Friday 17:00, not Monday 09:00).

`due` is pure and deterministic: the zone and the holiday library are loaded when the model is
built, the holidays of each year are resolved the first time the computation touches that
year (and kept in the calendar object: give each workflow instance its own, as loading its
policy does; one object is not meant to be shared between threads). Holidays and zones are the
`holidays` and `tzdata` packages' data: pin them, since the due of a timer is computed again
when its workflow replays. `due` raises `CalendarError` (a ValueError) for a naive start, and
when no due exists within `MAX_SPAN_DAYS` (a calendar with almost no working time).

Inside the workflow sandbox: the zone is loaded through pydantic (the sandbox's `ZoneInfo(key)`
returns a proxy that datetime refuses as a tzinfo), and the holiday library runs under
`workflow.unsafe.sandbox_unrestricted()` where it loads its gettext catalogue or resolves a
year (gettext calls `locale` functions the sandbox forbids), with its imports passed through
(its country modules are imported lazily, by importlib, which the sandbox's pass-through does
not see: `_entity_class` imports them through it, so that the library is never imported a
second time inside the sandbox, also when the `workflows` package itself is passed through).
tests/workflows/test_calendar_timers.py runs the block in the default sandbox, and
tests/workflows/test_calendar_tasks.py with the package passed through, as workers run it.

**Comparing business durations** (policy checks): `business_minutes` measures a duration in
working minutes of a calendar (a business day is one working day's hours), the order in which
their dues fall from any start; `due_always_exists` says whether `due` finds a due from any
start (conservatively), so that a published timer never raises `CalendarError`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Literal, Self
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema
from temporalio import workflow

from workflows.documents import Loc, document_error, document_refusal, show_value

with workflow.unsafe.imports_passed_through():
    # its country modules are loaded lazily and its names from gettext catalogues (files):
    # import it once, outside the sandbox
    import holidays

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

MAX_BUSINESS_DAYS = 366
MAX_BUSINESS_MINUTES = 366 * 24 * 60  # PT8784H
MAX_EXTRA_DATES = 1000  # per list: extra_holidays, extra_working_days
MAX_SPAN_DAYS = 20 * 366  # `due` looks this far ahead of the start, no further

# P<days>D, T<hours>H<minutes>M, each part optional but not all; no years, months, weeks or
# seconds: a business month or week has no single meaning, and seconds are below the timers'
# granularity
DURATION_PATTERN = (
    r"^P(?!$)(?:(?P<days>\d+)D)?(?:T(?=\d)(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?)?$"
)
JSON_PATTERN = r"^P(?!$)(?:\d+D)?(?:T(?=\d)(?:\d+H)?(?:\d+M)?)?$"  # the same, for JSON Schema
DURATION_EXAMPLES = ("P2D", "PT4H", "P1DT2H", "PT30M")


class CalendarError(ValueError):
    """`due` cannot answer: a naive start, or no due within MAX_SPAN_DAYS of the start."""


def _refuse(title: str, loc: Loc, kind: str, message: str, value: Any) -> ValidationError:
    """A validation error at `loc`, relative to the value being validated."""
    return document_refusal(title, [document_error(loc, kind, message, value)])


# ----------------------------------------------------------------------------- durations
class BusinessDuration(BaseModel):
    """Business time, written as an ISO 8601 duration: `P2D` is two business days (not 48
    hours), `PT4H` four business hours, `P1DT2H` a business day and then two business hours,
    `PT30M` thirty business minutes. Never zero; at most 366 days and 8784 hours."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    days: int = Field(0, ge=0, le=MAX_BUSINESS_DAYS)
    minutes: int = Field(0, ge=0, le=MAX_BUSINESS_MINUTES, description="working minutes")

    @classmethod
    def parse(cls, text: str) -> BusinessDuration:
        """The duration `text` (e.g. "P2D") stands for; a ValidationError if it is none."""
        return cls.model_validate(text)

    @model_validator(mode="before")
    @classmethod
    def _from_iso(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        match = re.fullmatch(DURATION_PATTERN, data)
        if match is None:
            raise PydanticCustomError(
                "business_duration",
                f"{show_value(data)} is not a business duration: write it in ISO 8601 with days "
                f"(D), hours (H) and minutes (M), e.g. {', '.join(DURATION_EXAMPLES)}",
            )
        days = int(match["days"] or 0)
        minutes = int(match["hours"] or 0) * 60 + int(match["minutes"] or 0)
        if days > MAX_BUSINESS_DAYS or minutes > MAX_BUSINESS_MINUTES:
            raise PydanticCustomError(
                "business_duration_too_long",
                f"{show_value(data)} is too long: at most {MAX_BUSINESS_DAYS} business days and "
                f"{MAX_BUSINESS_MINUTES // 60} business hours",
            )
        return {"days": days, "minutes": minutes}

    @model_validator(mode="after")
    def _not_zero(self) -> Self:
        if self.days == 0 and self.minutes == 0:
            raise PydanticCustomError(
                "business_duration_zero", "a business duration must not be zero"
            )
        return self

    @model_serializer(mode="plain")
    def _to_iso(self) -> str:
        return self.isoformat()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "string",
            "pattern": JSON_PATTERN,
            "examples": list(DURATION_EXAMPLES),
            "description": "business time as an ISO 8601 duration: P2D is two business days "
            "(not 48 hours), PT4H four business hours, P1DT2H a business day and then two "
            "business hours",
        }

    def isoformat(self) -> str:
        """The ISO 8601 form, normalized: `PT90M` is shown as `PT1H30M`."""
        hours, minutes = divmod(self.minutes, 60)
        day_part = f"{self.days}D" if self.days else ""
        time_part = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
        return f"P{day_part}" + (f"T{time_part}" if time_part else "")

    def __str__(self) -> str:
        return self.isoformat()


# ----------------------------------------------------------------------------- the calendar
class WorkingHours(BaseModel):
    """The working hours of every working day, as local wall-clock times of the calendar's
    zone (no offset); the day's working time is [start, end]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: time = time(9)
    end: time = time(17)

    @field_validator("start", "end")
    @classmethod
    def _local(cls, value: time) -> time:
        if value.tzinfo is not None:
            raise PydanticCustomError(
                "local_time",
                "a working hour is a local time without offset (the calendar's timezone applies)",
            )
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end <= self.start:
            message = f"end ({self.end.isoformat()}) must be after start ({self.start})"
            raise _refuse("WorkingHours", ("end",), "hours_order", message, self.end.isoformat())
        return self


class HolidaySource(BaseModel):
    """Public holidays from the `holidays` library: a country (ISO 3166-1 code, e.g. RO)
    and optionally a subdivision (ISO 3166-2 code, e.g. CA for the United States)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    country: str = Field(min_length=2, max_length=3)
    subdivision: str | None = Field(None, min_length=1, max_length=40)
    observed: bool = Field(
        True,
        description="include the days on which a holiday is observed (US: Friday for a "
        "Saturday holiday)",
    )

    _entity: holidays.HolidayBase = PrivateAttr()

    @field_validator("country")
    @classmethod
    def _known_country(cls, country: str) -> str:
        if country not in holidays.registry.EntityLoader.get_country_codes(include_aliases=True):
            raise PydanticCustomError(
                "unknown_country",
                f"the holidays library knows no country {show_value(country)}; use an ISO 3166-1 "
                "code such as RO, US or DE",
            )
        return country

    @model_validator(mode="after")
    def _load(self) -> Self:
        # the entity's own language: with none given, the library reads the locale from the
        # environment (holiday names only, but workflow code reads no environment)
        entity_class = _entity_class(self.country)
        language = entity_class.default_language
        try:
            # the library loads its names with gettext, which calls functions of `locale` that
            # the sandbox forbids (they would read the process's locale; given a language,
            # gettext only normalizes its name and reads the package's own catalogue)
            with _library():
                entity = holidays.country_holidays(
                    self.country,
                    subdiv=self.subdivision,
                    years=(),
                    observed=self.observed,
                    language=language,
                )
        except NotImplementedError:
            known = entity_class.subdivisions
            listed = ", ".join(known) if known else "none"
            message = (
                f"the holidays library knows no subdivision {show_value(self.subdivision)} of "
                f"{self.country}; known: {listed}"
            )
            raise _refuse(
                "HolidaySource", ("subdivision",), "unknown_subdivision", message, self.subdivision
            ) from None
        self._entity = entity
        return self

    def __eq__(self, other: object) -> bool:
        # the fields, not the loaded entity (which caches the years it was asked about)
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((self.country, self.subdivision, self.observed))

    def is_holiday(self, day: date) -> bool:
        """Whether `day` is a holiday (its year is resolved on first use)."""
        if day.year in self._entity.years:
            return day in self._entity
        with _library():  # resolving a year: as in `_load`
            return day in self._entity


@contextlib.contextmanager
def _library() -> Iterator[None]:
    """Where the holiday library runs inside a workflow: unrestricted (gettext calls `locale`
    functions), and with its own imports (`import holidays` inside its functions) passed
    through: otherwise the sandbox would import the whole library again, for every instance."""
    with workflow.unsafe.imports_passed_through(), workflow.unsafe.sandbox_unrestricted():
        yield


def _entity_class(country: str) -> Any:
    """The library's class of `country`. The library imports a country's module lazily, with
    importlib, which bypasses the sandbox's pass-through: a first use inside a workflow would
    import the library a second time, in the sandbox (and fail there, reading the clock). So its
    module is imported through the sandbox's pass-through first (outside a workflow: an
    ordinary import); the library's loader, shared, keeps the class from then on."""
    loader = getattr(holidays, country)
    if isinstance(loader, holidays.registry.EntityLoader) and loader.entity is None:
        with workflow.unsafe.imports_passed_through():
            __import__(loader.module_name)
    return loader


def _unique_dates(field: str, days: tuple[date, ...]) -> tuple[date, ...]:
    seen: set[date] = set()
    for i, day in enumerate(days):
        if day in seen:
            message = f"{day.isoformat()} is listed twice"
            raise _refuse(field, (i,), "duplicate", message, day.isoformat())
        seen.add(day)
    return days


ExtraDates = tuple[date, ...]


class _Zone(BaseModel):
    """A zone loaded by pydantic. Inside the workflow sandbox `ZoneInfo(key)` returns a proxy
    of the zone, which datetime refuses as a tzinfo; pydantic (passed through the sandbox)
    builds a real one."""

    model_config = ConfigDict(frozen=True)

    key: ZoneInfo


class BusinessCalendar(BaseModel):
    """Working days and hours, holidays and a time zone (see the module docstring for the
    rules `due` applies). The default: Mon-Fri 09:00-17:00 UTC without holidays."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timezone: str = Field("UTC", description="an IANA time zone, e.g. Europe/Bucharest")
    working_days: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri")
    hours: WorkingHours = WorkingHours()
    holidays: HolidaySource | None = None
    extra_holidays: ExtraDates = Field((), max_length=MAX_EXTRA_DATES)
    extra_working_days: ExtraDates = Field(
        (),
        max_length=MAX_EXTRA_DATES,
        description="working even on a day off or a holiday (e.g. a Saturday worked for a "
        "bridge day)",
    )

    _zone: ZoneInfo = PrivateAttr()
    _weekdays: frozenset[int] = PrivateAttr()
    _extra_off: frozenset[date] = PrivateAttr()
    _extra_on: frozenset[date] = PrivateAttr()

    @field_validator("timezone")
    @classmethod
    def _iana_zone(cls, name: str) -> str:
        try:
            _Zone(key=name)
        except ValidationError:
            raise PydanticCustomError(
                "unknown_timezone",
                f"{show_value(name)} is not an IANA time zone (e.g. Europe/Bucharest, UTC)",
            ) from None
        return name

    @field_validator("working_days")
    @classmethod
    def _unique_days(cls, days: tuple[Weekday, ...]) -> tuple[Weekday, ...]:
        if not days:
            raise PydanticCustomError("no_working_day", "at least one day must be a working day")
        for i, day in enumerate(days):
            if day in days[:i]:
                raise _refuse("working_days", (i,), "duplicate", f"{day} is listed twice", day)
        return days

    @field_validator("extra_holidays")
    @classmethod
    def _unique_holidays(cls, days: ExtraDates) -> ExtraDates:
        return _unique_dates("extra_holidays", days)

    @field_validator("extra_working_days")
    @classmethod
    def _unique_working_days(cls, days: ExtraDates) -> ExtraDates:
        return _unique_dates("extra_working_days", days)

    @model_validator(mode="after")
    def _prepare(self) -> Self:
        off = frozenset(self.extra_holidays)
        for i, day in enumerate(self.extra_working_days):
            if day in off:
                message = f"{day.isoformat()} is also listed in extra_holidays"
                raise _refuse(
                    "BusinessCalendar",
                    ("extra_working_days", i),
                    "holiday_and_working_day",
                    message,
                    day.isoformat(),
                )
        self._zone = _Zone(key=self.timezone).key
        self._weekdays = frozenset(WEEKDAYS.index(d) for d in self.working_days)
        self._extra_off = off
        self._extra_on = frozenset(self.extra_working_days)
        return self

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(tuple(self.__dict__.values()))

    @property
    def zone(self) -> ZoneInfo:
        return self._zone

    def is_working_day(self, day: date) -> bool:
        if day in self._extra_on:
            return True
        if day.weekday() not in self._weekdays or day in self._extra_off:
            return False
        return self.holidays is None or not self.holidays.is_holiday(day)

    def opening(self, day: date) -> datetime:
        """When `day`'s working time begins, in UTC (whether or not `day` is a working day)."""
        return self._instant(day, self.hours.start)

    def closing(self, day: date) -> datetime:
        """When `day`'s working time ends, in UTC."""
        return self._instant(day, self.hours.end)

    def _instant(self, day: date, wall: time) -> datetime:
        local = datetime.combine(day, wall.replace(fold=0), tzinfo=self._zone)
        return local.astimezone(timezone.utc)  # noqa: UP017 (see due)


# ----------------------------------------------------------------------------- computing
class _Walk:
    """Day by day through the calendar, at most MAX_SPAN_DAYS from the start."""

    def __init__(self, calendar: BusinessCalendar, start: date) -> None:
        self.calendar = calendar
        try:
            self.last = start + timedelta(days=MAX_SPAN_DAYS)
        except OverflowError:
            self.last = date.max

    def next_working_day(self, day: date) -> date:
        """The first working day after `day`."""
        while True:
            if day >= self.last:
                raise CalendarError(
                    f"no working day within {MAX_SPAN_DAYS} days: the calendar has too little "
                    "working time for this duration"
                )
            day += timedelta(days=1)
            if self.calendar.is_working_day(day):
                return day


def due(calendar: BusinessCalendar, start: datetime, duration: BusinessDuration) -> datetime:
    """The instant (aware, UTC) that lies `duration` of business time after `start` (aware).

    The rules are the module docstring's: business days land on the same local wall-clock time
    of the n-th following working day, or, from a start outside working time, on the closing of
    the n-th working day from the next opening; business hours count working time only."""
    if start.tzinfo is None or start.utcoffset() is None:
        raise CalendarError(f"start must be timezone-aware, not {start.isoformat()}")
    # timezone.utc, not `from datetime import UTC`: an instance imported into the module would
    # be module state for tests/workflows/test_module_state.py
    at = start.astimezone(timezone.utc)  # noqa: UP017
    local = at.astimezone(calendar.zone)
    day = local.date()
    walk = _Walk(calendar, day)
    in_working_time = calendar.is_working_day(day) and (
        calendar.opening(day) <= at <= calendar.closing(day)
    )
    if duration.days and in_working_time:
        for _ in range(duration.days):
            day = walk.next_working_day(day)
        at = calendar._instant(day, local.time())
    elif duration.days:
        if not (calendar.is_working_day(day) and at < calendar.opening(day)):
            day = walk.next_working_day(day)
        for _ in range(duration.days - 1):
            day = walk.next_working_day(day)
        at = calendar.closing(day)
    if duration.minutes:
        at = _add_working_time(calendar, walk, at, timedelta(minutes=duration.minutes))
    return at


def _add_working_time(
    calendar: BusinessCalendar, walk: _Walk, at: datetime, remaining: timedelta
) -> datetime:
    """`remaining` elapsed working time after `at` (UTC), counted only inside working time."""
    day = at.astimezone(calendar.zone).date()
    if not calendar.is_working_day(day):
        day = walk.next_working_day(day)
    while True:
        opening, closing = calendar.opening(day), calendar.closing(day)
        at = max(at, opening)
        if at <= closing:
            if remaining <= closing - at:
                return at + remaining
            remaining -= closing - at
        day = walk.next_working_day(day)


def local_isoformat(calendar: BusinessCalendar, instant: datetime) -> str:
    """`instant` (aware) in the calendar's zone, as ISO 8601 with its offset, e.g.
    "2027-11-02T17:00:00+02:00": how the API shows a due date."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise CalendarError(f"instant must be timezone-aware, not {instant.isoformat()}")
    return instant.astimezone(calendar.zone).isoformat()


# ----------------------------------------------------------------------------- comparing
# `due_always_exists` allows this many holidays of the library per year: more than any country
# it knows (Nepal and Azerbaijan have 33 in 0.109), with subdivision and observed days on top
HOLIDAYS_PER_YEAR_ALLOWED = 60


def day_minutes(calendar: BusinessCalendar) -> int:
    """The working minutes of one working day (its hours; the same every working day)."""
    day = date(2000, 1, 3)
    length = datetime.combine(day, calendar.hours.end) - datetime.combine(day, calendar.hours.start)
    return int(length.total_seconds() // 60)


def business_minutes(calendar: BusinessCalendar, duration: BusinessDuration) -> int:
    """`duration` as working minutes of `calendar`: a business day is one working day's hours.

    This is how the durations of one timer set compare in business terms: from any start,
    `due` of the larger never lands before `due` of the smaller (a business day from a start in
    working time is the same wall-clock time a working day later, one working day's minutes;
    from outside working time it is the closing of the day that opens next, the same)."""
    return duration.days * day_minutes(calendar) + duration.minutes


def due_always_exists(calendar: BusinessCalendar, duration: BusinessDuration) -> bool:
    """True when `due(calendar, start, duration)` finds its due from any start, so that it
    never raises `CalendarError` (checked when a policy is published).

    Conservative: MAX_SPAN_DAYS holds at least `MAX_SPAN_DAYS // 7` of each working weekday;
    every extra holiday and HOLIDAYS_PER_YEAR_ALLOWED library holidays a year are taken off
    (extra working days are not counted), and a working day counts an hour less than its hours
    (a DST change may fall inside them)."""
    weeks = MAX_SPAN_DAYS // 7
    library = HOLIDAYS_PER_YEAR_ALLOWED * (MAX_SPAN_DAYS // 365 + 1) if calendar.holidays else 0
    available = weeks * len(calendar.working_days) - len(calendar.extra_holidays) - library
    per_day = max(1, day_minutes(calendar) - 60)
    needed = duration.days + -(-duration.minutes // per_day) + 2  # the start's and the due's
    return needed <= available
