"""Mail to users, roles and addresses, through the outbox table.

Two ways in, one way out:
- the `project` activity (activities/records.py) queues a step's mails as outbox rows in the
  same transaction as its read-model writes (`queue_mails`), and wakes the dispatcher;
- the `notify` activity queues one mail and sends it at once (instances started before the
  outbox existed still schedule it, so it stays registered).
The `MailDispatcher` runs beside each worker: it claims due rows with a lease (so that several
workers never send one row together), sends them over one SMTP session, marks them sent, and
retries failures with exponential backoff. Delivery is at least once: a crash between the SMTP
answer and marking the row sent sends that mail again. A mark that fails (the database does not
take the write) is kept and retried before the dispatcher claims anything else, so a mail is not
sent again at each lease's end while the database refuses writes.

A failure is the failing mail's alone: a mail the server refuses (or cannot take, see
activities/mail.py) is retried on its own while the rest of its batch goes out, and a session
that breaks after it carried mail is opened again for the rest. A row gives up, as status
`failed` with a `mail_failed` entry in its instance's audit log, after `max_attempts` attempts
in all when the last refusal was permanent (5xx, every recipient refused, an address the server
cannot take), or after `max_transient_attempts` when it was not (4xx, the server away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta

import aiosmtplib
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from activities.background import BackgroundLoop
from activities.mail import MailRefused, SessionClosed, SmtpSender
from activities.models import Notification, NotificationResult
from core import tracecontext
from core.db import AuditEntry, OutboxMessage, User, utcnow

log = logging.getLogger(__name__)

# outbox row status: the dispatcher's to send; the notify activity's to send; done; given up
PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"
MAIL_FAILED = "mail_failed"  # audit action when a row gives up

# a session that could not be opened or broke: the server is away (or went away)
_SESSION_ERRORS = (OSError, TimeoutError, aiosmtplib.SMTPException)


class NotificationActivities:
    def __init__(self, session_factory: async_sessionmaker, sender: SmtpSender) -> None:
        self._sessions = session_factory
        self._sender = sender

    @activity.defn(name="notify")
    async def notify(self, note: Notification) -> NotificationResult:
        """Resolve recipients, record the outbox row, send once per idempotency key."""
        async with self._sessions() as session:
            row = await _outbox_row(session, note.idempotency_key)
            if row is not None and row.status == SENT:
                activity.logger.info("notification %s already sent", note.idempotency_key)
                return NotificationResult(
                    recipients=list(row.recipients), sent=bool(row.recipients), duplicate=True
                )
            recipients = (await resolve_recipients(session, [note]))[0]
            if row is None:
                row = OutboxMessage(
                    idempotency_key=note.idempotency_key,
                    workflow_id=note.workflow_id,
                    recipients=recipients,
                    subject=note.subject,
                    body=note.body,
                    status=SENDING,  # this activity's to send (and retry), not the dispatcher's
                )
                session.add(row)
                try:
                    await session.commit()
                except IntegrityError:
                    # a concurrent attempt wrote the row first: fail and let the retry decide
                    await session.rollback()
                    raise
            else:
                row.recipients = recipients
                await session.commit()

            if recipients:
                await self._sender.send(recipients, note.subject, note.body)
                activity.logger.info(
                    "notification %s sent to %s recipient(s)", note.idempotency_key, len(recipients)
                )
            else:
                activity.logger.warning("notification %s has no recipients", note.idempotency_key)
            row.status = SENT
            row.sent_at = utcnow()
            await session.commit()
        return NotificationResult(recipients=recipients, sent=bool(recipients))


async def _outbox_row(session: AsyncSession, key: str) -> OutboxMessage | None:
    return (
        await session.execute(select(OutboxMessage).where(OutboxMessage.idempotency_key == key))
    ).scalar_one_or_none()


async def resolve_recipients(session: AsyncSession, notes: list[Notification]) -> list[list[str]]:
    """The addresses of each note: its addresses, its users' and its roles' active users'."""
    names = {u for n in notes for u in n.to_users}
    wanted = {r for n in notes for r in n.to_roles}
    users: list[User] = []
    if names or wanted:
        # roles is a JSON list: filtered here, which stays portable across SQLite and PostgreSQL
        query = select(User)
        if not wanted:
            query = query.where(User.username.in_(names))
        users = list((await session.execute(query)).scalars())
    result = []
    for note in notes:
        emails: set[str] = {e for e in note.to_emails if e}
        roles = set(note.to_roles)
        for u in users:
            if not u.email:
                continue
            if u.username in note.to_users or (u.active and roles.intersection(u.roles or [])):
                emails.add(u.email)
        result.append(sorted(emails))
    return result


