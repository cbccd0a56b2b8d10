"""Record activities: policy versions and the read model (process instances, their stage
visits and SLA events, the sales order's extension row, tasks, audit trail)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Insert, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from activities.models import (
    AuditRecord,
    InstanceRecord,
    OrderRecord,
    PolicyDocument,
    PolicyRequest,
    ProjectionBatch,
    SlaEventRecord,
    StageChange,
    StageVisitRecord,
    TaskSnapshot,
)
from activities.notifications import outbox_rows, resolve_recipients
from core import tracecontext
from core.db import (
    AuditEntry,
    Base,
    Order,
    OrderLine,
    OutboxMessage,
    PolicyVersion,
    ProcessInstance,
    SlaEvent,
    StageVisit,
    TaskCandidate,
    TaskRow,
    utcnow,
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

# the process type of the instances that older sales-order code projects through `order` and
# `stage` (StageChange) alone, and the instance status that an order's stage means
SALES_ORDER = "sales_order"
_CENT = Decimal("0.01")
_STATUS_OF_ORDER_STAGE = {
    "closed": "completed",
    "rejected": "completed",
    "cancelled": "cancelled",
    "failed": "failed",
}


class RecordActivities:
    def __init__(
        self, session_factory: async_sessionmaker, mail_queued: Callable[[], None] | None = None
    ) -> None:
        self._sessions = session_factory
        self._mail_queued = mail_queued  # the mail dispatcher's wake-up, if one runs here
        self._grouped: bool | None = None  # group commit (SQLite): decided on first use
        self.writer = _GroupWriter(session_factory)

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
        it twice is a no-op. Workflows run it as a local activity (see workflows/runtime.py).

        On SQLite (one writer at a time) the batches of this process that arrive while one is
        being written wait in a queue and go out together, in one transaction (group commit):
        under a burst the worker's projections no longer compete for the file's lock, poll it
        and time out; one failing batch is then written alone and fails alone."""
        if self._grouped is None:
            self._grouped = self._sessions.kw["bind"].dialect.name == "sqlite"
        # the projection's span: its mails' SendMail continues the trace (core/tracecontext.py)
        trace = tracecontext.carrier() if batch.mails else None
        if self._grouped:
            await self.writer.write(batch, trace)
        else:
            async with self._sessions.begin() as session:
                await _apply_batch(session, batch, trace)
        if batch.mails and self._mail_queued is not None:
            self._mail_queued()


async def _apply_batch(
    session: AsyncSession, batch: ProjectionBatch, trace: dict[str, str] | None = None
) -> None:
    # locks in one order everywhere (here and in activities/reconcile.py): the instance, its
    # order, its visits, its tasks
    applied = False
    if batch.instance is not None:
        applied = await _upsert_instance(session, batch.instance)
    elif batch.order is not None:  # older sales-order code: no instance record
        await _instance_from_order(session, batch.order, batch.stage)
    if batch.order is not None:
        await _insert_order(session, batch.order, batch.stage, batch.instance)
    if applied and batch.instance is not None:
        await _order_follows(session, batch.instance)
    if batch.stage is not None:
        await _apply_stage(session, batch.stage, batch.instance)
    for visit in batch.visits:
        await _upsert_visit(session, visit)
    await _insert_sla_events(session, batch.sla_events)
    for snapshot in batch.tasks:
        await _upsert_task(session, snapshot)
    await _insert_audit(session, batch.audit)
    if batch.mails:
        recipients = await resolve_recipients(session, batch.mails)
        await session.execute(
            insert_or_ignore(session, OutboxMessage), outbox_rows(batch.mails, recipients, trace)
        )


# a batch and the trace-context headers of the projection that wrote it
Queued = tuple[ProjectionBatch, dict[str, str] | None]

# at most this many queued batches in one group transaction (SQLite)
GROUP_MAX = 100


