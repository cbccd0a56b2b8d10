"""Business time in real tasks and SLAs of a process on the kernel, on a time-skipping server of
this module's own.

A tiny review process (one approval task, a stage SLA) loads its policy as every process does
(`load_policy`, the `load_policy` fake answering a stored document): the policy's business
calendar and timers with `business_time: true` reach the kernel that way. Every instance opens
its task on Friday 29 October at 17:00 in Bucharest (the year of test_calendar_timers.py: the
clocks go back on Sunday the 31st), runs through its timers to the deadline, and the tests then
check one case each: the instants in the task (`due_at`, `due_local`), the SLA events recorded
when the timers fired, the end. The server's clock only moves forward, so the instances are
started together and their results are awaited one at a time (waits that overlap let the server
skip past workflow tasks still in flight)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, Field
from temporalio import workflow

# the sandbox re-imports this module for each instance: what it needs besides comes through
with workflow.unsafe.imports_passed_through():
    import pytest_asyncio
    from temporalio.api.enums.v1 import EventType
    from temporalio.client import WorkflowFailureError, WorkflowHandle
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Replayer, Worker

    from activities.models import PolicyDocument, SlaEventRecord
    from workflows.approval import ApprovalLevel
    from workflows.calendar import BusinessDuration
    from workflows.human_task import TaskTimes
    from workflows.kernel import CALENDAR_ERROR, HumanProcess, ProcessStatus
    from workflows.policy import STRICT, ProcessPolicy, TaskTimers

    from .conftest import Fakes, start_time_skipping
    from .test_calendar_timers import BUCHAREST, case_year, wall

RESULT_TIMEOUT_S = 60.0  # generous: days pass in milliseconds on this server


class ReviewPolicy(ProcessPolicy):
    """The review's policy: the task's timers and the stage's SLA."""

    review_timers: TaskTimers = Field(default_factory=TaskTimers)
    review_sla: BusinessDuration | None = None


class CalendarReviewInput(BaseModel):
    key: str
    requester: str = "alice"
    times: TaskTimes | None = Field(None, description="the task's times, instead of the policy's")


@workflow.defn(name="calendar_test_review")
class CalendarReview(HumanProcess):
    """A review: one approval by a reviewer within its SLA, or timed out."""

    PROCESS_TYPE = "calendar_test_review"
    END_STATUS = MappingProxyType(
        {"approved": "completed", "rejected": "completed", "timed_out": "completed"}
    )

    @workflow.init
    def __init__(self, inp: CalendarReviewInput) -> None:
        self.inp = inp
        super().__init__(business_key=inp.key, requester=inp.requester, initial_stage="new")

    @workflow.run
    async def run(self, inp: CalendarReviewInput) -> str:
        policy = await self.load_policy(ReviewPolicy, ReviewPolicy())
        await self.set_stage("review")
        if policy.review_sla is not None:
            self.start_sla("review", policy.review_sla)
        times = inp.times or policy.review_timers.task_times()
        level = ApprovalLevel(name="review", roles=["reviewer"])
        outcome = await self.approval_level(level, "review", times, "Review needed")
        await self.finish(outcome, outcome)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.stage


def calendar(**extra: Any) -> dict:
    return {"timezone": "Europe/Bucharest", "holidays": {"country": "RO"}, **extra}


def policies(year: int) -> dict[str, dict | None]:
    """The policy document of each case (None: no policy published, version 0)."""
    return {
        # a business-time task and SLA; one escalation level
        "business": {
            "calendar": calendar(),
            "review_timers": {
                "business_time": True,
                "remind_after": "PT4H",
                "escalations": [{"after": "P2D", "to_role": "manager"}],
                "deadline": "P5D",
            },
            "review_sla": "PT10H",
        },
        # the same with the Monday off, and a second escalation level a business day later
        "monday_off": {
            "calendar": calendar(extra_holidays=[f"{year}-11-01"]),
            "review_timers": {
                "business_time": True,
                "remind_after": "PT4H",
                "escalations": [
                    {"after": "P2D", "to_role": "manager"},
                    {"after": "P3D", "to_role": "sales-director"},
                ],
                "deadline": "P5D",
            },
            "review_sla": "PT10H",
        },
        # a calendar, but elapsed timers: they mean what they always meant
        "elapsed": {
            "calendar": calendar(),
            "review_timers": {
                "remind_after": "PT4H",
                "escalate_after": "P2D",
                "escalation_role": "manager",
                "deadline": "P5D",
            },
        },
        # business timers given to a process whose policy has no calendar
        "no_calendar": None,
    }