def outbox_rows(
    notes: list[Notification],
    recipients: list[list[str]],
    trace_context: dict[str, str] | None,
) -> list[dict]:
    """Rows for `queue_mails`' INSERT ... ON CONFLICT DO NOTHING (the key decides), carrying
    `trace_context`, the trace-context headers of the span that queued them
    (`core.tracecontext.carrier()` in the activity): the dispatcher's SendMail continues it."""
    now = utcnow()
    return [
        {
            "idempotency_key": n.idempotency_key,
            "workflow_id": n.workflow_id,
            "recipients": to,
            "subject": n.subject,
            "body": n.body,
            "status": PENDING,
            "created_at": now,
            "attempts": 0,
            "trace_context": trace_context,
        }
        for n, to in zip(notes, recipients, strict=True)
    ]


@dataclass(frozen=True)
class _Claimed:
    id: int
    key: str
    workflow_id: str
    recipients: list[str]
    subject: str
    body: str
    attempts: int
    trace_context: dict[str, str] | None = None


def _send_span(row: _Claimed) -> contextlib.AbstractContextManager:
    """SendMail, in the trace of the step that queued the mail (a new trace without one)."""
    return tracecontext.continued(
        "SendMail",
        row.trace_context,
        {
            "procflow.outbox_id": row.id,
            "procflow.mail_key": row.key,
            "procflow.workflow_id": row.workflow_id,
            "procflow.recipients": len(row.recipients),
            "procflow.attempt": row.attempts + 1,
        },
    )


