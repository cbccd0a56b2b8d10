"""Notification activities: mail to users, roles and addresses through an outbox row."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from activities.mail import SmtpSender
from activities.models import Notification, NotificationResult
from core.db import OutboxMessage, User, utcnow


class NotificationActivities:
    def __init__(self, session_factory: async_sessionmaker, sender: SmtpSender) -> None:
        self._sessions = session_factory
        self._sender = sender

    @activity.defn(name="notify")
    async def notify(self, note: Notification) -> NotificationResult:
        """Resolve recipients, record the outbox row, send once per idempotency key."""
        async with self._sessions() as session:
            row = await _outbox_row(session, note.idempotency_key)
            if row is not None and row.status == "sent":
                activity.logger.info("notification %s already sent", note.idempotency_key)
                return NotificationResult(
                    recipients=list(row.recipients), sent=bool(row.recipients), duplicate=True
                )
            recipients = await _resolve_recipients(session, note)
            if row is None:
                row = OutboxMessage(
                    idempotency_key=note.idempotency_key,
                    workflow_id=note.workflow_id,
                    recipients=recipients,
                    subject=note.subject,
                    body=note.body,
                    status="pending",
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
                activity.logger.info("notification %s sent to %s", note.idempotency_key, recipients)
            else:
                activity.logger.warning("notification %s has no recipients", note.idempotency_key)
            row.status = "sent"
            row.sent_at = utcnow()
            await session.commit()
        return NotificationResult(recipients=recipients, sent=bool(recipients))


async def _outbox_row(session: AsyncSession, key: str) -> OutboxMessage | None:
    return (
        await session.execute(select(OutboxMessage).where(OutboxMessage.idempotency_key == key))
    ).scalar_one_or_none()


async def _resolve_recipients(session: AsyncSession, note: Notification) -> list[str]:
    emails: set[str] = {e for e in note.to_emails if e}
    if note.to_users:
        users = (
            await session.execute(select(User).where(User.username.in_(note.to_users)))
        ).scalars()
        emails.update(u.email for u in users if u.email)
    if note.to_roles:
        wanted = set(note.to_roles)
        # roles is a JSON list: filtered here, which stays portable across SQLite and PostgreSQL
        active = (await session.execute(select(User).where(User.active.is_(True)))).scalars()
        emails.update(u.email for u in active if u.email and wanted.intersection(u.roles or []))
    return sorted(emails)
