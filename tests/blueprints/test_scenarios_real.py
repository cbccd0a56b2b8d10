"""The blueprint scenarios that let time pass (`advance`, `advance_until`: the SLA breach and its
escalation, the feedback timeout, the meeting's wait and its deadline), run again against the
real activities.

tests/blueprints/test_scenarios.py runs every scenario against the fakes of conftest.py; here
each timed one runs on a time-skipping server of this module's own with the real worker
(`worker.build_worker`, as tests/workflows/test_timers_real_activities.py runs the sales
order): the records database (SQLite migrated by Alembic and seeded with the demo users), the
projections, the catalog's activities (activities/blueprint_calls.py), the outbox and the mail
dispatcher delivering to an SMTP sink on loopback. The runner is the same
(tests/blueprints/scenarios.py); its `mails` and `calls` expectations are read from the
database (`DatabaseObserver`). Once a scenario held, the database must show it too: the
instance's read-model row, one stage visit per stage it went through (its timers firing at
the skipped times), its catalog calls, its SLA events and escalations, and every mail it
queued delivered to the sink (the SLA breach's to the service manager among them).

No timed scenario expects `calls`; `onboarded_with_the_first_plan` runs here as well, so that
the runner's `calls` expectations are read from both rows a call writes (an outbox mail and
an audit note) at least once.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from email.message import EmailMessage
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.testing import WorkflowEnvironment

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from core.db import (
    AuditEntry,
    OutboxMessage,
    ProcessInstance,
    SlaEvent,
    StageVisit,
    TaskCandidate,
    TaskRow,
    make_engine,
    make_session_factory,
)
from scripts.mailsink import MailSink
from tests.blueprints import scenarios
from tests.blueprints.conftest import SEEDS
from tests.faults.processes import until
from tests.support import seed_database
from tests.workflows.conftest import start_time_skipping
from worker import build_worker
from workflows.blueprint.interpreter import BlueprintStatus
from workflows.human_task import TIMED_OUT, WITHDRAWN

WAIT_S = 30.0  # a bound for what runs in real time: the mail dispatcher
SLACK = timedelta(seconds=5)  # real time passing on the server between two steps

LOADED = {p.name: scenarios.load(p) for p in sorted(SEEDS.glob("*.scenarios.yml"))}
TIMED = [
    (file, s.name)
    for file, loaded in LOADED.items()
    for s in loaded.spec.scenarios
    if s.passes_time
]
# an untimed scenario too, whose `calls` expectations read both kinds of row a catalog call
# writes (an outbox mail, an audit note): no timed scenario expects calls
CALLS_TOO = [("onboarding.scenarios.yml", "onboarded_with_the_first_plan")]
CASES = TIMED + CALLS_TOO

# the stages each scenario run here goes through, in order (its stage visits), and the catalog
# calls its instance made (as the database shows them); a timed scenario added to a file needs
# its entries here (test_every_timed_scenario_runs_here)
PATHS: dict[tuple[str, str], list[str]] = {
    ("complaint.scenarios.yml", "feedback_times_out"): [
        "acknowledge",
        "record",
        "resolve",
        "notify",
        "feedback",
        "closed",
    ],
    ("complaint.scenarios.yml", "resolution_sla_breached"): [
        "acknowledge",
        "record",
        "resolve",
        "notify",
        "feedback",
    ],
    ("onboarding.scenarios.yml", "meeting_missed_its_deadline"): ["meeting", "withdrawn"],
    ("onboarding.scenarios.yml", "meeting_waits_for_its_time"): [
        "meeting",
        "assessment",
        "cancelled",
    ],
    ("onboarding.scenarios.yml", "onboarded_with_the_first_plan"): [
        "meeting",
        "assessment",
        "kpis",
        "planning",
        "client_review",
        "kickoff",
        "onboarded",
    ],
}
COMPLAINT_CALLS = ["notify_customer:complaint_acknowledged", "notify_customer:complaint_status"]
CALLS: dict[tuple[str, str], list[str]] = {
    ("complaint.scenarios.yml", "feedback_times_out"): COMPLAINT_CALLS,
    ("complaint.scenarios.yml", "resolution_sla_breached"): COMPLAINT_CALLS,
    ("onboarding.scenarios.yml", "meeting_missed_its_deadline"): [],
    ("onboarding.scenarios.yml", "meeting_waits_for_its_time"): [],
    ("onboarding.scenarios.yml", "onboarded_with_the_first_plan"): [
        "notify_customer:onboarding_plan_proposed",
        "record_note",
    ],
}


@pytest_asyncio.fixture(scope="module")
async def skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of this module's own: the instants the scenarios skip to move
    no other test's clock."""
    env = await start_time_skipping()
    try:
        yield env
    finally:
        await env.shutdown()