class MailDispatcher(BackgroundLoop):
    """Delivers queued outbox rows; one per worker process, any number of processes."""

    task_name = "mail-dispatcher"

    def __init__(
        self,
        session_factory: async_sessionmaker,
        sender: SmtpSender,
        *,
        poll_s: float = 2.0,
        batch_size: int = 50,
        lease_s: float = 60.0,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = 600.0,
        max_attempts: int = 5,
        max_transient_attempts: int = 50,
        gather_s: float = 0.2,
    ) -> None:
        self._sessions = session_factory
        self._sender = sender
        self.poll_s = poll_s
        self.batch_size = batch_size
        self.lease = timedelta(seconds=lease_s)
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_attempts = max_attempts  # in all, once a refusal was permanent
        self.max_transient_attempts = max(max_transient_attempts, max_attempts)
        self.gather_s = gather_s
        self.sent = 0  # mails this dispatcher delivered
        self.failures = 0  # attempts that failed (retried later, or given up)
        self.given_up = 0  # rows this dispatcher marked failed
        # mails this dispatcher sent but could not mark sent (the database did not take the
        # write): marked before anything new is claimed, and never sent again by this one
        self._unmarked: dict[int, _Claimed] = {}
        self._unmarked_partly: dict[int, str] = {}
        self._wake = asyncio.Event()
        super().__init__()

    # ---------------------------------------------------------------- lifecycle
    def wake(self) -> None:
        """New rows are queued: deliver now instead of at the next poll."""
        self._wake.set()

    def _woken_to_stop(self) -> None:
        self._wake.set()

    async def stop(self, drain_s: float = 5.0) -> None:
        """Finish the running round, then deliver what is due once more (at most `drain_s`);
        stopped by a flag (activities/background.py says why)."""
        await self.halt()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(drain_s):
                await self.deliver_due()

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                delivered = await self.deliver_due()
            except Exception:  # the database is away: try again at the next poll
                log.exception("mail dispatcher: could not read the outbox")
                delivered = 0
            if delivered >= self.batch_size or self._stopping.is_set():
                continue  # there may be more (or we are stopping)
            try:
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            except TimeoutError:
                continue
            if not self._stopping.is_set():
                # woken by a projection: let the steps running now queue theirs too, then
                # deliver them together (fewer writes competing with the projections)
                await asyncio.sleep(self.gather_s)

    # ---------------------------------------------------------------- delivery
    @property
    def unmarked(self) -> int:
        """Mails sent but not marked sent yet (their mark is retried first)."""
        return len(self._unmarked)

    async def deliver_due(self) -> int:
        """Claim up to `batch_size` due rows, send them; returns how many were claimed.

        Mails sent before whose mark failed are marked first; while that fails nothing new is
        claimed (the error propagates) and none of them is sent again.
        """
        if self._unmarked:
            await self._sent(list(self._unmarked.values()), dict(self._unmarked_partly))
        rows = await self._claim()
        if not rows:
            return 0
        pending = [r for r in rows if r.recipients]
        sent = [r for r in rows if not r.recipients]  # nothing to send: done
        partly: dict[int, str] = {}  # row id -> the recipients refused while others accepted
        try:
            while pending:  # each round one session; it returns what is left for a new one
                pending = await self._over_one_session(pending, sent, partly)
        finally:
            # one write for the batch (the records database may have one writer at a time);
            # a crash before it sends these again once their lease ends (at least once)
            await self._sent(sent, partly)
        return len(rows)

    async def _over_one_session(
        self, pending: list[_Claimed], sent: list[_Claimed], partly: dict[int, str]
    ) -> list[_Claimed]:
        """Send pending over one SMTP session (sent ones go to `sent`, refused ones back off);
        returns the mails left for a new session, or [] when the server is away.

        A session that breaks before the server answered any of its mails means the server is
        away: every mail not sent yet waits. One that breaks after it carried mail is opened
        again for the rest: the mail in flight takes the failure (it may be what broke it),
        none when the server had closed the session before it was offered.
        """
        carried = False
        try:
            async with self._sender.connection() as send:
                while pending:
                    row = pending[0]
                    try:
                        with _send_span(row):
                            refused = await send(row.recipients, row.subject, row.body)
                    except MailRefused as err:  # this mail's failure; the session goes on
                        pending.pop(0)
                        carried = True
                        await self._failed(row, err, permanent=err.permanent)
                        continue
                    except SessionClosed:  # not this mail's doing: it goes over the next session
                        raise
                    except _SESSION_ERRORS as err:
                        if not carried:
                            raise
                        pending.pop(0)
                        await self._failed(row, err, permanent=False)
                        return pending
                    if refused:
                        partly[row.id] = "; ".join(f"{a}: {why}" for a, why in refused.items())
                    sent.append(pending.pop(0))
                    carried = True
        except _SESSION_ERRORS as err:
            if carried:
                return pending
            for row in pending:  # the server is away: every mail not sent yet waits
                await self._failed(row, err, permanent=False)
            return []
        return pending

    async def _claim(self) -> list[_Claimed]:
        now = utcnow()
        claimable = (
            OutboxMessage.status == PENDING,
            or_(OutboxMessage.next_attempt_at.is_(None), OutboxMessage.next_attempt_at <= now),
            or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now),
        )
        due = select(OutboxMessage.id).where(*claimable).order_by(OutboxMessage.id)
        # One statement: SQLite runs it alone; on PostgreSQL a concurrent claimer blocks on
        # the row and then re-checks the conditions against the committed lease, so it skips.
        stmt = (
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(due.limit(self.batch_size)), *claimable)
            .values(lease_until=now + self.lease)
            .returning(
                OutboxMessage.id,
                OutboxMessage.idempotency_key,
                OutboxMessage.workflow_id,
                OutboxMessage.recipients,
                OutboxMessage.subject,
                OutboxMessage.body,
                OutboxMessage.attempts,
                OutboxMessage.trace_context,
            )
            .execution_options(synchronize_session=False)
        )
        async with self._sessions.begin() as session:
            result = (await session.execute(stmt)).all()
        return sorted((_Claimed(*r) for r in result), key=lambda r: r.id)

    async def _sent(self, rows: list[_Claimed], partly: dict[int, str]) -> None:
        """Mark rows sent in one transaction; when that fails they are kept to be marked by
        the next round (before it claims anything), and the error propagates."""
        if not rows:
            return
        try:
            await self._mark_sent(rows, partly)
        except BaseException:
            for row in rows:
                self._unmarked[row.id] = row
                if row.id in partly:
                    self._unmarked_partly[row.id] = partly[row.id]
            log.warning("mail dispatcher: %s sent mails not marked sent yet", len(self._unmarked))
            raise
        for row in rows:
            self._unmarked.pop(row.id, None)
            self._unmarked_partly.pop(row.id, None)
        for row in rows:
            if row.id in partly:
                self.sent += 1
                log.warning(
                    "mail %s sent, but refused for %s recipient(s)",
                    row.key,
                    partly[row.id].count("; ") + 1,
                )
            elif row.recipients:
                self.sent += 1
                log.info("mail %s sent to %s recipient(s)", row.key, len(row.recipients))
            else:
                log.warning("mail %s has no recipients", row.key)

    async def _mark_sent(self, rows: list[_Claimed], partly: dict[int, str]) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id.in_([r.id for r in rows]))
                .values(status=SENT, sent_at=utcnow(), lease_until=None)
                .execution_options(synchronize_session=False)
            )
            for row_id, refused in partly.items():  # sent, but not to everyone: say to whom not
                await session.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.id == row_id)
                    .values(last_error=f"refused: {refused}"[:1000])
                    .execution_options(synchronize_session=False)
                )

    async def _failed(self, row: _Claimed, err: BaseException, *, permanent: bool) -> None:
        """Count a failed attempt: back off, or give up once the attempts reach their cap."""
        self.failures += 1
        attempts = row.attempts + 1
        error = str(err)[:1000] or type(err).__name__
        if attempts >= (self.max_attempts if permanent else self.max_transient_attempts):
            await self._give_up(row, attempts, error, permanent)
            return
        delay = min(self.max_backoff_s, self.first_backoff_s * 2 ** (attempts - 1))
        log.warning(
            "mail %s: attempt %s failed (%s); next in %.0f s", row.key, attempts, err, delay
        )
        async with self._sessions.begin() as session:
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == row.id)
                .values(
                    attempts=attempts,
                    next_attempt_at=utcnow() + timedelta(seconds=delay),
                    lease_until=None,
                    last_error=error,
                )
                .execution_options(synchronize_session=False)
            )

    async def _give_up(self, row: _Claimed, attempts: int, error: str, permanent: bool) -> None:
        """Mark the row failed and write its audit entry, in one transaction (once: a row
        another dispatcher settled meanwhile is left as it is)."""
        async with self._sessions.begin() as session:
            marked = await session.scalar(
                update(OutboxMessage)
                .where(OutboxMessage.id == row.id, OutboxMessage.status == PENDING)
                .values(
                    status=FAILED,
                    attempts=attempts,
                    next_attempt_at=None,
                    lease_until=None,
                    last_error=error,
                )
                .returning(OutboxMessage.id)
                .execution_options(synchronize_session=False)
            )
            if marked is None:
                return
            session.add(
                AuditEntry(
                    event_key=f"mail-failed:{row.id}",
                    workflow_id=row.workflow_id,
                    actor="system",
                    action=MAIL_FAILED,
                    comment=error,
                    details={
                        "idempotency_key": row.key,
                        "subject": row.subject,
                        "recipients": row.recipients,
                        "attempts": attempts,
                        "permanent": permanent,
                    },
                    at=utcnow(),
                )
            )
        self.given_up += 1
        log.error(
            "mail %s to %s recipient(s) failed for good after %s attempts: %s",
            row.key,
            len(row.recipients),
            attempts,
            error,
        )
