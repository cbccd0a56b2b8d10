"""The sales order's timer paths on the time-skipping server with the real activities.

test_sales_order_rules.py proves the timer rules quickly against in-memory fakes; here the same
paths (reminder after 1 day, escalation after 2, final deadline after 7, the prepaid payment
deadline) run on the real worker (`worker.build_worker`): the records database (SQLite migrated
by Alembic, seeded with the demo users, policy v1 and stock), the outbox, the mail dispatcher
delivering to an SMTP sink on loopback, the sandbox payment provider and the warehouse. Days
pass in milliseconds on the server, but the projections (local activities) and the dispatcher
work in real time, so the tests poll the database and the sink.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage

import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from api.routers.tasks import decide, inbox
from api.schemas import DecisionBody, Principal, TaskOut
from core.db import AuditEntry, LedgerEntry, Order, TaskRow, User
from core.settings import Settings
from scripts.mailsink import MailSink
from scripts.seed import seed
from tests.faults.processes import until
from worker import build_worker
from workflows.human_task import TIMED_OUT
from workflows.sales_order import (
    SalesOrderInput,
    SalesOrderWorkflow,
    Stage,
    sales_order_workflow_id,
)

from .conftest import order, start_time_skipping

WAIT_S = 30.0  # generous bound for a projection or a mail that runs in real time
CUSTOMER = "buyer@acme.example"  # the customer of conftest.order()


@pytest_asyncio.fixture(scope="module")
async def skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of this module's own: time skips only while nothing else on the
    server holds it (another file's leftovers on the shared one stalled `env.sleep`)."""
    env = await start_time_skipping()
    try:
        yield env
    finally:
        await env.shutdown()


@dataclass
class Real:
    """The real worker on a fresh task queue, its records database and its mail sink."""

    env: WorkflowEnvironment
    sessions: async_sessionmaker
    sink: MailSink
    settings: Settings
    started: list[WorkflowHandle] = field(default_factory=list)

    async def start(self, inp: SalesOrderInput) -> WorkflowHandle:
        handle = await self.env.client.start_workflow(
            SalesOrderWorkflow.run,
            inp,
            id=sales_order_workflow_id(inp.order_no),
            task_queue=self.settings.task_queue,
        )
        self.started.append(handle)
        return handle

    async def principal(self, username: str) -> Principal:
        """The demo user as the API authenticates them (roles from the users table)."""
        async with self.sessions() as session:
            user = await session.get(User, username)
        assert user is not None, username
        return Principal(
            username=user.username,
            display_name=user.display_name,
            email=user.email,
            roles=list(user.roles),
        )

    async def inbox(self, username: str, order_no: str) -> list[TaskOut]:
        """The user's inbox for one order, from the API's own handler (GET /tasks)."""
        user = await self.principal(username)
        async with self.sessions() as session:
            page = await inbox(user, session, business_key=order_no)
        return page.items

    async def task(self, task_id: str) -> TaskRow:
        async with self.sessions() as session:
            row = await session.get(TaskRow, task_id)
        assert row is not None, task_id
        return row

    async def stage(self, order_no: str) -> str | None:
        async with self.sessions() as session:
            row = await session.get(Order, order_no)
        return None if row is None else row.stage

    async def audit_actions(self, workflow_id: str) -> list[str]:
        async with self.sessions() as session:
            rows = await session.scalars(
                select(AuditEntry.action)
                .where(AuditEntry.workflow_id == workflow_id)
                .order_by(AuditEntry.id)
            )
            return list(rows)

    async def ledger(self, order_no: str) -> list[tuple[str, str]]:
        async with self.sessions() as session:
            rows = await session.execute(
                select(LedgerEntry.kind, LedgerEntry.status).where(LedgerEntry.order_no == order_no)
            )
            return [(kind, status) for kind, status in rows]

    def mails(self, subject_start: str) -> list[EmailMessage]:
        return [m for m in list(self.sink.messages) if subject(m).startswith(subject_start)]

    async def mail(self, subject_start: str) -> EmailMessage:
        """The one mail whose subject starts so, once the dispatcher delivered it."""

        async def arrived() -> bool:
            return bool(self.mails(subject_start))

        await until(arrived, WAIT_S, f"a mail {subject_start!r} at the sink")
        [message] = self.mails(subject_start)
        return message

    async def terminate_leftovers(self) -> None:
        for handle in self.started:
            if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                await handle.terminate("test ended")


def subject(message: EmailMessage) -> str:
    # a long subject is folded onto its own line ("Subject:\n Escalated: ..."), and the
    # sink's parser keeps the folding space
    return str(message["Subject"]).strip()


def recipients(message: EmailMessage) -> list[str]:
    return sorted(a.addr_spec for a in message["To"].addresses)