@dataclass
class Real:
    """The real worker on a fresh task queue, its records database and its mail sink."""

    worker: scenarios.ScenarioWorker
    sessions: async_sessionmaker
    sink: MailSink


@pytest_asyncio.fixture
async def real(
    skipping_env: WorkflowEnvironment, db_url: str, mail_sink: MailSink
) -> AsyncIterator[Real]:
    engine = make_engine(await seed_database(db_url))
    sessions = make_session_factory(engine)
    task_queue = f"bp-real-{uuid.uuid4()}"
    worker = build_worker(
        skipping_env.client,
        task_queue=task_queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )
    try:
        async with worker:
            observer = scenarios.DatabaseObserver(sessions)
            yield Real(
                scenarios.ScenarioWorker(skipping_env, task_queue, observer), sessions, mail_sink
            )
    finally:
        await engine.dispose()


# ----------------------------------------------------------------------------- the database
@dataclass
class Found:
    """What the database holds of one instance."""

    instance: ProcessInstance | None
    visits: list[StageVisit]
    sla_events: list[SlaEvent]
    tasks: list[TaskRow]
    candidates: dict[str, list[str]]  # task id -> its candidate roles (task_candidates)
    audit: list[AuditEntry]
    outbox: list[OutboxMessage]

    def task(self, name: str) -> TaskRow:
        found = [t for t in self.tasks if t.name == name]
        assert len(found) == 1, (name, [t.name for t in self.tasks])
        return found[0]

    def audited(self, action: str) -> list[str]:
        return [a.comment for a in self.audit if a.action == action]


async def found(sessions: async_sessionmaker, workflow_id: str) -> Found:
    async with sessions() as session:

        async def rows(model, order):
            listed = await session.scalars(
                select(model).where(model.workflow_id == workflow_id).order_by(order)
            )
            return list(listed)

        tasks = await rows(TaskRow, TaskRow.created_at)
        candidates: dict[str, list[str]] = {t.task_id: [] for t in tasks}
        for row in await session.scalars(
            select(TaskCandidate).where(TaskCandidate.task_id.in_(list(candidates)))
        ):
            candidates[row.task_id].append(row.role)
        return Found(
            instance=await session.get(ProcessInstance, workflow_id),
            visits=await rows(StageVisit, StageVisit.seq),
            sla_events=await rows(SlaEvent, SlaEvent.at),
            tasks=tasks,
            candidates=candidates,
            audit=await rows(AuditEntry, AuditEntry.id),
            outbox=await rows(OutboxMessage, OutboxMessage.id),
        )


def subject(message: EmailMessage) -> str:
    # a long subject is folded onto its own line; the sink's parser keeps the folding
    return " ".join(str(message["Subject"]).split())


def recipients(message: EmailMessage) -> list[str]:
    return sorted(a.addr_spec for a in message["To"].addresses)


def about(at: datetime, since: datetime, expected: timedelta) -> bool:
    """`at` is `expected` after `since`: a timer's span, started a moment after `since` (what
    a step did before it started, in real time, which also passes on the server)."""
    return expected <= at - since < expected + SLACK