NO_CALENDAR_TIMES = TaskTimes.model_validate(
    {"business_time": True, "remind_after": "PT4H", "deadline": "P2D"}
)


@dataclass
class Case:
    fakes: Fakes
    handle: WorkflowHandle
    opened: ProcessStatus | None = None  # as the task opened
    ended: ProcessStatus | None = None
    result: str | None = None
    error: BaseException | None = None
    task_failures: int = 0  # WorkflowTaskFailed events in the history
    replay_error: BaseException | None = None

    def sla_events(self) -> list[SlaEventRecord]:
        return [e for b in self.fakes.batches for e in b.sla_events]


@dataclass(frozen=True)
class Run:
    year: int
    cases: dict[str, Case] = field(default_factory=dict)

    def day(self, month: int, day: int) -> date:
        return date(self.year, month, day)


async def _opened(handle: WorkflowHandle) -> ProcessStatus:
    """The status once the instance waits on its task (polled: no update, so that the history
    of the time-skipping server replays)."""
    for _ in range(600):
        status = await handle.query(CalendarReview.status)
        if status.pending_tasks:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError("the task did not open")


@pytest_asyncio.fixture(scope="module")
async def run() -> AsyncIterator[Run]:
    env: WorkflowEnvironment = await start_time_skipping()
    try:
        now = await env.get_current_time()
        year = case_year(now)
        result = Run(year)
        async with CaseWorkers(env, policies(year)) as workers:
            # Friday 17:00 in Bucharest, 14:00 UTC, before the change (built here, not at
            # import: the sandbox imports this module too)
            await env.sleep(datetime(year, 10, 29, 17, 0, tzinfo=BUCHAREST) - now)
            for name, (task_queue, fakes) in workers.items():
                inp = CalendarReviewInput(
                    key=f"{name}-{uuid.uuid4().hex[:8]}",
                    times=NO_CALENDAR_TIMES if name == "no_calendar" else None,
                )
                handle = await env.client.start_workflow(
                    CalendarReview.run, inp, id=f"calendar-review-{inp.key}", task_queue=task_queue
                )
                result.cases[name] = Case(fakes, handle)
            for name, case in result.cases.items():
                if name != "no_calendar":
                    case.opened = await _opened(case.handle)
            for case in result.cases.values():  # one result at a time
                try:
                    case.result = await asyncio.wait_for(case.handle.result(), RESULT_TIMEOUT_S)
                    case.ended = await case.handle.query(CalendarReview.status)
                except WorkflowFailureError as err:
                    case.error = err
                history = await case.handle.fetch_history()
                case.task_failures = sum(
                    1
                    for e in history.events
                    if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
                )
                replayer = Replayer(
                    workflows=[CalendarReview], data_converter=pydantic_data_converter
                )
                try:
                    await replayer.replay_workflow(history)
                except Exception as err:  # noqa: BLE001 - reported by the test
                    case.replay_error = err
        yield result
    finally:
        await env.shutdown()


class CaseWorkers:
    """One worker (and task queue) per case, each with a `load_policy` fake answering the
    case's document."""

    def __init__(self, env: WorkflowEnvironment, documents: dict[str, dict | None]) -> None:
        self.env = env
        self.documents = documents
        self.workers: list[Worker] = []

    async def __aenter__(self) -> dict[str, tuple[str, Fakes]]:
        queues = {}
        for name, document in self.documents.items():
            fakes = Fakes()
            if document is not None:
                fakes.policy = PolicyDocument(
                    process_type=CalendarReview.PROCESS_TYPE, version=1, document=document
                )
            task_queue = f"tq-calendar-tasks-{name}-{uuid.uuid4()}"
            worker = Worker(
                self.env.client,
                task_queue=task_queue,
                workflows=[CalendarReview],
                activities=fakes.activities(),
            )
            await worker.__aenter__()
            self.workers.append(worker)
            queues[name] = (task_queue, fakes)
        return queues

    async def __aexit__(self, *exc: object) -> None:
        for worker in reversed(self.workers):
            await worker.__aexit__(None, None, None)


def local(text: str | None) -> datetime:
    assert text is not None
    return datetime.fromisoformat(text)


