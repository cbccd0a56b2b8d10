"""Business time in the sales order's approval timers, once against the real activities.

tests/workflows/test_calendar_tasks.py proves business-time task timers quickly with faked
activities; here the same path runs on the real worker (`worker.build_worker`: records SQLite
migrated by Alembic and seeded, outbox, mail dispatcher, SMTP sink, warehouse, sandbox payment
provider) on a time-skipping server of this module's own.

Two policy versions with a business calendar (Europe/Bucharest, Mon-Fri 09:00-17:00, Romanian
holidays; the second with Monday 1 November off) and business approval timers (remind PT4H,
escalate P2D to the manager, deadline P5D) are published through the API's `POST /policies`
handler. The server's clock moves to Friday 29 October 17:00 in Bucharest (the year of
test_calendar_timers.py: the clocks go back on Sunday the 31st), an order needing the
vice-president starts under each version, and the clock then steps to a few instants on either
side of each business due. At each instant the fixture records what the read model holds (the
SLA events and the outbox) and what the SMTP sink received; the tests check one case each.

The server's clock only moves forward and waits that overlap let it skip past workflow tasks
still in flight, so one module fixture runs everything, one wait at a time. While the clock is
being skipped the server holds it for every workflow task in flight (and its projection, a local
activity), so what a timer wrote is in the database once the clock is past it; the dispatcher
delivers in real time, so the sink is polled with generous bounds.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from api.routers.orders import order_status
from api.routers.policies import current_policy, publish_policy
from api.schemas import PublishPolicyBody
from core.db import OutboxMessage, PolicyVersion, SlaEvent, make_engine, make_session_factory
from core.settings import Settings
from scripts.mailsink import MailSink
from scripts.migrate import upgrade
from scripts.seed import seed
from tests.faults.processes import until
from tests.support import free_port
from tests.workflows.conftest import order, start_time_skipping
from tests.workflows.test_calendar_timers import BUCHAREST, case_year, wall
from tests.workflows.test_timers_real_activities import Real, recipients, subject
from worker import build_worker
from workflows.human_task import TIMED_OUT
from workflows.sales_order import SalesOrderResult, SalesOrderStatus, Stage

pytestmark = pytest.mark.timeout(300)  # the whole scenario runs in the first test's setup

WAIT_S = 30.0  # generous bound for a projection or a mail that runs in real time
RESULT_TIMEOUT_S = 60.0  # days pass in milliseconds on this server
CUSTOMER = "buyer@acme.example"  # the customer of tests/workflows/conftest.order()
CASES = ("plain", "monday_off")

# every instant the clock steps to, in Bucharest time of the case year: (name, (month, day,
# hour, minute), the mail due by then at the sink: (case, subject start) or None)
CHECKPOINTS: tuple[tuple[str, tuple[int, int, int, int], tuple[str, str] | None], ...] = (
    ("mon 12:55", (11, 1, 12, 55), None),  # past 48 hours (Sunday 16:00): nothing fired
    ("mon 13:05", (11, 1, 13, 5), ("plain", "Reminder:")),
    ("tue 12:55", (11, 2, 12, 55), None),
    ("tue 13:05", (11, 2, 13, 5), ("monday_off", "Reminder:")),
    ("tue 16:55", (11, 2, 16, 55), None),
    ("tue 17:05", (11, 2, 17, 5), ("plain", "Escalated:")),
    ("wed 16:55", (11, 3, 16, 55), None),
    ("wed 17:05", (11, 3, 17, 5), ("monday_off", "Escalated:")),
)


def approval_policy(default: dict, year: int, *, monday_off: bool) -> dict:
    """The seeded sales-order policy with a business calendar and business approval timers."""
    calendar: dict[str, Any] = {"timezone": "Europe/Bucharest", "holidays": {"country": "RO"}}
    if monday_off:
        calendar["extra_holidays"] = [f"{year}-11-01"]
    return {
        **default,
        "calendar": calendar,
        "approval_timers": {
            "business_time": True,
            "remind_after": "PT4H",
            "escalations": [{"after": "P2D", "to_role": "manager"}],
            "deadline": "P5D",
        },
    }


Wall = tuple[date, int, int]


@dataclass
class Seen:
    """What one instance's read model and the sink held at one instant."""

    sla: list[tuple[str, Wall]]  # (kind, local wall-clock) from sla_events
    queued: list[str]  # subjects of its mails in the outbox
    delivered: dict[str, list[EmailMessage]]  # its mails at the sink, by subject start
    manager_inbox: list[tuple[str, bool]]  # (task_id, escalated) in mike's inbox