# ----------------------------------------------------------------------------- the checks
def check_instance(loaded: scenarios.Loaded, name: str, status: BlueprintStatus, f: Found) -> None:
    """The read-model row and the stage visits, against the scenario and the last status."""
    scenario = loaded.scenario(name)
    row = f.instance
    assert row is not None, f"no process_instances row for {status.workflow_id}"
    if scenario.end is None:
        stage, state = status.stage, "running"
    else:
        stage = scenario.end.stage
        state = "cancelled" if stage == "cancelled" else "completed"
    got = (
        row.process_type,
        row.business_key,
        row.requester,
        row.definition_kind,
        row.definition_version,
        row.stage,
        row.status,
        row.owner_role,
    )
    assert got == (
        loaded.process,
        status.business_key,
        scenario.requester,
        "blueprint",
        loaded.ptype.version,
        stage,
        state,
        loaded.blueprint.owner_role,
    )
    assert (row.closed_at is None) == (state == "running")

    path = PATHS[(loaded.path.name, name)]
    assert [v.stage for v in f.visits] == path
    assert [v.seq for v in f.visits] == list(range(1, len(path) + 1))
    # what the workflow reports: its stage entries and its visits per stage
    assert [(e.stage, e.at) for e in status.stages] == [(v.stage, v.entered_at) for v in f.visits]
    # (the engine counts the blueprint's stages: not the kernel's, where a cancel ends it)
    engine_visits = [v.stage for v in f.visits if v.stage not in scenarios.KERNEL_STAGES]
    assert Counter(engine_visits) == Counter({k: n for k, n in status.visits.items() if n})
    for left, entered in zip(f.visits, f.visits[1:], strict=False):
        assert left.left_at == entered.entered_at, (left.stage, left.left_at, entered.entered_at)
    assert f.visits[-1].left_at is None
    assert row.started_at == f.visits[0].entered_at
    assert row.stage_entered_at == f.visits[-1].entered_at


async def check_delivered(real: Real, f: Found, workflow_id: str) -> None:
    """Every mail the instance queued is sent, and each with recipients is at the sink."""

    async def all_sent() -> bool:
        async with real.sessions() as session:
            states = await session.scalars(
                select(OutboxMessage.status).where(OutboxMessage.workflow_id == workflow_id)
            )
            return all(s == "sent" for s in states)

    await until(all_sent, WAIT_S, f"every mail of {workflow_id} sent")
    assert f.outbox, "no mail queued"
    delivered = [(subject(m), recipients(m)) for m in list(real.sink.messages)]
    for row in f.outbox:
        if row.recipients:
            assert (row.subject, sorted(row.recipients)) in delivered, (row.subject, delivered)


def _within_business_hours(at: datetime) -> bool:
    """Mon-Fri 09:00-17:00 in Bucharest (the complaint blueprint's calendar)."""
    local = at.astimezone(ZoneInfo("Europe/Bucharest"))
    opens, closes = (datetime.combine(local.date(), time(h), local.tzinfo) for h in (9, 17))
    return local.weekday() < 5 and opens <= local <= closes + SLACK  # (fired a moment late)


def sla_breached(f: Found, status: BlueprintStatus) -> None:
    """Two business days after receipt the SLA `resolution` is breached: the open task is
    escalated to the service manager (who may act on it and is mailed); before that, the
    task's own timers reminded its candidates and escalated it to the support lead."""
    assert f.instance is not None
    started = f.instance.started_at
    resolve = f.task("Resolve the complaint")
    events = [(e.kind, e.sla, e.task_id) for e in f.sla_events]
    assert ("breached", "resolution", None) in events, events
    assert ("reminded", resolve.name, resolve.task_id) in events, events
    assert ("escalated", resolve.name, resolve.task_id) in events, events
    [breach] = [e for e in f.sla_events if e.kind == "breached"]
    # two business days: at least 16 business hours, at most the 7 days the scenario skipped
    assert timedelta(hours=16) <= breach.at - started <= timedelta(days=7)
    assert _within_business_hours(breach.at), breach.at
    [escalated] = [e for e in f.sla_events if e.kind == "escalated"]
    assert escalated.details.get("to_role") == "support-lead", escalated.details
    assert escalated.at < breach.at

    assert sorted(f.audited("escalated")) == [
        "Resolve the complaint to service-manager",
        "Resolve the complaint to support-lead",
    ]
    assert "resolution" in f.audited("sla_breached")
    # the manager decided the escalated task; the read model kept who might have
    assert sorted(resolve.candidate_roles) == ["service-manager", "support", "support-lead"]
    assert sorted(f.candidates[resolve.task_id]) == sorted(resolve.candidate_roles)
    assert resolve.escalated
    assert (resolve.status, resolve.outcome, resolve.decided_by) == ("closed", "resolved", "max")
    breach_mail = [
        m
        for m in f.outbox
        if m.subject == f"Customer complaint {status.business_key}: SLA resolution breached"
    ]
    assert [m.recipients for m in breach_mail] == [["marco@example.com"]]  # the service manager
    escalation_mail = [m for m in f.outbox if m.subject.startswith("Escalated: Resolve the")]
    assert [m.recipients for m in escalation_mail] == [["lea@example.com"]]  # the support lead