class _GroupWriter:
    """One writing task per process for SQLite's single writer: `write` queues a batch and
    waits for the transaction that carries it. The task takes everything queued (up to
    GROUP_MAX) into one transaction; when that fails, each of its batches is written alone, so
    only a batch that fails by itself reports a failure. A caller that gives up (its activity
    timed out) leaves its batch to be written anyway: applying a batch twice is a no-op."""

    def __init__(self, sessions: async_sessionmaker) -> None:
        self._sessions = sessions
        # each batch with the trace context of the projection that wrote it
        self._queue: list[tuple[Queued, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0  # group transactions committed (for tests and benchmarks)

    async def write(self, batch: ProjectionBatch, trace: dict[str, str] | None = None) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # a caller that gave up does not see its failure: it is taken here, not logged as lost
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append(((batch, trace), done))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="projection group writer")
        await asyncio.shield(done)

    async def _drain(self) -> None:
        while self._queue:
            group, self._queue = self._queue[:GROUP_MAX], self._queue[GROUP_MAX:]
            try:
                await self._commit([batch for batch, _ in group])
            except Exception as err:
                if len(group) == 1:
                    _settle(group[0][1], err)
                    continue
                for batch, done in group:  # each alone: only a failing batch fails
                    try:
                        await self._commit([batch])
                    except Exception as alone:
                        _settle(done, alone)
                    else:
                        _settle(done, None)
                continue
            for _, done in group:
                _settle(done, None)

    async def _commit(self, batches: list[Queued]) -> None:
        async with self._sessions.begin() as session:
            for batch, trace in batches:
                await _apply_batch(session, batch, trace)
        self.transactions += 1


def _settle(done: asyncio.Future[None], err: BaseException | None) -> None:
    if done.done():
        return
    if err is None:
        done.set_result(None)
    else:
        done.set_exception(err)


def _upsert(session: AsyncSession, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """The INSERT of this database that takes ON CONFLICT clauses."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"read-model writes are not implemented for {dialect}")


def insert_or_ignore(session: AsyncSession, model: type[Base]) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING: of concurrent writers of one key the first wins and
    the others wait for it and write nothing (a check-then-insert races on PostgreSQL)."""
    return _upsert(session, model).on_conflict_do_nothing()


def _instance_status(order_stage: str) -> str:
    return _STATUS_OF_ORDER_STAGE.get(order_stage, "running")


def _updated_at(record: InstanceRecord) -> datetime:
    """The time of the newest change the record describes (workflow time)."""
    return max(t for t in (record.started_at, record.stage_entered_at, record.closed_at) if t)


def _instance_values(record: InstanceRecord) -> dict[str, Any]:
    values = record.model_dump(exclude={"summary"})
    values["summary"] = record.model_dump(mode="json", include={"summary"})["summary"]
    values["updated_at"] = _updated_at(record)
    return values


async def _locked_instance(session: AsyncSession, workflow_id: str) -> ProcessInstance | None:
    return (
        await session.execute(
            select(ProcessInstance)
            .where(ProcessInstance.workflow_id == workflow_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def _upsert_instance(session: AsyncSession, record: InstanceRecord) -> bool:
    """Insert the instance or apply a newer revision of it; whether the record was applied."""
    values = _instance_values(record)
    inserted = await session.execute(
        insert_or_ignore(session, ProcessInstance)
        .values(**values)
        .returning(ProcessInstance.workflow_id)
    )
    if inserted.scalar_one_or_none() is not None:
        return True
    # the row exists: lock it, so that concurrent projections of one instance apply one by one
    row = await _locked_instance(session, record.workflow_id)
    if row is None:
        # the insert lost on the business key: another workflow holds this (type, key)
        activity.logger.error(
            "instance %s: %s %r belongs to another workflow, not projected",
            record.workflow_id,
            record.process_type,
            record.business_key,
        )
        return False
    if record.revision <= row.revision:
        activity.logger.info(
            "instance %s: revision %s not newer than stored %s, skipped",
            record.workflow_id,
            record.revision,
            row.revision,
        )
        return False
    for name, value in values.items():
        if name not in ("workflow_id", "process_type", "business_key"):
            setattr(row, name, value)
    await session.flush()
    return True


async def _instance_from_order(
    session: AsyncSession, record: OrderRecord, stage: StageChange | None
) -> None:
    """The instance row of an order projected by older code (order and stage, no instance),
    unless it exists: such instances keep appearing in the instance model."""
    if stage is not None and stage.order_no != record.order_no:
        stage = None
    at = stage.at if stage is not None else utcnow()
    stage_name = stage.stage if stage is not None else record.stage
    status = _instance_status(stage_name)
    await session.execute(
        insert_or_ignore(session, ProcessInstance).values(
            workflow_id=record.workflow_id,
            process_type=SALES_ORDER,
            business_key=record.order_no,
            definition_kind="code",
            definition_version="",
            policy_version=record.policy_version,
            stage=stage_name,
            status=status,
            requester=record.requester,
            owner_role=None,
            started_at=at,
            stage_entered_at=at,
            closed_at=None if status == "running" else at,
            updated_at=at,
            revision=stage.revision if stage is not None else 0,
            summary={
                "customer_id": record.customer_id,
                "customer_name": record.customer_name,
                "amount": str(record.amount.quantize(_CENT)),
                "currency": record.currency,
                "special_change": stage.special_change if stage else record.special_change,
            },
        )
    )


async def _order_follows(session: AsyncSession, record: InstanceRecord) -> None:
    """A sales order's extension row takes the stage of its instance (a no-op for others)."""
    values: dict[str, Any] = {"stage": record.stage, "updated_at": _updated_at(record)}
    if "special_change" in record.summary:
        values["special_change"] = bool(record.summary["special_change"])
    await session.execute(
        update(Order)
        .where(Order.workflow_id == record.workflow_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


async def _upsert_visit(session: AsyncSession, visit: StageVisitRecord) -> None:
    """Insert the visit, or fill in what it did not know yet: left_at, outcome and by, once set,
    are never cleared or changed by another write (a replayed older one has them null)."""
    stmt = _upsert(session, StageVisit).values(**visit.model_dump())
    table = StageVisit.__table__.c
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[table.workflow_id, table.seq],
            set_={
                "left_at": func.coalesce(table.left_at, stmt.excluded.left_at),
                "outcome": func.coalesce(table.outcome, stmt.excluded.outcome),
                "by": func.coalesce(table.by, stmt.excluded.by),
            },
        )
    )


async def _insert_order(
    session: AsyncSession,
    record: OrderRecord,
    stage: StageChange | None,
    instance: InstanceRecord | None,
) -> None:
    if await session.get(ProcessInstance, record.workflow_id) is None:
        # its instance was not written (another workflow holds its business key): nor is it
        activity.logger.error("order %s: no instance %s", record.order_no, record.workflow_id)
        return
    values = record.model_dump(exclude={"lines"})
    if instance is not None and instance.workflow_id == record.workflow_id:
        values["created_at"] = instance.started_at
        values["updated_at"] = _updated_at(instance)
    elif stage is not None and stage.order_no == record.order_no:
        values["created_at"] = values["updated_at"] = stage.at
    inserted = await session.execute(
        insert_or_ignore(session, Order).values(**values).returning(Order.order_no)
    )
    if inserted.scalar_one_or_none() is None:
        return  # projected before
    if record.lines:
        await session.execute(
            insert_or_ignore(session, OrderLine),
            [{"order_no": record.order_no, **line.model_dump()} for line in record.lines],
        )


async def _apply_stage(
    session: AsyncSession, stage: StageChange, instance: InstanceRecord | None
) -> None:
    # Stage changes come in order from the one workflow that owns the order (each projection
    # is awaited before the next), so the last applied write is the newest one.
    workflow_id = await session.scalar(
        select(Order.workflow_id).where(Order.order_no == stage.order_no)
    )
    if workflow_id is None:
        activity.logger.warning("stage change for unknown order %s ignored", stage.order_no)
        return
    if instance is not None and instance.workflow_id == workflow_id:
        # code that projects its instance sends the StageChange beside it for older readers;
        # the instance record (its revision counts every change, not only stages) decides
        return
    if not await _instance_follows_stage(session, workflow_id, stage):
        activity.logger.info("stage change of order %s older than its instance", stage.order_no)
        return  # the order follows its instance: never older over newer either
    order = await session.get(Order, stage.order_no, with_for_update=True)
    assert order is not None  # orders are never deleted
    order.stage = stage.stage
    order.special_change = stage.special_change
    order.updated_at = stage.at
    await session.flush()


async def _instance_follows_stage(
    session: AsyncSession, workflow_id: str, stage: StageChange
) -> bool:
    """A legacy stage change moves the order's instance unless the instance holds a newer
    revision; whether it applied. (StageChange revisions count stages: a special change
    repeats the revision of its stage, so an equal revision applies.)"""
    row = await _locked_instance(session, workflow_id)
    if row is None or stage.revision < row.revision:
        return False
    if row.stage != stage.stage:
        row.stage_entered_at = stage.at
        # the stage the instance sat in when the read model came (seq 0) is left now
        await session.execute(
            update(StageVisit)
            .where(StageVisit.workflow_id == workflow_id, StageVisit.seq == 0)
            .where(StageVisit.left_at.is_(None), StageVisit.stage != stage.stage)
            .values(left_at=stage.at)
            .execution_options(synchronize_session=False)
        )
    status = _instance_status(stage.stage)
    row.stage = stage.stage
    row.status = status
    row.closed_at = None if status == "running" else (row.closed_at or stage.at)
    row.updated_at = max(row.updated_at, stage.at)
    row.revision = stage.revision
    row.summary = {**row.summary, "special_change": stage.special_change}
    await session.flush()
    return True


async def _upsert_task(session: AsyncSession, snapshot: TaskSnapshot) -> None:
    values = snapshot.model_dump(include=set(_TASK_FIELDS))
    inserted = await session.execute(
        insert_or_ignore(session, TaskRow)
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


async def _insert_sla_events(session: AsyncSession, events: list[SlaEventRecord]) -> None:
    unique = {e.event_key: e for e in reversed(events)}  # the first event of a key wins
    if unique:
        await session.execute(
            insert_or_ignore(session, SlaEvent),
            [
                unique[key].model_dump(exclude={"details"})
                | {"details": unique[key].model_dump(mode="json")["details"]}
                for key in dict.fromkeys(e.event_key for e in events)
            ],
        )


async def _insert_audit(session: AsyncSession, records: list[AuditRecord]) -> None:
    unique = {r.event_key: r for r in reversed(records)}  # the first record of a key wins
    if unique:
        await session.execute(
            insert_or_ignore(session, AuditEntry),
            [unique[key].model_dump() for key in dict.fromkeys(r.event_key for r in records)],
        )
