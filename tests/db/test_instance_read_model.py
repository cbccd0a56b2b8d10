"""The instance read model (process_instances, stage_visits, sla_events) as `project` writes it,
on SQLite and PostgreSQL: a batch applied twice (or concurrently) writes nothing twice, an older
revision never overwrites a newer one, a visit's end survives a replayed older write, a sales
order's row follows its instance, and batches of older sales-order code (order + StageChange, no
instance) still create and move their instance."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.testing import ActivityEnvironment

from activities.models import (
    InstanceRecord,
    OrderLineRecord,
    OrderRecord,
    ProjectionBatch,
    SlaEventRecord,
    StageChange,
    StageVisitRecord,
    TaskSnapshot,
)
from activities.records import RecordActivities
from core.db import (
    Order,
    OrderLine,
    ProcessInstance,
    SlaEvent,
    StageVisit,
    TaskCandidate,
    TaskRow,
)
from tests.support import task_snapshot

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
WID = "sales_order-9001"


def _instance(
    revision: int,
    stage: str = "approval",
    *,
    minutes: int = 0,
    status: str = "running",
    workflow_id: str = WID,
    process_type: str = "sales_order",
    business_key: str = "9001",
    special_change: bool = False,
) -> InstanceRecord:
    return InstanceRecord(
        workflow_id=workflow_id,
        process_type=process_type,
        business_key=business_key,
        policy_version=2,
        stage=stage,
        status=status,  # type: ignore[arg-type]
        requester="alice",
        owner_role="sales-director",
        started_at=T0,
        stage_entered_at=T0 + timedelta(minutes=minutes),
        closed_at=T0 + timedelta(minutes=minutes) if status != "running" else None,
        revision=revision,
        summary={
            "customer_id": "CUST-9",
            "amount": Decimal("1234.50"),
            "currency": "EUR",
            "special_change": special_change,
        },
    )


def _order(no: str = "9001", workflow_id: str = WID) -> OrderRecord:
    return OrderRecord(
        order_no=no,
        workflow_id=workflow_id,
        customer_id="CUST-9",
        customer_name="Initech",
        customer_email="buyer@initech.example",
        requester="alice",
        variant="standard",
        currency="EUR",
        amount=Decimal("1234.50"),
        amount_due=Decimal("1234.50"),
        stage="received",
        policy_version=2,
        lines=[
            OrderLineRecord(
                line_no=1, sku="SKU-MUG", quantity=Decimal(5), unit_price=Decimal("246.90")
            )
        ],
    )


def _visit(
    seq: int, stage: str, *, minutes: int, left: int | None = None, outcome: str | None = None
) -> StageVisitRecord:
    return StageVisitRecord(
        workflow_id=WID,
        seq=seq,
        stage=stage,
        entered_at=T0 + timedelta(minutes=minutes),
        left_at=T0 + timedelta(minutes=left) if left is not None else None,
        outcome=outcome,
        by="victor" if outcome else None,
    )


def _sla(n: int, kind: str = "reminded") -> SlaEventRecord:
    return SlaEventRecord(
        event_key=f"{WID}:sla:{n}",
        workflow_id=WID,
        task_id=f"{WID}.t1",
        sla="vice-president approval",
        kind=kind,  # type: ignore[arg-type]
        at=T0 + timedelta(hours=n),
        details={"to_role": "sales-director", "amount": Decimal("1234.50")},
    )


def _task() -> TaskSnapshot:
    return task_snapshot(WID, business_key="9001", created_at=T0)


def _first_batch() -> ProjectionBatch:
    return ProjectionBatch(
        instance=_instance(1),
        visits=[_visit(1, "received", minutes=0, left=0), _visit(2, "approval", minutes=0)],
        sla_events=[_sla(1), _sla(1), _sla(2, "escalated")],
        order=_order(),
        tasks=[_task()],
    )


async def _project(sessions: async_sessionmaker, batch: ProjectionBatch) -> None:
    await ActivityEnvironment().run(RecordActivities(sessions).project, batch)


async def _snapshot(sessions: async_sessionmaker) -> dict[str, list[tuple]]:
    state = {}
    async with sessions() as session:
        for model in (ProcessInstance, StageVisit, SlaEvent, Order, OrderLine, TaskRow):
            rows = (await session.execute(select(*model.__table__.columns))).all()
            state[model.__tablename__] = sorted(tuple(str(v) for v in row) for row in rows)
        rows = (await session.execute(select(*TaskCandidate.__table__.columns))).all()
        state["task_candidates"] = sorted(tuple(str(v) for v in row) for row in rows)
    return state


def _counts(state: dict[str, list[tuple]]) -> dict[str, int]:
    return {name: len(rows) for name, rows in state.items()}


EXPECTED_COUNTS = {
    "process_instances": 1,
    "stage_visits": 2,
    "sla_events": 2,
    "orders": 1,
    "order_lines": 1,
    "tasks": 1,
    "task_candidates": 1,
}


async def test_a_batch_with_its_instance_applied_twice_writes_nothing_twice(sessions):
    await _project(sessions, _first_batch())
    first = await _snapshot(sessions)
    await _project(sessions, _first_batch())

    assert await _snapshot(sessions) == first
    assert _counts(first) == EXPECTED_COUNTS
    async with sessions() as s:
        instance = await s.get(ProcessInstance, WID)
        order = await s.get(Order, "9001")
        sla = await s.get(SlaEvent, f"{WID}:sla:2")
    assert instance is not None and order is not None and sla is not None
    assert (instance.process_type, instance.business_key, instance.stage, instance.status) == (
        "sales_order",
        "9001",
        "approval",
        "running",
    )
    assert (instance.definition_kind, instance.policy_version, instance.owner_role) == (
        "code",
        2,
        "sales-director",
    )
    assert (instance.started_at, instance.updated_at, instance.revision) == (T0, T0, 1)
    assert instance.summary["amount"] == "1234.50"  # JSON: exact decimals as text
    # the order is the instance's extension and follows its stage
    assert (order.workflow_id, order.stage, order.created_at) == (WID, "approval", T0)
    assert (sla.kind, sla.task_id, sla.details["amount"]) == ("escalated", f"{WID}.t1", "1234.50")


async def test_concurrent_projections_of_one_batch_write_each_row_once(sessions):
    results = await asyncio.gather(
        *(_project(sessions, _first_batch()) for _ in range(5)), return_exceptions=True
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    state = await _snapshot(sessions)
    assert _counts(state) == EXPECTED_COUNTS
    await _project(sessions, _first_batch())
    assert await _snapshot(sessions) == state


async def test_an_older_revision_never_overwrites_a_newer_one(sessions):
    await _project(sessions, _first_batch())
    newer = _instance(5, "shipped", minutes=30, special_change=True)
    await _project(sessions, ProjectionBatch(instance=newer))
    after_newer = await _snapshot(sessions)

    # a late retry of an older projection, and another record at the same revision
    await _project(sessions, ProjectionBatch(instance=_instance(3, "payment", minutes=10)))
    await _project(sessions, ProjectionBatch(instance=_instance(5, "invoiced", minutes=40)))

    assert await _snapshot(sessions) == after_newer
    async with sessions() as s:
        instance = await s.get(ProcessInstance, WID)
        order = await s.get(Order, "9001")
    assert instance is not None and order is not None
    assert (instance.stage, instance.revision, instance.stage_entered_at) == (
        "shipped",
        5,
        T0 + timedelta(minutes=30),
    )
    assert instance.updated_at == T0 + timedelta(minutes=30)
    assert (order.stage, order.special_change, order.updated_at) == (
        "shipped",
        True,
        T0 + timedelta(minutes=30),
    )


async def test_a_visits_end_survives_a_replayed_older_write(sessions):
    entered = _visit(2, "approval", minutes=0)
    left = _visit(2, "approval", minutes=0, left=25, outcome="approved")
    await _project(sessions, ProjectionBatch(instance=_instance(1), visits=[entered]))
    await _project(
        sessions,
        ProjectionBatch(instance=_instance(2, "payment", minutes=25), visits=[left]),
    )
    await _project(sessions, ProjectionBatch(visits=[entered]))  # the first write, replayed

    async with sessions() as s:
        visit = await s.get(StageVisit, (WID, 2))
        in_approval = (
            await s.scalars(
                select(StageVisit.workflow_id).where(
                    StageVisit.stage == "approval", StageVisit.left_at.is_(None)
                )
            )
        ).all()
    assert visit is not None
    assert (visit.stage, visit.entered_at, visit.left_at, visit.outcome, visit.by) == (
        "approval",
        T0,
        T0 + timedelta(minutes=25),
        "approved",
        "victor",
    )
    assert in_approval == []  # nobody sits in approval any more


async def test_an_instance_of_another_type_is_projected_without_an_order(sessions):
    ticket = _instance(
        1,
        "acknowledge",
        workflow_id="complaint-T-1",
        process_type="complaint",
        business_key="T-1",
    )
    await _project(sessions, ProjectionBatch(instance=ticket))
    # the same business key in another process type is another instance
    await _project(sessions, ProjectionBatch(instance=_instance(1, business_key="T-1")))

    async with sessions() as s:
        rows = (
            await s.execute(
                select(ProcessInstance.workflow_id, ProcessInstance.process_type).order_by(
                    ProcessInstance.process_type
                )
            )
        ).all()
        orders = (await s.scalars(select(Order.order_no))).all()
    assert [tuple(r) for r in rows] == [("complaint-T-1", "complaint"), (WID, "sales_order")]
    assert orders == []


async def test_a_business_key_held_by_another_workflow_is_not_projected(sessions):
    await _project(sessions, _first_batch())
    before = await _snapshot(sessions)
    intruder = _instance(9, "closed", workflow_id="sales-order-9001")
    await _project(
        sessions,
        ProjectionBatch(instance=intruder, order=_order(workflow_id="sales-order-9001")),
    )
    assert await _snapshot(sessions) == before


async def test_a_batch_of_older_code_creates_and_moves_its_instance(sessions):
    wid = "sales-order-9002"
    await _project(
        sessions,
        ProjectionBatch(
            order=_order("9002", wid),
            stage=StageChange(order_no="9002", stage="approval", revision=2, at=T0),
        ),
    )
    async with sessions() as s:
        created = await s.get(ProcessInstance, wid)
    assert created is not None
    assert (created.process_type, created.business_key, created.stage, created.status) == (
        "sales_order",
        "9002",
        "approval",
        "running",
    )
    assert (created.requester, created.policy_version, created.revision) == ("alice", 2, 2)
    assert (created.started_at, created.stage_entered_at, created.closed_at) == (T0, T0, None)
    assert created.summary == {
        "customer_id": "CUST-9",
        "customer_name": "Initech",
        "amount": "1234.50",
        "currency": "EUR",
        "special_change": False,
    }

    closed_at = T0 + timedelta(hours=2)
    # a special change repeats its stage's revision; then the order closes
    await _project(
        sessions,
        ProjectionBatch(
            stage=StageChange(
                order_no="9002", stage="approval", revision=2, special_change=True, at=T0
            )
        ),
    )
    await _project(
        sessions,
        ProjectionBatch(
            stage=StageChange(
                order_no="9002", stage="closed", revision=3, special_change=True, at=closed_at
            )
        ),
    )
    after_close = await _snapshot(sessions)
    # a late retry of an older stage change moves neither the instance nor its order
    await _project(
        sessions,
        ProjectionBatch(stage=StageChange(order_no="9002", stage="approval", revision=2, at=T0)),
    )

    assert await _snapshot(sessions) == after_close
    async with sessions() as s:
        moved = await s.get(ProcessInstance, wid)
        order = await s.get(Order, "9002")
    assert moved is not None and order is not None
    assert (moved.stage, moved.status, moved.revision) == ("closed", "completed", 3)
    assert (moved.stage_entered_at, moved.closed_at, moved.updated_at) == (closed_at,) * 3
    assert moved.summary["special_change"] is True
    assert (order.stage, order.special_change, order.updated_at) == ("closed", True, closed_at)


async def test_a_stage_change_of_older_code_moves_a_backfilled_instance(sessions):
    """An order the migration found in flight (revision 0, visit seq 0) moves on with the
    stage changes of its older code: the instance follows and the seq-0 visit is left."""
    wid = "sales-order-9003"
    async with sessions.begin() as s:
        s.add(
            ProcessInstance(
                workflow_id=wid,
                process_type="sales_order",
                business_key="9003",
                stage="approval",
                status="running",
                requester="alice",
                started_at=T0,
                stage_entered_at=T0,
                updated_at=T0,
                revision=0,
                summary={"special_change": False},
            )
        )
        s.add(StageVisit(workflow_id=wid, seq=0, stage="approval", entered_at=T0))
        await s.flush()
        s.add(Order(**_order("9003", wid).model_dump(exclude={"lines"}), created_at=T0))
    cancelled_at = T0 + timedelta(days=1)

    await _project(
        sessions,
        ProjectionBatch(
            stage=StageChange(order_no="9003", stage="cancelled", revision=4, at=cancelled_at)
        ),
    )

    async with sessions() as s:
        instance = await s.get(ProcessInstance, wid)
        visit = await s.get(StageVisit, (wid, 0))
        order = await s.get(Order, "9003")
    assert instance is not None and visit is not None and order is not None
    assert (instance.stage, instance.status, instance.closed_at) == (
        "cancelled",
        "cancelled",
        cancelled_at,
    )
    assert (visit.stage, visit.left_at) == ("approval", cancelled_at)
    assert order.stage == "cancelled"


async def test_a_stage_change_beside_an_instance_record_leaves_the_instance_to_the_record(
    sessions,
):
    """Code that projects its instance still sends a StageChange for older readers; its revision
    counts stages, the record's every change: the record decides, so the next record applies."""
    await _project(sessions, _first_batch())
    await _project(
        sessions,
        ProjectionBatch(
            instance=_instance(2, "payment", minutes=10),
            stage=StageChange(
                order_no="9001", stage="payment", revision=3, at=T0 + timedelta(minutes=10)
            ),
        ),
    )
    await _project(sessions, ProjectionBatch(instance=_instance(3, "shipped", minutes=20)))

    async with sessions() as s:
        instance = await s.get(ProcessInstance, WID)
        order = await s.get(Order, "9001")
    assert instance is not None and order is not None
    assert (instance.stage, instance.revision) == ("shipped", 3)
    assert (order.stage, order.updated_at) == ("shipped", T0 + timedelta(minutes=20))