def feedback_timed_out(f: Found, status: BlueprintStatus) -> None:
    """No answer to the survey: the feedback wait's 14 days end it."""
    feedback, closed = f.visits[-2], f.visits[-1]
    assert about(closed.entered_at, feedback.entered_at, timedelta(days=14))
    assert not [e for e in f.sla_events if e.kind == "breached"]  # resolved in time
    assert all(t.status == "closed" for t in f.tasks)


def meeting_deadline(f: Found, status: BlueprintStatus) -> None:
    """The meeting task (open at once: its time is past) times out after its 7-day deadline,
    which withdraws the onboarding; its 4-hour reminder went out before."""
    [meeting] = f.tasks
    assert (meeting.status, meeting.outcome, meeting.decided_by) == ("closed", TIMED_OUT, "system")
    events = [(e.kind, e.task_id, e.details.get("deadline")) for e in f.sla_events]
    assert events == [("reminded", meeting.task_id, None), ("breached", meeting.task_id, True)]
    assert about(f.sla_events[0].at, meeting.created_at, timedelta(hours=4))
    assert about(f.sla_events[1].at, meeting.created_at, timedelta(days=7))
    withdrawn = f.visits[-1]
    assert withdrawn.entered_at == f.sla_events[1].at
    assert f.visits[0].outcome == TIMED_OUT and f.visits[0].by == "system"


def meeting_waited(f: Found, status: BlueprintStatus) -> None:
    """The meeting task opened only at the meeting's time (2035-01-08 10:00 UTC)."""
    meeting_at = datetime.fromisoformat("2035-01-08T10:00:00+00:00")
    meeting = f.tasks[0]
    assert meeting.created_at >= meeting_at > f.visits[0].entered_at
    assert about(meeting.created_at, meeting_at, timedelta(0))
    assert (meeting.status, meeting.outcome) == ("closed", "held")
    # the director's cancel withdrew the two open assessment tasks
    assessment = [(t.status, t.outcome, t.decided_by) for t in f.tasks[1:]]
    assert assessment == [("closed", WITHDRAWN, "system")] * 2, assessment
    assert f.visits[-1].stage == "cancelled" and f.visits[-2].by == "dora"


def onboarded(f: Found, status: BlueprintStatus) -> None:
    """The plan's note is in the audit log, the plan's mail went to the client."""
    [note] = [a for a in f.audit if a.action == "note"]
    assert note.actor == "system" and note.comment
    [plan] = [m for m in f.outbox if m.subject.endswith(": your action plan")]
    assert plan.recipients == ["owner@bluefin.example"]
    assert not f.sla_events


CHECKS: dict[str, Callable[[Found, BlueprintStatus], None]] = {
    "resolution_sla_breached": sla_breached,
    "feedback_times_out": feedback_timed_out,
    "meeting_missed_its_deadline": meeting_deadline,
    "meeting_waits_for_its_time": meeting_waited,
    "onboarded_with_the_first_plan": onboarded,
}


def test_every_timed_scenario_runs_here() -> None:
    assert TIMED, "no scenario lets time pass"
    for table in (PATHS, CALLS):
        assert sorted(table) == sorted(CASES), "a timed scenario needs its stage path and calls"
    assert sorted(CHECKS) == sorted(name for _, name in CASES)


@pytest.mark.parametrize(("file", "name"), CASES, ids=[f"{f}::{n}" for f, n in CASES])
async def test_scenario_with_the_real_activities(real: Real, file: str, name: str) -> None:
    loaded = LOADED[file]

    async def inspect(outcome: scenarios.Outcome) -> None:
        f = await found(real.sessions, outcome.workflow_id)
        check_instance(loaded, name, outcome.status, f)
        assert outcome.observed is not None
        assert await outcome.observed.calls() == CALLS[(file, name)]
        assert await outcome.observed.mails() == [m.subject for m in f.outbox]
        CHECKS[name](f, outcome.status)
        await check_delivered(real, f, outcome.workflow_id)

    await scenarios.run(real.worker, loaded, name, inspect=inspect)