@dataclass
class Case:
    order_no: str
    handle: WorkflowHandle
    published: int = 0  # the policy version published for it
    stored_calendar: dict | None = None  # as the policy table holds it
    due_at: datetime | None = None  # the tasks table's row
    created_at: datetime | None = None
    inbox: dict | None = None  # victor's inbox item as GET /tasks answers it (JSON)
    opened: SalesOrderStatus | None = None  # GET /orders/{no} as the task opened
    seen: dict[str, Seen] = field(default_factory=dict)
    result: SalesOrderResult | None = None
    ended_sla: list[tuple[str, Wall, str | None]] = field(default_factory=list)
    ended_task: tuple[str, str | None, str | None] | None = None
    ended_stage: str | None = None
    cancelled_to: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    year: int
    cases: dict[str, Case]

    def day(self, month: int, day: int) -> date:
        return date(self.year, month, day)


def _for(order_no: str, messages: list[EmailMessage], start: str) -> list[EmailMessage]:
    return [
        m
        for m in messages
        if subject(m).startswith(start) and order_no in subject(m) + m.get_content()
    ]


async def _arrived(real: Real, order_no: str, start: str) -> list[EmailMessage]:
    """The order's mails whose subject starts so, once at least one is at the sink (or none
    after WAIT_S: the test that expects it says so)."""
    for _ in range(int(WAIT_S / 0.1)):
        found = _for(order_no, list(real.sink.messages), start)
        if found:
            return found
        await asyncio.sleep(0.1)
    return []


async def _seen(real: Real, case: Case) -> Seen:
    wid = case.handle.id
    async with real.sessions() as session:
        sla = await session.scalars(
            select(SlaEvent).where(SlaEvent.workflow_id == wid).order_by(SlaEvent.at)
        )
        events = [(e.kind, wall(e.at)) for e in sla]
        queued = list(
            await session.scalars(
                select(OutboxMessage.subject)
                .where(OutboxMessage.workflow_id == wid)
                .order_by(OutboxMessage.id)
            )
        )
    messages = list(real.sink.messages)
    delivered = {s: _for(case.order_no, messages, s) for s in ("Reminder:", "Escalated:")}
    mike = [(t.task_id, t.escalated) for t in await real.inbox("mike", case.order_no)]
    return Seen(events, queued, delivered, mike)


async def _open(real: Real, case: Case, alice_status) -> None:
    """Wait for the order's task in victor's inbox and record it as the API shows it."""

    async def offered() -> bool:
        return bool(await real.inbox("victor", case.order_no))

    await until(offered, WAIT_S, f"the task of order {case.order_no} in victor's inbox")
    [task] = await real.inbox("victor", case.order_no)
    case.inbox = task.model_dump(mode="json")  # as GET /tasks answers it
    row = await real.task(task.task_id)
    case.due_at, case.created_at = row.due_at, row.created_at
    case.opened = await alice_status(case.order_no)


async def _publish(real: Real, document: dict, note: str) -> tuple[int, dict | None]:
    ada = await real.principal("ada")
    async with real.sessions() as session:
        published = await publish_policy(
            "sales_order", PublishPolicyBody(document=document, note=note), ada, session
        )
    async with real.sessions() as session:
        row = await session.scalar(
            select(PolicyVersion).where(
                PolicyVersion.process_type == "sales_order",
                PolicyVersion.version == published.version,
            )
        )
    assert row is not None
    return published.version, row.document.get("calendar")


async def _sleep_until(env: WorkflowEnvironment, at: datetime) -> None:
    await env.sleep(at - await env.get_current_time())


@pytest_asyncio.fixture(scope="module")
async def run(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Run]:
    base: Path = tmp_path_factory.mktemp("business-time")
    url = f"sqlite+aiosqlite:///{base / 'procflow.db'}"
    await asyncio.to_thread(upgrade, url)  # alembic's env.py runs its own event loop
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    sink = MailSink("127.0.0.1", free_port(), base / "mail")
    sink.start()
    env = await start_time_skipping()
    try:
        await seed(sessions)
        settings = Settings(
            database_url=url, task_queue=f"tq-business-{uuid.uuid4()}", update_wait_s=WAIT_S
        )
        worker = build_worker(
            env.client,
            task_queue=settings.task_queue,
            session_factory=sessions,
            sender=SmtpSender(sink.host, sink.port, 10, "procflow@localhost"),
            provider=SandboxPaymentProvider(sessions),
        )
        async with worker:
            real = Real(env, sessions, sink, settings)
            try:
                yield await _scenario(real)
            finally:
                await real.terminate_leftovers()
    finally:
        await env.shutdown()
        sink.stop()
        await engine.dispose()


