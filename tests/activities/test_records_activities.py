"""Records activities, the Alembic migration and the seed script against a real SQLite file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from argon2 import PasswordHasher
from sqlalchemy import func, inspect, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from activities.models import (
    AuditRecord,
    OrderLineRecord,
    OrderRecord,
    PolicyRequest,
    ProjectionBatch,
    StageChange,
    TaskSnapshot,
)
from activities.records import RecordActivities
from core.db import (
    AuditEntry,
    Base,
    Order,
    OrderLine,
    PolicyVersion,
    StockItem,
    TaskCandidate,
    TaskRow,
    User,
)
from scripts.seed import DEMO_USERS, seed
from workflows.policy import default_policy_document

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _order() -> OrderRecord:
    return OrderRecord(
        order_no="SO-1",
        workflow_id="sales-order-SO-1",
        customer_id="CUST-1",
        customer_name="Acme",
        customer_email="buyer@acme.test",
        requester="alice",
        variant="standard",
        currency="EUR",
        amount=Decimal("120.00"),
        amount_due=Decimal("120.00"),
        stage="approval",
        policy_version=1,
        lines=[
            OrderLineRecord(line_no=1, sku="SKU-MUG", quantity=Decimal(10), unit_price=Decimal(7)),
            OrderLineRecord(
                line_no=2, sku="SKU-TSHIRT", quantity=Decimal(2), unit_price=Decimal(25)
            ),
        ],
    )


def _task(revision: int, status: str = "open", roles: list[str] | None = None) -> TaskSnapshot:
    return TaskSnapshot(
        task_id="sales-order-SO-1/approve-1",
        workflow_id="sales-order-SO-1",
        process_type="sales_order",
        business_key="SO-1",
        name="vice-president approval",
        kind="approval",
        candidate_roles=roles if roles is not None else ["vice-president"],
        assignee=None,
        requester="alice",
        outcomes=["approve", "reject"],
        status=status,  # type: ignore[arg-type]
        outcome="approve" if status == "closed" else None,
        decided_by="victor" if status == "closed" else None,
        created_at=T0,
        closed_at=T0 + timedelta(hours=1) if status == "closed" else None,
        revision=revision,
    )


def _audit(seq: int) -> AuditRecord:
    return AuditRecord(
        event_key=f"sales-order-SO-1#{seq}",
        workflow_id="sales-order-SO-1",
        actor="alice",
        action=f"step-{seq}",
        at=T0 + timedelta(minutes=seq),
    )


async def _snapshot(sessions: async_sessionmaker) -> dict[str, list[tuple]]:
    """Every row of the read-model tables, for comparing whole database states."""
    tables = {
        "orders": Order,
        "order_lines": OrderLine,
        "tasks": TaskRow,
        "task_candidates": TaskCandidate,
        "audit_log": AuditEntry,
    }
    state = {}
    async with sessions() as session:
        for name, model in tables.items():
            cols = list(model.__table__.columns)
            rows = (await session.execute(select(*cols))).all()
            state[name] = sorted(tuple(str(v) for v in row) for row in rows)
    return state


async def test_migration_creates_every_table_of_the_metadata(sessions, db_url):
    engine = sessions.kw["bind"]
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert set(Base.metadata.tables) <= names
    assert names - set(Base.metadata.tables) == {"alembic_version"}


async def test_project_twice_leaves_identical_rows(sessions, activity_env):
    records = RecordActivities(sessions)
    batch = ProjectionBatch(
        order=_order(),
        stage=StageChange(order_no="SO-1", stage="approval", revision=1, at=T0),
        tasks=[_task(1)],
        audit=[_audit(1), _audit(2)],
    )
    await activity_env.run(records.project, batch)
    first = await _snapshot(sessions)
    await activity_env.run(records.project, batch)
    assert await _snapshot(sessions) == first
    assert len(first["orders"]) == 1
    assert len(first["order_lines"]) == 2
    assert len(first["tasks"]) == 1
    assert first["task_candidates"] == [("sales-order-SO-1/approve-1", "vice-president")]
    assert len(first["audit_log"]) == 2


async def test_project_applies_stage_and_newer_task_but_never_an_older_task(sessions, activity_env):
    records = RecordActivities(sessions)
    await activity_env.run(
        records.project, ProjectionBatch(order=_order(), tasks=[_task(1)], audit=[_audit(1)])
    )
    await activity_env.run(
        records.project,
        ProjectionBatch(
            stage=StageChange(
                order_no="SO-1", stage="fulfilment", revision=2, special_change=True, at=T0
            ),
            tasks=[_task(2, status="closed", roles=["vice-president", "manager"])],
        ),
    )
    # a late retry of the first snapshot must not reopen the task
    await activity_env.run(records.project, ProjectionBatch(tasks=[_task(1)]))

    async with sessions() as session:
        order = await session.get(Order, "SO-1")
        task = await session.get(TaskRow, "sales-order-SO-1/approve-1")
        roles = (await session.execute(select(TaskCandidate.role).order_by("role"))).scalars()
        assert order is not None and task is not None
        assert (order.stage, order.special_change) == ("fulfilment", True)
        assert (task.status, task.revision, task.decided_by) == ("closed", 2, "victor")
        assert list(roles) == ["manager", "vice-president"]


async def test_audit_records_are_deduplicated_by_event_key(sessions, activity_env):
    records = RecordActivities(sessions)
    await activity_env.run(records.project, ProjectionBatch(audit=[_audit(1), _audit(2)]))
    await activity_env.run(
        records.project, ProjectionBatch(audit=[_audit(2), _audit(3), _audit(3)])
    )
    async with sessions() as session:
        keys = (await session.execute(select(AuditEntry.event_key))).scalars().all()
    assert sorted(keys) == [f"sales-order-SO-1#{i}" for i in (1, 2, 3)]


async def test_load_policy_is_version_zero_when_none_published(sessions, activity_env):
    records = RecordActivities(sessions)
    doc = await activity_env.run(records.load_policy, PolicyRequest(process_type="sales_order"))
    assert (doc.version, doc.document) == (0, {})


async def test_load_policy_returns_the_highest_version(sessions, activity_env):
    async with sessions.begin() as session:
        for version in (1, 3, 2):
            session.add(
                PolicyVersion(
                    process_type="sales_order",
                    version=version,
                    document={"v": version},
                    published_by="ada",
                )
            )
        session.add(
            PolicyVersion(process_type="other", version=9, document={"v": 9}, published_by="ada")
        )
    records = RecordActivities(sessions)
    doc = await activity_env.run(records.load_policy, PolicyRequest(process_type="sales_order"))
    assert (doc.process_type, doc.version, doc.document) == ("sales_order", 3, {"v": 3})


async def test_seed_twice_is_idempotent_and_passwords_verify(sessions):
    first = await seed(sessions)
    second = await seed(sessions)
    assert first == {"users": len(DEMO_USERS), "policies": 1, "stock": 3}
    assert second == {"users": 0, "policies": 0, "stock": 0}
    async with sessions() as session:
        users = (await session.execute(select(User))).scalars().all()
        policies = (await session.execute(select(PolicyVersion))).scalars().all()
        stock = (await session.execute(select(func.count()).select_from(StockItem))).scalar()
    assert len(users) == len(DEMO_USERS) == 17
    assert stock == 3
    by_name = {u.username: u for u in users}
    assert by_name["vera"].roles == ["requester", "vice-president"]
    assert by_name["ada"].email == "ada@example.com"
    assert PasswordHasher().verify(by_name["alice"].password_hash, "demo")
    assert [(p.version, p.published_by) for p in policies] == [(1, "system")]
    assert policies[0].document == default_policy_document("sales_order")
