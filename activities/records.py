"""Record activities: policy versions and the read model (orders, tasks, audit trail)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Insert, delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from activities.models import (
    AuditRecord,
    OrderRecord,
    PolicyDocument,
    PolicyRequest,
    ProjectionBatch,
    StageChange,
    TaskSnapshot,
)
from activities.notifications import outbox_rows, resolve_recipients
from core.db import (
    AuditEntry,
    Base,
    Order,
    OrderLine,
    OutboxMessage,
    PolicyVersion,
    TaskCandidate,
    TaskRow,
)

_TASK_FIELDS = (
    "workflow_id",
    "process_type",
    "business_key",
    "name",
    "kind",
    "candidate_roles",
    "assignee",
    "requester",
    "outcomes",
    "status",
    "outcome",
    "decided_by",
    "due_at",
    "escalated",
    "created_at",
    "closed_at",
    "revision",
)


class RecordActivities:
    def __init__(
        self, session_factory: async_sessionmaker, mail_queued: Callable[[], None] | None = None
    ) -> None:
        self._sessions = session_factory
        self._mail_queued = mail_queued  # the mail dispatcher's wake-up, if one runs here

    @activity.defn(name="load_policy")
    async def load_policy(self, request: PolicyRequest) -> PolicyDocument:
        """The newest published policy version; version 0 with {} means built-in defaults."""
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(PolicyVersion)
                    .where(PolicyVersion.process_type == request.process_type)
                    .order_by(PolicyVersion.version.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
        if row is None:
            activity.logger.info("no policy published for %s: defaults", request.process_type)
            return PolicyDocument(process_type=request.process_type, version=0, document={})
        return PolicyDocument(
            process_type=request.process_type, version=row.version, document=dict(row.document)
        )

    @activity.defn(name="project")
    async def project(self, batch: ProjectionBatch) -> None:
        """Apply a batch of read-model writes and queue its mails in one transaction; applying
        it twice is a no-op. Workflows run it as a local activity (see workflows/runtime.py)."""
        async with self._sessions.begin() as session:
            if batch.order is not None:
                await _insert_order(session, batch.order, batch.stage)
            if batch.stage is not None:
                await _apply_stage(session, batch.stage)
            for snapshot in batch.tasks:
                await _upsert_task(session, snapshot)
            await _insert_audit(session, batch.audit)
            if batch.mails:
                recipients = await resolve_recipients(session, batch.mails)
                await session.execute(
                    _insert_or_ignore(session, OutboxMessage), outbox_rows(batch.mails, recipients)
                )
        if batch.mails and self._mail_queued is not None:
            self._mail_queued()


def _insert_or_ignore(session: AsyncSession, model: type[Base]) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING: of concurrent writers of one key the first wins and
    the others wait for it and write nothing (a check-then-insert races on PostgreSQL)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(model).on_conflict_do_nothing()
    raise NotImplementedError(f"read-model writes are not implemented for {dialect}")


async def _insert_order(
    session: AsyncSession, record: OrderRecord, stage: StageChange | None
) -> None:
    values = record.model_dump(exclude={"lines"})
    if stage is not None and stage.order_no == record.order_no:
        values["created_at"] = values["updated_at"] = stage.at
    inserted = await session.execute(
        _insert_or_ignore(session, Order).values(**values).returning(Order.order_no)
    )
    if inserted.scalar_one_or_none() is None:
        return  # projected before
    if record.lines:
        await session.execute(
            _insert_or_ignore(session, OrderLine),
            [{"order_no": record.order_no, **line.model_dump()} for line in record.lines],
        )


async def _apply_stage(session: AsyncSession, stage: StageChange) -> None:
    # Stage changes come in order from the one workflow that owns the order (each projection
    # is awaited before the next), so the last applied write is the newest one.
    order = await session.get(Order, stage.order_no, with_for_update=True)
    if order is None:
        activity.logger.warning("stage change for unknown order %s ignored", stage.order_no)
        return
    order.stage = stage.stage
    order.special_change = stage.special_change
    order.updated_at = stage.at
    await session.flush()


async def _upsert_task(session: AsyncSession, snapshot: TaskSnapshot) -> None:
    values = snapshot.model_dump(include=set(_TASK_FIELDS))
    inserted = await session.execute(
        _insert_or_ignore(session, TaskRow)
        .values(task_id=snapshot.task_id, **values)
        .returning(TaskRow.task_id)
    )
    if inserted.scalar_one_or_none() is None:
        # the row exists: lock it, so that concurrent snapshots of one task apply one by one
        row = (
            await session.execute(
                select(TaskRow)
                .where(TaskRow.task_id == snapshot.task_id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        ).scalar_one()
        if snapshot.revision < row.revision:
            activity.logger.info(
                "task %s: snapshot revision %s older than stored %s, skipped",
                snapshot.task_id,
                snapshot.revision,
                row.revision,
            )
            return
        for name, value in values.items():
            setattr(row, name, value)
        await session.flush()
        await session.execute(
            delete(TaskCandidate).where(TaskCandidate.task_id == snapshot.task_id)
        )
    roles = sorted(set(snapshot.candidate_roles))
    if roles:
        await session.execute(
            insert(TaskCandidate), [{"task_id": snapshot.task_id, "role": r} for r in roles]
        )


async def _insert_audit(session: AsyncSession, records: list[AuditRecord]) -> None:
    unique = {r.event_key: r for r in reversed(records)}  # the first record of a key wins
    if unique:
        await session.execute(
            _insert_or_ignore(session, AuditEntry),
            [unique[key].model_dump() for key in dict.fromkeys(r.event_key for r in records)],
        )
