"""The read model (orders, tasks, candidates, audit) on SQLite and PostgreSQL: projection is
idempotent, also when the same batch is applied concurrently, and the inbox handler of
`GET /tasks` finds the right tasks."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.testing import ActivityEnvironment

from activities.models import (
    AuditRecord,
    OrderLineRecord,
    OrderRecord,
    ProjectionBatch,
    StageChange,
    TaskSnapshot,
)
from activities.records import RecordActivities
from api.routers.tasks import inbox
from api.schemas import Principal
from core.db import AuditEntry, Order, OrderLine, TaskCandidate, TaskRow

T0 = datetime(2026, 3, 2, 8, 30, tzinfo=UTC)


def _order(no: str = "SO-7") -> OrderRecord:
    return OrderRecord(
        order_no=no,
        workflow_id=f"sales-order-{no}",
        customer_id="CUST-7",
        customer_name="Globex",
        customer_email="orders@globex.example",
        requester="alice",
        variant="standard",
        currency="EUR",
        amount=Decimal("1234.50"),
        amount_due=Decimal("1234.50"),
        stage="approval",
        policy_version=1,
        lines=[
            OrderLineRecord(
                line_no=1, sku="SKU-MUG", quantity=Decimal("10.5"), unit_price=Decimal("7.10")
            ),
            OrderLineRecord(
                line_no=2, sku="SKU-PRINTER", quantity=Decimal(1), unit_price=Decimal("1160")
            ),
        ],
    )


def _task(
    suffix: str,
    *,
    roles: list[str],
    requester: str = "alice",
    assignee: str | None = None,
    status: str = "open",
    name: str = "vice-president approval",
    kind: str = "approval",
    minutes: int = 0,
    business_key: str = "SO-7",
) -> TaskSnapshot:
    return TaskSnapshot(
        task_id=f"sales-order-{business_key}/{suffix}",
        workflow_id=f"sales-order-{business_key}",
        process_type="sales_order",
        business_key=business_key,
        name=name,
        kind=kind,
        candidate_roles=roles,
        assignee=assignee,
        requester=requester,
        outcomes=["approved", "rejected"],
        status=status,  # type: ignore[arg-type]
        outcome="approved" if status == "closed" else None,
        decided_by="victor" if status == "closed" else None,
        due_at=T0 + timedelta(days=2),
        created_at=T0 + timedelta(minutes=minutes),
        closed_at=T0 + timedelta(hours=1) if status == "closed" else None,
        revision=1,
    )


def _batch() -> ProjectionBatch:
    return ProjectionBatch(
        order=_order(),
        stage=StageChange(order_no="SO-7", stage="approval", revision=1, at=T0),
        tasks=[
            _task("approve-1", roles=["vice-president", "manager"]),
            _task("approve-2", roles=["sales-director"], minutes=1),
        ],
        audit=[
            AuditRecord(
                event_key=f"sales-order-SO-7#{i}",
                workflow_id="sales-order-SO-7",
                actor="alice",
                action=f"step-{i}",
                details={"i": i, "amount": "1234.50"},
                at=T0 + timedelta(seconds=i),
            )
            for i in range(1, 6)
        ],
    )


async def _snapshot(sessions: async_sessionmaker) -> dict[str, list[tuple]]:
    """Every row of the read-model tables, for comparing whole database states."""
    state = {}
    async with sessions() as session:
        for model in (Order, OrderLine, TaskRow, TaskCandidate, AuditEntry):
            rows = (await session.execute(select(*model.__table__.columns))).all()
            state[model.__tablename__] = sorted(tuple(str(v) for v in row) for row in rows)
    return state


async def test_projecting_a_batch_twice_gives_identical_rows(sessions):
    records = RecordActivities(sessions)
    await ActivityEnvironment().run(records.project, _batch())
    first = await _snapshot(sessions)
    await ActivityEnvironment().run(records.project, _batch())
    assert await _snapshot(sessions) == first
    assert {name: len(rows) for name, rows in first.items()} == {
        "orders": 1,
        "order_lines": 2,
        "tasks": 2,
        "task_candidates": 3,
        "audit_log": 5,
    }
    async with sessions() as session:
        order = await session.get(Order, "SO-7")
        line = (
            await session.get(OrderLine, 1)
            or (await session.execute(select(OrderLine).where(OrderLine.line_no == 1))).scalar_one()
        )
    assert order is not None
    assert (order.amount, order.created_at) == (Decimal("1234.50"), T0)
    assert order.created_at.tzinfo is not None
    assert line.quantity == Decimal("10.500")


async def test_concurrent_projections_of_one_batch_write_each_row_once(sessions):
    records = RecordActivities(sessions)
    results = await asyncio.gather(
        *(ActivityEnvironment().run(records.project, _batch()) for _ in range(5)),
        return_exceptions=True,
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    state = await _snapshot(sessions)
    assert {name: len(rows) for name, rows in state.items()} == {
        "orders": 1,
        "order_lines": 2,
        "tasks": 2,
        "task_candidates": 3,
        "audit_log": 5,
    }
    # and the result is the state a single projection leaves
    await ActivityEnvironment().run(records.project, _batch())
    assert await _snapshot(sessions) == state


async def _inbox(
    sessions: async_sessionmaker,
    username: str,
    roles: list[str],
    *,
    include_taken: bool = False,
    name: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[int, list[str]]:
    """`GET /tasks` as the API serves it: the real handler, with a principal and a session."""
    user = Principal(
        username=username, display_name=username, email=f"{username}@example.com", roles=roles
    )
    async with sessions() as session:
        page = await inbox(
            user,
            session,
            kind=kind,
            business_key=None,
            name=name,
            include_taken=include_taken,
            limit=limit,
            offset=offset,
        )
    assert (page.limit, page.offset) == (limit, offset)
    for item in page.items:  # `taken`: assigned to somebody else
        assert item.taken == (item.assignee not in (None, username)), item
    return page.total, [item.task_id.rsplit("/", 1)[1] for item in page.items]


async def test_inbox_handler_returns_open_tasks_of_my_roles_or_assigned_to_me(sessions):
    records = RecordActivities(sessions)
    tasks = [
        _task("pooled-vp", roles=["vice-president"], minutes=5),
        _task("pooled-two-roles", roles=["manager", "vice-president"], minutes=1),
        _task("mine", roles=["sales-director"], assignee="victor", minutes=3),
        _task("taken-by-vera", roles=["vice-president"], assignee="vera", minutes=2),
        _task("other-role", roles=["sales-director"], minutes=4),
        _task("closed", roles=["vice-president"], status="closed", minutes=6),
        _task("own-request", roles=["vice-president"], requester="victor", minutes=7),
        _task(
            "100%_done",
            roles=["vice-president"],
            name="check 100%_done",
            kind="acknowledge",
            minutes=8,
        ),
    ]
    await ActivityEnvironment().run(records.project, ProjectionBatch(tasks=tasks))

    assert await _inbox(sessions, "victor", ["vice-president"]) == (
        4,
        ["pooled-two-roles", "mine", "pooled-vp", "100%_done"],
    )
    assert await _inbox(sessions, "victor", ["vice-president"], include_taken=True) == (
        5,
        ["pooled-two-roles", "taken-by-vera", "mine", "pooled-vp", "100%_done"],
    )
    # `%` and `_` in the search text are literals, not wildcards, on both databases
    assert await _inbox(sessions, "victor", ["vice-president"], name="100%_") == (
        1,
        ["100%_done"],
    )
    assert await _inbox(sessions, "victor", ["vice-president"], name="0%x") == (0, [])
    assert await _inbox(sessions, "victor", ["vice-president"], limit=2) == (
        4,
        ["pooled-two-roles", "mine"],
    )
    assert await _inbox(sessions, "victor", ["vice-president"], limit=2, offset=2) == (
        4,
        ["pooled-vp", "100%_done"],
    )
    assert await _inbox(sessions, "victor", ["vice-president"], kind="acknowledge") == (
        1,
        ["100%_done"],
    )
    # the requester never sees her own order's tasks; an unknown role sees nothing
    assert await _inbox(sessions, "alice", ["vice-president", "manager"]) == (
        1,
        ["own-request"],
    )
    assert await _inbox(sessions, "nobody", ["auditor"]) == (0, [])