def events(case: Case) -> list[tuple[str, str, str | None, tuple[date, int, int]]]:
    """(kind, what, to_role, local wall-clock) of each SLA event: the task's or the stage's."""
    return [
        (
            e.kind,
            "task" if e.task_id else "stage",
            e.details.get("to_role"),
            wall(e.at),
        )
        for e in case.sla_events()
    ]


# ----------------------------------------------------------------------------- the policies
def test_every_case_document_is_publishable(run):
    for document in policies(run.year).values():
        if document is not None:
            ReviewPolicy.model_validate(document, context={STRICT: True})


# ----------------------------------------------------------------------------- business days
def test_two_business_days_from_friday_evening_are_due_on_tuesday_evening(run):
    opened = run.cases["business"].opened
    assert opened is not None
    [task] = opened.pending_tasks
    assert wall(task.created_at) == (run.day(10, 29), 17, 0)
    # a UTC instant, and the calendar's local form across the October change (EEST -> EET)
    assert task.due_at == datetime.fromisoformat(f"{run.year}-11-02T15:00:00+00:00")
    assert task.due_at.utcoffset() == timedelta(0)
    assert task.due_local == f"{run.year}-11-02T17:00:00+02:00"
    assert task.deadline_local == f"{run.year}-11-05T17:00:00+02:00"


def test_business_timers_fire_at_their_business_instants_not_after_elapsed_time(run):
    case = run.cases["business"]
    assert events(case) == [
        ("reminded", "task", None, (run.day(11, 1), 13, 0)),  # PT4H: Monday 09:00 + 4 h
        ("breached", "stage", None, (run.day(11, 2), 11, 0)),  # PT10H: 8 h Monday, 2 h Tuesday
        ("escalated", "task", "manager", (run.day(11, 2), 17, 0)),  # P2D, not Sunday (48 h)
        ("breached", "task", None, (run.day(11, 5), 17, 0)),  # P5D: the deadline
    ]
    escalated = [e for e in case.sla_events() if e.kind == "escalated"]
    assert escalated[0].at.astimezone(BUCHAREST).utcoffset() == timedelta(hours=2)
    assert case.result == "timed_out"
    assert case.ended is not None
    assert case.ended.decisions[0].outcome == "timed_out"
    assert wall(case.ended.decisions[0].at) == (run.day(11, 5), 17, 0)


def test_a_holiday_on_monday_moves_every_business_due_a_day(run):
    case = run.cases["monday_off"]
    assert case.opened is not None
    [task] = case.opened.pending_tasks
    assert task.due_local == f"{run.year}-11-03T17:00:00+02:00"
    assert task.deadline_local == f"{run.year}-11-08T17:00:00+02:00"
    assert events(case) == [
        ("reminded", "task", None, (run.day(11, 2), 13, 0)),
        ("breached", "stage", None, (run.day(11, 3), 11, 0)),
        ("escalated", "task", "manager", (run.day(11, 3), 17, 0)),
        ("escalated", "task", "sales-director", (run.day(11, 4), 17, 0)),  # the second level
        ("breached", "task", None, (run.day(11, 8), 17, 0)),
    ]
    assert case.result == "timed_out"


def test_elapsed_timers_with_a_calendar_keep_their_meaning_and_show_local_dues(run):
    case = run.cases["elapsed"]
    assert case.opened is not None
    [task] = case.opened.pending_tasks
    # 48 hours after Friday 17:00 EEST is Sunday 16:00 EET
    assert wall(local(task.due_local)) == (run.day(10, 31), 16, 0)
    assert local(task.due_local).utcoffset() == timedelta(hours=2)
    assert local(task.due_local) == task.due_at
    assert events(case) == [
        ("reminded", "task", None, (run.day(10, 29), 21, 0)),
        ("escalated", "task", "manager", (run.day(10, 31), 16, 0)),
        ("breached", "task", None, (run.day(11, 3), 16, 0)),
    ]


# ----------------------------------------------------------------------------- failures
def test_business_time_without_a_calendar_fails_the_workflow_not_its_task(run):
    case = run.cases["no_calendar"]
    assert isinstance(case.error, WorkflowFailureError)
    cause = case.error.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == CALENDAR_ERROR and cause.non_retryable
    assert "needs a business calendar" in cause.message
    assert case.task_failures == 0


def test_the_business_time_histories_replay(run):
    for name, case in run.cases.items():
        assert case.replay_error is None, f"{name}: {case.replay_error!r}"