async def _scenario(real: Real) -> Run:
    env = real.env
    alice = await real.principal("alice")

    async def alice_status(order_no: str) -> SalesOrderStatus:
        async with real.sessions() as session:
            status = await order_status(order_no, alice, env.client, session, real.settings)
        assert isinstance(status, SalesOrderStatus)
        return status

    async with real.sessions() as session:
        default = (await current_policy("sales_order", alice, session)).document
    now = await env.get_current_time()
    year = case_year(now)
    # Friday 17:00 in Bucharest, 14:00 UTC, before the change
    await _sleep_until(env, datetime(year, 10, 29, 17, 0, tzinfo=BUCHAREST))
    cases: dict[str, Case] = {}
    for name in CASES:  # each order loads the version published just before it
        version, stored = await _publish(
            real,
            approval_policy(default, year, monday_off=name == "monday_off"),
            f"business time ({name})",
        )
        inp = order(600_000)  # the vice-president's approval
        case = Case(inp.order_no, await real.start(inp), version, stored)
        await _open(real, case, alice_status)
        cases[name] = case

    for label, (month, day, hour, minute), expected in CHECKPOINTS:
        await _sleep_until(env, datetime(year, month, day, hour, minute, tzinfo=BUCHAREST))
        if expected is not None:
            name, start = expected
            await _arrived(real, cases[name].order_no, start)
        for case in cases.values():
            case.seen[label] = await _seen(real, case)

    for case in cases.values():  # one result at a time: to the deadline
        case.result = await asyncio.wait_for(case.handle.result(), RESULT_TIMEOUT_S)
        cancelled = await _arrived(real, case.order_no, f"Order {case.order_no}: cancelled")
        case.cancelled_to = recipients(cancelled[0]) if cancelled else []
        async with real.sessions() as session:
            sla = await session.scalars(
                select(SlaEvent).where(SlaEvent.workflow_id == case.handle.id).order_by(SlaEvent.at)
            )
            case.ended_sla = [(e.kind, wall(e.at), e.details.get("to_role")) for e in sla]
        assert case.opened is not None
        row = await real.task(case.opened.pending_tasks[0].task_id)
        case.ended_task = (row.status, row.outcome, row.decided_by)
        case.ended_stage = await real.stage(case.order_no)
    return Run(year, cases)


# ----------------------------------------------------------------------------- the policies
def test_each_order_starts_with_the_business_policy_published_just_before_it(run):
    plain, monday_off = run.cases["plain"], run.cases["monday_off"]
    assert (plain.published, monday_off.published) == (2, 3)  # after the seed's version 1
    for case in (plain, monday_off):
        assert case.opened is not None
        assert case.opened.policy_version == case.published
        assert case.stored_calendar is not None
        assert case.stored_calendar["timezone"] == "Europe/Bucharest"
    assert plain.stored_calendar is not None and plain.stored_calendar["extra_holidays"] == []
    assert monday_off.stored_calendar is not None
    assert monday_off.stored_calendar["extra_holidays"] == [f"{run.year}-11-01"]


# ----------------------------------------------------------------------------- the due
def test_the_task_opens_on_friday_evening_due_tuesday_evening_in_the_tasks_table(run):
    case = run.cases["plain"]
    assert case.created_at is not None
    assert wall(case.created_at) == (run.day(10, 29), 17, 0)
    assert case.created_at.astimezone(BUCHAREST).utcoffset() == timedelta(hours=3)
    # P2D of business time: Tuesday 17:00 EET (the clocks went back), not Sunday (48 h)
    assert case.due_at == datetime(run.year, 11, 2, 15, 0, tzinfo=UTC)


def test_the_order_status_shows_the_due_and_deadline_in_bucharest_time(run):
    assert run.cases["plain"].opened is not None
    [task] = run.cases["plain"].opened.pending_tasks
    assert task.candidate_roles == ["vice-president"]
    assert task.due_local == f"{run.year}-11-02T17:00:00+02:00"
    assert task.deadline_local == f"{run.year}-11-05T17:00:00+02:00"  # P5D: Friday
    assert task.due_at == run.cases["plain"].due_at


def test_the_inbox_shows_the_due_in_iso_8601_with_an_offset(run):
    for name, due in (("plain", (11, 2)), ("monday_off", (11, 3))):
        item = run.cases[name].inbox
        assert item is not None
        shown = datetime.fromisoformat(item["due_at"])
        assert shown.utcoffset() is not None, item["due_at"]
        assert shown == datetime(run.year, *due, 15, 0, tzinfo=UTC)


