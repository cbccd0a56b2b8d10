"""Mail delivery against a strict relay: a refused mail fails alone and the rest of its batch
goes out; permanent refusals give up after PROCFLOW_MAIL_MAX_ATTEMPTS (status failed, audited),
transient ones after their own, larger cap; internationalized addresses go out as punycode to a
server without SMTPUTF8 and as they are to one with it (SQLite and PostgreSQL)."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.testing import ActivityEnvironment

from activities.mail import SmtpSender
from activities.models import Notification, ProjectionBatch
from activities.notifications import MailDispatcher
from activities.records import RecordActivities
from core.db import AuditEntry, OutboxMessage, utcnow
from tests.support import free_port

NO_SUCH_USER = "550 5.1.1 no such user"
WORKFLOW_ID = "sales-order-SO-8"


class StrictRelay:
    """An aiosmtpd server that, like a strict relay, refuses recipients it does not know.

    `refuse`: RCPT answered 550 5.1.1; `busy`: 450 4.2.1; `closing`: 421 (the client then
    closes the session); `drop`: the connection is cut at that RCPT; `reject_subjects`: DATA
    answered 554. `utf8`: whether the server offers SMTPUTF8."""

    def __init__(self, *, utf8: bool = False, **rules: set[str]) -> None:
        self.utf8 = utf8
        self.refuse = rules.pop("refuse", set())
        self.busy = rules.pop("busy", set())
        self.closing = rules.pop("closing", set())
        self.drop = rules.pop("drop", set())
        self.reject_subjects = rules.pop("reject_subjects", set())
        assert not rules, rules
        self.received: list[tuple[str, list[str], EmailMessage]] = []
        self.host, self.port = "127.0.0.1", free_port()
        self._controller = Controller(
            self, hostname=self.host, port=self.port, enable_SMTPUTF8=utf8
        )

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if address in self.refuse:
            return NO_SUCH_USER
        if address in self.busy:
            return "450 4.2.1 mailbox busy, try again later"
        if address in self.closing:
            return "421 4.3.2 service shutting down"
        if address in self.drop:
            assert server.transport is not None
            server.transport.close()
            return "250 2.1.5 never read"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        if message["Subject"] in self.reject_subjects:
            return "554 5.6.0 content rejected"
        self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos), message))  # type: ignore[arg-type]
        return "250 2.0.0 queued"

    @property
    def subjects(self) -> list[str]:
        return sorted(m["Subject"] for _, _, m in self.received)

    def sender(self) -> SmtpSender:
        return SmtpSender(self.host, self.port, timeout=5, mail_from="procflow@localhost")


@pytest.fixture
def relay() -> Iterator[type[StrictRelay]]:
    """Starts StrictRelay(...) servers on loopback; all stopped after the test."""
    started: list[StrictRelay] = []

    def start(**kw) -> StrictRelay:
        server = StrictRelay(**kw)
        server._controller.start()
        started.append(server)
        return server

    try:
        yield start  # type: ignore[misc]
    finally:
        for server in started:
            server._controller.stop()


def _mail(n: int, *to: str) -> Notification:
    return Notification(
        idempotency_key=f"{WORKFLOW_ID}:mail:{n}",
        workflow_id=WORKFLOW_ID,
        subject=f"mail {n}",
        body=f"body {n}",
        to_emails=list(to) or ["buyer@example.com"],
    )


async def _queue(sessions, activity_env: ActivityEnvironment, *mails: Notification) -> None:
    await activity_env.run(RecordActivities(sessions).project, ProjectionBatch(mails=list(mails)))


async def _rows(sessions) -> dict[str, OutboxMessage]:
    async with sessions() as session:
        rows = (await session.execute(select(OutboxMessage).order_by(OutboxMessage.id))).scalars()
        return {r.subject: r for r in rows}


async def _audit(sessions) -> list[AuditEntry]:
    async with sessions() as session:
        query = select(AuditEntry).where(AuditEntry.action == "mail_failed")
        return list((await session.execute(query.order_by(AuditEntry.id))).scalars())


async def _make_due(sessions: async_sessionmaker) -> None:
    """The backoff has passed."""
    async with sessions.begin() as session:
        await session.execute(update(OutboxMessage).values(next_attempt_at=utcnow()))


async def test_a_refused_recipient_fails_alone_and_the_rest_of_the_batch_is_sent(
    sessions, activity_env, relay
):
    server = relay(refuse={"nobody@example.com"})
    await _queue(sessions, activity_env, _mail(1), _mail(2, "nobody@example.com"), _mail(3))
    dispatcher = MailDispatcher(sessions, server.sender())
    assert await dispatcher.deliver_due() == 3
    assert server.subjects == ["mail 1", "mail 3"]
    rows = await _rows(sessions)
    assert [(r.status, r.attempts) for r in rows.values()] == [
        ("sent", 0),
        ("pending", 1),
        ("sent", 0),
    ]
    assert NO_SUCH_USER in (rows["mail 2"].last_error or "")
    retry_at = rows["mail 2"].next_attempt_at
    assert retry_at is not None and retry_at > utcnow() and rows["mail 2"].lease_until is None
    assert await dispatcher.deliver_due() == 0  # backing off, and nothing else is due


async def test_a_permanently_refused_mail_gives_up_after_max_attempts_and_is_audited(
    sessions, activity_env, relay
):
    server = relay(refuse={"nobody@example.com"})
    await _queue(sessions, activity_env, _mail(1, "nobody@example.com"))
    dispatcher = MailDispatcher(sessions, server.sender(), max_attempts=3)
    for attempt in (1, 2):
        assert await dispatcher.deliver_due() == 1
        row = (await _rows(sessions))["mail 1"]
        assert (row.status, row.attempts) == ("pending", attempt)
        await _make_due(sessions)
    assert await dispatcher.deliver_due() == 1
    row = (await _rows(sessions))["mail 1"]
    assert (row.status, row.attempts) == ("failed", 3)
    assert row.next_attempt_at is None and row.lease_until is None and row.sent_at is None
    assert NO_SUCH_USER in (row.last_error or "")
    [entry] = await _audit(sessions)
    assert (entry.actor, entry.workflow_id, entry.event_key, entry.task_id) == (
        "system",
        WORKFLOW_ID,
        f"mail-failed:{row.id}",
        None,
    )
    assert NO_SUCH_USER in entry.comment
    assert entry.details["recipients"] == ["nobody@example.com"]
    assert entry.details["attempts"] == 3 and entry.details["permanent"] is True
    await _make_due(sessions)
    assert await dispatcher.deliver_due() == 0  # failed rows are never claimed again
    assert server.received == [] and dispatcher.given_up == 1


async def test_content_refused_with_5xx_gives_up_while_the_rest_is_sent(
    sessions, activity_env, relay
):
    server = relay(reject_subjects={"mail 1"})
    await _queue(sessions, activity_env, _mail(1), _mail(2))
    dispatcher = MailDispatcher(sessions, server.sender(), max_attempts=1)
    assert await dispatcher.deliver_due() == 2
    assert server.subjects == ["mail 2"]
    rows = await _rows(sessions)
    assert (rows["mail 1"].status, rows["mail 2"].status) == ("failed", "sent")
    assert "554 5.6.0 content rejected" in (rows["mail 1"].last_error or "")
    assert [e.event_key for e in await _audit(sessions)] == [f"mail-failed:{rows['mail 1'].id}"]


async def test_a_transient_refusal_retries_past_max_attempts_up_to_its_own_cap(
    sessions, activity_env, relay
):
    server = relay(busy={"later@example.com"})
    await _queue(sessions, activity_env, _mail(1, "later@example.com"))
    dispatcher = MailDispatcher(
        sessions, server.sender(), first_backoff_s=10, max_attempts=2, max_transient_attempts=4
    )
    for attempt in (1, 2, 3):
        before = utcnow()
        assert await dispatcher.deliver_due() == 1
        row = (await _rows(sessions))["mail 1"]
        assert (row.status, row.attempts) == ("pending", attempt)
        assert row.next_attempt_at is not None
        assert round((row.next_attempt_at - before).total_seconds()) == 10 * 2 ** (attempt - 1)
        await _make_due(sessions)
    assert await dispatcher.deliver_due() == 1
    row = (await _rows(sessions))["mail 1"]
    assert (row.status, row.attempts) == ("failed", 4)
    assert "450 4.2.1" in (row.last_error or "")
    [entry] = await _audit(sessions)
    assert entry.details["permanent"] is False


async def test_a_transiently_refused_mail_is_sent_once_the_mailbox_takes_it(
    sessions, activity_env, relay
):
    server = relay(busy={"later@example.com"})
    await _queue(sessions, activity_env, _mail(1, "later@example.com"), _mail(2))
    dispatcher = MailDispatcher(sessions, server.sender(), max_attempts=1)
    assert await dispatcher.deliver_due() == 2
    rows = await _rows(sessions)
    assert [(r.status, r.attempts) for r in rows.values()] == [("pending", 1), ("sent", 0)]
    server.busy.clear()
    await _make_due(sessions)
    assert await dispatcher.deliver_due() == 1
    assert server.subjects == ["mail 1", "mail 2"]
    assert (await _rows(sessions))["mail 1"].status == "sent"
    assert await _audit(sessions) == []


async def test_an_smtp_server_that_stays_away_gives_up_after_the_transient_cap(
    sessions, activity_env
):
    await _queue(sessions, activity_env, _mail(1), _mail(2))
    nowhere = SmtpSender("127.0.0.1", 9, 1, "procflow@localhost")
    dispatcher = MailDispatcher(sessions, nowhere, max_attempts=1, max_transient_attempts=3)
    for attempt in (1, 2):
        assert await dispatcher.deliver_due() == 2
        rows = await _rows(sessions)
        assert [(r.status, r.attempts) for r in rows.values()] == [("pending", attempt)] * 2
        await _make_due(sessions)
    assert await dispatcher.deliver_due() == 2
    rows = await _rows(sessions)
    assert [(r.status, r.attempts) for r in rows.values()] == [("failed", 3)] * 2
    assert [e.event_key for e in await _audit(sessions)] == [
        f"mail-failed:{r.id}" for r in rows.values()
    ]


async def test_a_session_cut_during_a_mail_fails_that_mail_alone(sessions, activity_env, relay):
    server = relay(drop={"drop@example.com"})
    await _queue(sessions, activity_env, _mail(1), _mail(2, "drop@example.com"), _mail(3), _mail(4))
    dispatcher = MailDispatcher(sessions, server.sender())
    assert await dispatcher.deliver_due() == 4
    assert server.subjects == ["mail 1", "mail 3", "mail 4"]  # over a second session
    rows = await _rows(sessions)
    assert [(r.status, r.attempts) for r in rows.values()] == [
        ("sent", 0),
        ("pending", 1),
        ("sent", 0),
        ("sent", 0),
    ]


async def test_after_a_421_the_rest_go_over_a_new_session_without_a_failure(
    sessions, activity_env, relay
):
    server = relay(closing={"closing@example.com"})
    await _queue(sessions, activity_env, _mail(1), _mail(2, "closing@example.com"), _mail(3))
    dispatcher = MailDispatcher(sessions, server.sender())
    assert await dispatcher.deliver_due() == 3
    assert server.subjects == ["mail 1", "mail 3"]
    rows = await _rows(sessions)
    assert [(r.status, r.attempts) for r in rows.values()] == [
        ("sent", 0),
        ("pending", 1),  # 421 is transient
        ("sent", 0),  # not blamed for the session the server closed before it
    ]
    assert dispatcher.failures == 1


async def test_a_mail_refused_for_some_recipients_is_sent_and_names_them(
    sessions, activity_env, relay
):
    server = relay(refuse={"nobody@example.com"})
    await _queue(sessions, activity_env, _mail(1, "buyer@example.com", "nobody@example.com"))
    dispatcher = MailDispatcher(sessions, server.sender())
    assert await dispatcher.deliver_due() == 1
    [(_, rcpt_tos, _)] = server.received
    assert rcpt_tos == ["buyer@example.com"]
    row = (await _rows(sessions))["mail 1"]
    assert (row.status, row.attempts) == ("sent", 0)  # not again: buyer has it
    assert row.last_error == f"refused: nobody@example.com: {NO_SUCH_USER}"


async def test_an_idn_domain_goes_out_as_punycode_to_a_server_without_smtputf8(
    sessions, activity_env, relay
):
    server = relay(utf8=False)
    await _queue(sessions, activity_env, _mail(1, "kunde@bücher.example"), _mail(2))
    dispatcher = MailDispatcher(sessions, server.sender())
    assert await dispatcher.deliver_due() == 2
    assert server.subjects == ["mail 1", "mail 2"]
    [(_, rcpt_tos, message)] = [r for r in server.received if r[2]["Subject"] == "mail 1"]
    assert rcpt_tos == ["kunde@xn--bcher-kva.example"]
    assert message["To"] == "kunde@xn--bcher-kva.example"
    assert {r.status for r in (await _rows(sessions)).values()} == {"sent"}


async def test_a_non_ascii_local_part_without_smtputf8_fails_that_mail_alone(
    sessions, activity_env, relay
):
    server = relay(utf8=False)
    await _queue(sessions, activity_env, _mail(1), _mail(2, "jürgen@bücher.example"), _mail(3))
    dispatcher = MailDispatcher(sessions, server.sender(), max_attempts=1)
    assert await dispatcher.deliver_due() == 3
    assert server.subjects == ["mail 1", "mail 3"]
    rows = await _rows(sessions)
    assert [r.status for r in rows.values()] == ["sent", "failed", "sent"]
    assert "SMTPUTF8" in (rows["mail 2"].last_error or "")
    [entry] = await _audit(sessions)
    assert entry.details["recipients"] == ["jürgen@bücher.example"]


async def test_a_server_with_smtputf8_gets_international_addresses_as_they_are(
    sessions, activity_env, relay
):
    server = relay(utf8=True)
    await _queue(sessions, activity_env, _mail(1, "jürgen@bücher.example"))
    dispatcher = MailDispatcher(sessions, server.sender())
    assert await dispatcher.deliver_due() == 1
    [(_, rcpt_tos, message)] = server.received
    assert rcpt_tos == ["jürgen@bücher.example"]
    assert message["To"] == "jürgen@bücher.example"
    assert (await _rows(sessions))["mail 1"].status == "sent"


async def test_an_address_that_cannot_go_on_the_wire_fails_alone(sessions, activity_env, relay):
    server = relay()
    await _queue(sessions, activity_env, _mail(1, "two words@example.com"), _mail(2))
    dispatcher = MailDispatcher(sessions, server.sender(), max_attempts=1)
    assert await dispatcher.deliver_due() == 2
    assert server.subjects == ["mail 2"]
    rows = await _rows(sessions)
    assert [r.status for r in rows.values()] == ["failed", "sent"]