@pytest_asyncio.fixture
async def real(
    skipping_env: WorkflowEnvironment,
    db_url: str,
    sessions: async_sessionmaker,
    mail_sink: MailSink,
) -> AsyncIterator[Real]:
    await seed(sessions)
    settings = Settings(
        database_url=db_url, task_queue=f"tq-real-{uuid.uuid4()}", update_wait_s=WAIT_S
    )
    worker = build_worker(
        skipping_env.client,
        task_queue=settings.task_queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )
    async with worker:
        r = Real(skipping_env, sessions, mail_sink, settings)
        try:
            yield r
        finally:
            await r.terminate_leftovers()


async def first_task_in_inbox(real: Real, username: str, order_no: str) -> TaskOut:
    async def offered() -> bool:
        return bool(await real.inbox(username, order_no))

    await until(offered, WAIT_S, f"a task of order {order_no} in {username}'s inbox")
    [task] = await real.inbox(username, order_no)
    return task


async def test_reminder_then_escalation_mail_the_candidates_and_the_manager(real: Real):
    inp = order(600_000)
    h = await real.start(inp)
    task = await first_task_in_inbox(real, "victor", inp.order_no)
    assert task.candidate_roles == ["vice-president"]
    assert await real.inbox("mike", inp.order_no) == []

    await real.env.sleep(timedelta(days=1, hours=1))
    reminder = await real.mail("Reminder:")
    # every active vice-president (vera too: she holds the role; alice requested this order)
    assert recipients(reminder) == ["vera@example.com", "victor@example.com"]
    assert inp.order_no in reminder.get_content()
    assert real.mails("Escalated:") == []
    assert await real.inbox("mike", inp.order_no) == []

    await real.env.sleep(timedelta(days=1))
    escalation = await real.mail("Escalated:")
    assert recipients(escalation) == ["mike@example.com"]
    assert inp.order_no in subject(escalation)
    # the mail was queued in the projection's transaction: the inbox shows the escalation
    [escalated] = await real.inbox("mike", inp.order_no)
    assert escalated.task_id == task.task_id
    assert escalated.candidate_roles == ["vice-president", "manager"] and escalated.escalated
    assert [t.task_id for t in await real.inbox("victor", inp.order_no)] == [task.task_id]
    actions = await real.audit_actions(h.id)
    assert "reminded" in actions and "escalated" in actions

    # the manager decides through the API's handler; the real activities close the order
    mike = await real.principal("mike")
    async with real.sessions() as session:
        decided = await decide(
            task.task_id,
            DecisionBody(outcome="approved"),
            mike,
            session,
            real.env.client,
            real.settings,
        )
    assert decided.task.decided_by == "mike"
    assert (await h.result()).stage == Stage.CLOSED

    async def closed() -> bool:
        return await real.stage(inp.order_no) == Stage.CLOSED

    await until(closed, WAIT_S, f"order {inp.order_no} closed in the read model")
    assert await real.ledger(inp.order_no) == [("charge", "captured")]
    row = await real.task(task.task_id)
    assert (row.status, row.outcome, row.decided_by) == ("closed", "approved", "mike")


async def test_final_deadline_times_the_task_out_and_cancels_the_order(real: Real):
    inp = order(600_000)
    h = await real.start(inp)
    task = await first_task_in_inbox(real, "victor", inp.order_no)

    result = await h.result()  # time skips past the reminder and the escalation to day 7
    assert result.stage == Stage.CANCELLED and "not decided in time" in result.reason

    cancelled = await real.mail(f"Order {inp.order_no}: cancelled")
    assert recipients(cancelled) == [CUSTOMER]
    # the customer's mail went out with the last projection: the read model has the end
    row = await real.task(task.task_id)
    assert (row.status, row.outcome, row.decided_by) == ("closed", TIMED_OUT, "system")
    assert await real.stage(inp.order_no) == Stage.CANCELLED
    assert await real.inbox("victor", inp.order_no) == []
    assert await real.inbox("mike", inp.order_no) == []
    assert TIMED_OUT in await real.audit_actions(h.id)
    assert await real.ledger(inp.order_no) == []  # nothing was charged


async def test_prepaid_order_unpaid_by_the_payment_deadline_is_cancelled(real: Real):
    inp = order(800, variant="prepaid_entry")
    h = await real.start(inp)
    expected = await real.mail(f"Order {inp.order_no}: payment of 800.00 EUR expected")
    assert recipients(expected) == [CUSTOMER]
    [task] = await real.inbox("fiona", inp.order_no)
    assert task.kind == "payment" and task.candidate_roles == ["finance"]

    result = await h.result()  # time skips to the 14-day payment deadline
    assert result.stage == Stage.CANCELLED and "not received in time" in result.reason

    cancelled = await real.mail(f"Order {inp.order_no}: cancelled")
    assert recipients(cancelled) == [CUSTOMER]
    assert recipients(await real.mail("Reminder:")) == ["fiona@example.com"]  # after 3 days
    row = await real.task(task.task_id)
    assert (row.status, row.outcome) == ("closed", TIMED_OUT)
    assert await real.stage(inp.order_no) == Stage.CANCELLED
    assert await real.inbox("fiona", inp.order_no) == []
    assert await real.ledger(inp.order_no) == []
