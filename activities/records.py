"""Record activities: policy versions and the read model (orders, tasks, audit trail)."""

from __future__ import annotations

from sqlalchemy import delete, insert, select
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
from core.db import AuditEntry, Order, OrderLine, PolicyVersion, TaskCandidate, TaskRow

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
    def __init__(self, session_factory: async_sessionmaker) -> None:
        self._sessions = session_factory

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
        """Apply a batch of read-model writes in one transaction; applying it twice is a no-op."""
        async with self._sessions.begin() as session:
            if batch.order is not None:
                await _insert_order(session, batch.order, batch.stage)
            if batch.stage is not None:
                await _apply_stage(session, batch.stage)
            for snapshot in batch.tasks:
                await _upsert_task(session, snapshot)
            await _insert_audit(session, batch.audit)


async def _insert_order(
    session: AsyncSession, record: OrderRecord, stage: StageChange | None
) -> None:
    if await session.get(Order, record.order_no) is not None:
        return
    values = record.model_dump(exclude={"lines"})
    if stage is not None and stage.order_no == record.order_no:
        values["created_at"] = values["updated_at"] = stage.at
    session.add(Order(**values))
    await session.flush()
    for line in record.lines:
        session.add(OrderLine(order_no=record.order_no, **line.model_dump()))
    await session.flush()


async def _apply_stage(session: AsyncSession, stage: StageChange) -> None:
    # Stage changes come in order from the one workflow that owns the order (each projection
    # is awaited before the next), so the last applied write is the newest one.
    order = await session.get(Order, stage.order_no)
    if order is None:
        activity.logger.warning("stage change for unknown order %s ignored", stage.order_no)
        return
    order.stage = stage.stage
    order.special_change = stage.special_change
    order.updated_at = stage.at
    await session.flush()


async def _upsert_task(session: AsyncSession, snapshot: TaskSnapshot) -> None:
    row = await session.get(TaskRow, snapshot.task_id)
    values = snapshot.model_dump(include=set(_TASK_FIELDS))
    if row is None:
        session.add(TaskRow(task_id=snapshot.task_id, **values))
    elif snapshot.revision >= row.revision:
        for name, value in values.items():
            setattr(row, name, value)
    else:
        activity.logger.info(
            "task %s: snapshot revision %s older than stored %s, skipped",
            snapshot.task_id,
            snapshot.revision,
            row.revision,
        )
        return
    await session.flush()
    await session.execute(delete(TaskCandidate).where(TaskCandidate.task_id == snapshot.task_id))
    roles = sorted(set(snapshot.candidate_roles))
    if roles:
        await session.execute(
            insert(TaskCandidate), [{"task_id": snapshot.task_id, "role": r} for r in roles]
        )


async def _insert_audit(session: AsyncSession, records: list[AuditRecord]) -> None:
    if not records:
        return
    keys = {r.event_key for r in records}
    existing = set(
        (
            await session.execute(
                select(AuditEntry.event_key).where(AuditEntry.event_key.in_(keys))
            )
        ).scalars()
    )
    for record in records:
        if record.event_key in existing:
            continue
        existing.add(record.event_key)
        session.add(AuditEntry(**record.model_dump()))
    await session.flush()