# ----------------------------------------------------------------------------- the timers
def test_nothing_fires_after_48_hours_or_before_monday_at_one(run):
    for case in run.cases.values():
        seen = case.seen["mon 12:55"]
        assert seen.sla == []
        assert not [s for s in seen.queued if s.startswith(("Reminder:", "Escalated:"))]
        assert seen.delivered == {"Reminder:": [], "Escalated:": []}
        assert seen.manager_inbox == []


def test_the_reminder_mails_the_vice_presidents_on_monday_at_one(run):
    seen = run.cases["plain"].seen["mon 13:05"]
    assert seen.sla == [("reminded", (run.day(11, 1), 13, 0))]  # Monday 09:00 + 4 h
    [reminder] = seen.delivered["Reminder:"]
    # every active vice-president (vera too: she holds the role; alice requested this order)
    assert recipients(reminder) == ["vera@example.com", "victor@example.com"]
    assert seen.delivered["Escalated:"] == []


def test_the_escalation_mails_the_manager_on_tuesday_at_five_not_after_48_hours(run):
    case = run.cases["plain"]
    before = case.seen["tue 16:55"]
    assert [kind for kind, _ in before.sla] == ["reminded"]
    assert not [s for s in before.queued if s.startswith("Escalated:")]
    assert before.manager_inbox == []

    after = case.seen["tue 17:05"]
    assert after.sla == [
        ("reminded", (run.day(11, 1), 13, 0)),
        ("escalated", (run.day(11, 2), 17, 0)),
    ]
    [escalation] = after.delivered["Escalated:"]
    assert recipients(escalation) == ["mike@example.com"]
    assert case.order_no in subject(escalation)
    assert case.opened is not None
    assert after.manager_inbox == [(case.opened.pending_tasks[0].task_id, True)]


def test_the_deadline_times_the_task_out_on_the_fifth_business_day(run):
    case = run.cases["plain"]
    assert case.result is not None
    assert case.result.stage == Stage.CANCELLED and "not decided in time" in case.result.reason
    assert case.ended_sla == [
        ("reminded", (run.day(11, 1), 13, 0), None),
        ("escalated", (run.day(11, 2), 17, 0), "manager"),
        ("breached", (run.day(11, 5), 17, 0), None),  # Friday 17:00, P5D
    ]
    assert case.ended_task == ("closed", TIMED_OUT, "system")
    assert case.ended_stage == Stage.CANCELLED
    assert case.cancelled_to == [CUSTOMER]


# ----------------------------------------------------------------------------- a holiday
def test_a_holiday_on_monday_moves_the_due_to_wednesday(run):
    case = run.cases["monday_off"]
    assert case.due_at == datetime(run.year, 11, 3, 15, 0, tzinfo=UTC)
    assert case.opened is not None
    [task] = case.opened.pending_tasks
    assert task.due_local == f"{run.year}-11-03T17:00:00+02:00"
    assert task.deadline_local == f"{run.year}-11-08T17:00:00+02:00"  # Monday, P5D


def test_a_holiday_on_monday_moves_the_reminder_and_the_escalation_a_day(run):
    case = run.cases["monday_off"]
    for label in ("mon 13:05", "tue 12:55"):
        assert case.seen[label].sla == [], label
        assert case.seen[label].delivered["Reminder:"] == [], label
    reminded = case.seen["tue 13:05"]
    assert reminded.sla == [("reminded", (run.day(11, 2), 13, 0))]
    [reminder] = reminded.delivered["Reminder:"]
    assert recipients(reminder) == ["vera@example.com", "victor@example.com"]

    for label in ("tue 17:05", "wed 16:55"):
        assert [kind for kind, _ in case.seen[label].sla] == ["reminded"], label
        assert case.seen[label].delivered["Escalated:"] == [], label
        assert case.seen[label].manager_inbox == [], label
    escalated = case.seen["wed 17:05"]
    assert escalated.sla[-1] == ("escalated", (run.day(11, 3), 17, 0))
    [escalation] = escalated.delivered["Escalated:"]
    assert recipients(escalation) == ["mike@example.com"]


def test_a_holiday_on_monday_moves_the_deadline_to_the_next_monday(run):
    case = run.cases["monday_off"]
    assert case.result is not None and case.result.stage == Stage.CANCELLED
    assert case.ended_sla == [
        ("reminded", (run.day(11, 2), 13, 0), None),
        ("escalated", (run.day(11, 3), 17, 0), "manager"),
        ("breached", (run.day(11, 8), 17, 0), None),
    ]
    assert case.ended_task == ("closed", TIMED_OUT, "system")
    assert case.ended_stage == Stage.CANCELLED
    assert case.cancelled_to == [CUSTOMER]
