"""Business-time timers on the time-skipping server: a workflow turns a business duration into
an absolute instant with workflows/calendar.py when the timer starts and sleeps until it on
Temporal's clock. The workflow runs in the default (strict) sandbox, with the calendar module
imported inside it, so this also proves that zoneinfo, tzdata and the holidays library load
and answer there.

The server's clock only moves forward, so one module fixture moves it to Friday 2027-10-29
17:00 in Bucharest (once that is past, the same date of the next year of that shape), starts
every case at that instant and collects their results; the tests then check one case each."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict
from temporalio import workflow

from workflows.calendar import (
    BusinessCalendar,
    BusinessDuration,
    HolidaySource,
    due,
    local_isoformat,
)

with workflow.unsafe.imports_passed_through():
    import pytest_asyncio
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Worker

    from .conftest import start_time_skipping

BUCHAREST = ZoneInfo("Europe/Bucharest")
PARIS = ZoneInfo("Europe/Paris")
RESULT_TIMEOUT_S = 60.0  # generous: days pass in milliseconds on this server


class BusinessTimerInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    calendar: BusinessCalendar
    wait: BusinessDuration


class BusinessTimerResult(BaseModel):
    started: datetime
    due: datetime
    due_local: str
    woke: datetime


@workflow.defn
class BusinessTimerWorkflow:
    """Sleeps `wait` of business time from its start, by `calendar`."""

    @workflow.run
    async def run(self, inp: BusinessTimerInput) -> BusinessTimerResult:
        started = workflow.now()
        due_at = due(inp.calendar, started, inp.wait)
        await workflow.sleep(due_at - workflow.now())
        return BusinessTimerResult(
            started=started,
            due=due_at,
            due_local=local_isoformat(inp.calendar, due_at),
            woke=workflow.now(),
        )


def cases(year: int) -> dict[str, BusinessTimerInput]:
    """What each workflow is given; Monday is November 1st of `year`."""
    romania = HolidaySource(country="RO")
    two_days, four_hours = BusinessDuration.parse("P2D"), BusinessDuration.parse("PT4H")
    return {
        "plain": BusinessTimerInput(
            calendar=BusinessCalendar(timezone="Europe/Bucharest", holidays=romania),
            wait=two_days,
        ),
        "monday_off": BusinessTimerInput(
            calendar=BusinessCalendar(
                timezone="Europe/Bucharest",
                holidays=romania,
                extra_holidays=(date(year, 11, 1),),
            ),
            wait=two_days,
        ),
        # the same instant is Friday 16:00 in Paris; All Saints' Day (Monday) is a holiday there
        "paris": BusinessTimerInput(
            calendar=BusinessCalendar(
                timezone="Europe/Paris", holidays=HolidaySource(country="FR")
            ),
            wait=two_days,
        ),
        "hours": BusinessTimerInput(
            calendar=BusinessCalendar(timezone="Europe/Bucharest", holidays=romania),
            wait=four_hours,
        ),
    }


def case_year(now: datetime) -> int:
    """The issue's year, 2027, while its Friday 29 October is ahead of the server's clock
    (which starts at the real time and only moves forward); afterwards the next year of the
    same shape: Friday 29 October, the clocks go back on Sunday the 31st."""
    return next(
        year
        for year in range(2027, 2100)
        if date(year, 10, 31).weekday() == 6
        and datetime(year, 10, 29, 17, 0, tzinfo=BUCHAREST) > now
    )


@dataclass(frozen=True)
class Run:
    year: int
    results: dict[str, BusinessTimerResult]


@pytest_asyncio.fixture(scope="module")
async def run() -> AsyncIterator[Run]:
    """Every case started on Friday 29 October at 17:00 Bucharest time, run to its end on a
    server and a task queue of this module's own."""
    env: WorkflowEnvironment = await start_time_skipping()
    try:
        task_queue = f"tq-calendar-{uuid.uuid4()}"
        async with Worker(env.client, task_queue=task_queue, workflows=[BusinessTimerWorkflow]):
            now = await env.get_current_time()
            year = case_year(now)
            # 14:00 UTC, before the change (built here, not at import: the sandbox imports
            # this module too, and its ZoneInfo is a proxy that datetime refuses)
            await env.sleep(datetime(year, 10, 29, 17, 0, tzinfo=BUCHAREST) - now)
            handles = {
                name: await env.client.start_workflow(
                    BusinessTimerWorkflow.run,
                    inp,
                    id=f"business-timer-{name}-{uuid.uuid4()}",
                    task_queue=task_queue,
                )
                for name, inp in cases(year).items()
            }
            # one result at a time: each wait unlocks time skipping, and waits that overlap
            # let the server skip past workflow tasks still in flight
            done = {}
            for name, handle in handles.items():
                done[name] = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
            yield Run(year, done)
    finally:
        await env.shutdown()


def wall(instant: datetime, zone: ZoneInfo = BUCHAREST) -> tuple[date, int, int]:
    """The local date, hour and minute of `instant` (the server adds milliseconds of work)."""
    local = instant.astimezone(zone)
    return local.date(), local.hour, local.minute


def test_every_case_started_on_friday_evening_before_the_october_change(run):
    for result in run.results.values():
        assert wall(result.started) == (date(run.year, 10, 29), 17, 0)
        assert result.started.astimezone(BUCHAREST).utcoffset() == timedelta(hours=3)


def test_two_business_days_from_friday_evening_wake_on_tuesday_evening(run):
    result = run.results["plain"]
    assert result.due_local == f"{run.year}-11-02T17:00:00+02:00"  # EET: the clocks went back
    assert result.woke >= result.due
    assert wall(result.woke) == (date(run.year, 11, 2), 17, 0)
    assert result.woke.astimezone(BUCHAREST).utcoffset() == timedelta(hours=2)


def test_a_holiday_on_monday_wakes_the_timer_on_wednesday(run):
    result = run.results["monday_off"]
    assert result.due_local == f"{run.year}-11-03T17:00:00+02:00"
    assert result.woke >= result.due
    assert wall(result.woke) == (date(run.year, 11, 3), 17, 0)


def test_a_holiday_of_the_library_moves_the_timer_inside_the_sandbox(run):
    result = run.results["paris"]
    # 16:00 in Paris is working time: the due keeps the start's milliseconds (rule 1)
    shown = datetime.fromisoformat(result.due_local)
    assert shown.utcoffset() == timedelta(hours=1)  # CET, after the change
    assert wall(shown, PARIS) == (date(run.year, 11, 3), 16, 0)  # Tuesday is the 1st
    assert result.woke >= result.due
    assert wall(result.woke, PARIS) == (date(run.year, 11, 3), 16, 0)


def test_four_business_hours_from_friday_evening_wake_on_monday_at_one(run):
    result = run.results["hours"]
    assert result.due_local == f"{run.year}-11-01T13:00:00+02:00"  # 09:00 + 4 h on Monday
    assert wall(result.woke) == (date(run.year, 11, 1), 13, 0)


def test_the_issue_year_is_used_while_it_lies_ahead():
    assert case_year(datetime(2026, 12, 1, tzinfo=UTC)) == 2027
    assert case_year(datetime(2027, 10, 29, 15, 0, tzinfo=UTC)) == 2032  # 17:00 has passed
