"""Migration 0004 on SQLite and PostgreSQL: a database of the 0003 schema holding orders, their
lines and ledger rows gets one instance and one stage visit (seq 0) per order, the ledger's
workflow ids, the foreign key of orders to their instance, matches core/db.py, and downgrades
to the 0003 schema again with its data."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.engine.interfaces import ReflectedForeignKeyConstraint
from sqlalchemy.exc import IntegrityError

from core.db import (
    LedgerEntry,
    Order,
    ProcessInstance,
    StageVisit,
    make_engine,
    make_session_factory,
)
from tests.db.conftest import database_at, differences_from_models, inspect_db, run_alembic

CREATED = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
UPDATED = CREATED + timedelta(hours=3)

_metadata = sa.MetaData()
# the tables as 0003 left them (money in cents)
OLD_ORDERS = sa.Table(
    "orders",
    _metadata,
    *(sa.Column(n, sa.String) for n in ("order_no", "workflow_id", "customer_id")),
    *(sa.Column(n, sa.String) for n in ("customer_name", "customer_email", "requester")),
    *(sa.Column(n, sa.String) for n in ("variant", "currency", "stage")),
    sa.Column("amount", sa.BigInteger),
    sa.Column("amount_due", sa.BigInteger),
    sa.Column("special_change", sa.Boolean),
    sa.Column("policy_version", sa.Integer),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
OLD_LINES = sa.Table(
    "order_lines",
    _metadata,
    *(sa.Column(n, sa.String) for n in ("order_no", "sku", "description")),
    sa.Column("line_no", sa.Integer),
    sa.Column("quantity", sa.BigInteger),
    sa.Column("unit_price", sa.BigInteger),
)
OLD_LEDGER = sa.Table(
    "payments_ledger",
    _metadata,
    *(sa.Column(n, sa.String) for n in ("idempotency_key", "order_no", "kind", "currency")),
    *(sa.Column(n, sa.String) for n in ("provider_ref", "status")),
    sa.Column("amount", sa.BigInteger),
    sa.Column("created_at", sa.DateTime(timezone=True)),
)

# order number, workflow id, stage, special change: the status each stage gives its instance
ORDERS = [
    ("1001", "sales-order-1001", "closed", False),  # completed
    ("1002", "sales-order-1002", "rejected", False),  # completed
    ("1003", "sales_order-1003", "cancelled", False),  # cancelled
    ("1004", "sales_order-1004", "failed", False),  # failed
    ("1005", "sales_order-1005", "approval", True),  # running
]


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def url_at_0003(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database at revision 0003, the schema before the instance read model."""
    async with database_at(request, tmp_path, "0003") as url:
        yield url


async def _insert_old_rows(url: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                OLD_ORDERS.insert(),
                [
                    {"order_no": no, "workflow_id": wid, "customer_id": f"CUST-{no}",
                     "customer_name": f"Customer {no}", "customer_email": "buyer@acme.example",
                     "requester": "alice" if no != "1005" else "vera", "variant": "standard",
                     "currency": "EUR", "stage": stage, "amount": 123450, "amount_due": 123450,
                     "special_change": special, "policy_version": 1, "created_at": CREATED,
                     "updated_at": UPDATED}
                    for no, wid, stage, special in ORDERS
                ],
            )  # fmt: skip
            await conn.execute(
                OLD_LINES.insert(),
                {"order_no": "1001", "line_no": 1, "sku": "SKU-A", "description": "",
                 "quantity": 2000, "unit_price": 61725},
            )  # fmt: skip
            await conn.execute(
                OLD_LEDGER.insert(),
                [
                    {"idempotency_key": key, "order_no": no, "kind": "charge", "currency": "EUR",
                     "provider_ref": key, "status": "captured", "amount": 123450,
                     "created_at": CREATED}
                    for key, no in (("ch-1001", "1001"), ("ch-1005", "1005"),
                                    ("ch-9999", "9999"))  # no order 9999: stays unknown
                ],
            )  # fmt: skip
    finally:
        await engine.dispose()


FK_TABLES = ("orders", "order_lines")


def _fk(fk: ReflectedForeignKeyConstraint) -> tuple:
    return fk["referred_table"], tuple(fk["constrained_columns"]), fk["options"].get("ondelete")


def _schema(conn: sa.Connection) -> dict[str, object]:
    inspector = sa.inspect(conn)
    tables = set(inspector.get_table_names())
    return {
        "tables": sorted(tables),
        "indexes": {
            t: sorted(ix["name"] or "" for ix in inspector.get_indexes(t))
            for t in ("orders", "order_lines", "payments_ledger")
        },
        "columns": {
            t: sorted(c["name"] for c in inspector.get_columns(t))
            for t in ("orders", "payments_ledger")
        },
        "foreign_keys": {t: sorted(map(_fk, inspector.get_foreign_keys(t))) for t in FK_TABLES},
    }


async def test_upgrade_gives_every_order_an_instance_a_visit_and_its_ledger_workflow_ids(
    url_at_0003,
):
    await _insert_old_rows(url_at_0003)

    await run_alembic(url_at_0003, "upgrade", "head")

    engine = make_engine(url_at_0003)
    sessions = make_session_factory(engine)
    try:
        async with sessions() as s:
            instances = {
                i.business_key: i
                for i in await s.scalars(select(ProcessInstance).order_by("business_key"))
            }
            visits = (await s.scalars(select(StageVisit).order_by(StageVisit.workflow_id))).all()
            ledger = (
                await s.execute(
                    select(LedgerEntry.idempotency_key, LedgerEntry.workflow_id).order_by(
                        LedgerEntry.idempotency_key
                    )
                )
            ).all()
            lines = (await s.execute(select(sa.func.count()).select_from(OLD_LINES))).scalar()
            order = await s.get(Order, "1001")
    finally:
        await engine.dispose()

    assert {k: (i.workflow_id, i.stage, i.status) for k, i in instances.items()} == {
        "1001": ("sales-order-1001", "closed", "completed"),
        "1002": ("sales-order-1002", "rejected", "completed"),
        "1003": ("sales_order-1003", "cancelled", "cancelled"),
        "1004": ("sales_order-1004", "failed", "failed"),
        "1005": ("sales_order-1005", "approval", "running"),
    }
    running = instances["1005"]
    assert running.process_type == "sales_order"
    assert (running.definition_kind, running.definition_version) == ("code", "")
    assert (running.requester, running.policy_version, running.revision) == ("vera", 1, 0)
    assert (running.started_at, running.stage_entered_at, running.updated_at) == (
        CREATED,
        UPDATED,
        UPDATED,
    )
    assert running.closed_at is None
    assert instances["1001"].closed_at == UPDATED
    assert running.summary == {
        "customer_id": "CUST-1005",
        "customer_name": "Customer 1005",
        "amount": "1234.50",
        "currency": "EUR",
        "special_change": True,
    }
    assert [(v.workflow_id, v.seq, v.stage, v.entered_at, v.left_at) for v in visits] == [
        (wid, 0, stage, UPDATED, None) for _, wid, stage, _ in sorted(ORDERS, key=lambda o: o[1])
    ]
    assert ledger == [
        ("ch-1001", "sales-order-1001"),
        ("ch-1005", "sales_order-1005"),
        ("ch-9999", None),
    ]
    # the orders were recreated on SQLite: their lines survived, the model reads them
    assert lines == 1
    assert order is not None and str(order.amount) == "1234.50"
    assert await inspect_db(url_at_0003, differences_from_models) == []


async def test_upgraded_orders_reference_their_instance(url_at_0003):
    await run_alembic(url_at_0003, "upgrade", "head")
    schema = await inspect_db(url_at_0003, _schema)
    assert schema["foreign_keys"] == {
        "orders": [("process_instances", ("workflow_id",), None)],
        "order_lines": [("orders", ("order_no",), "CASCADE")],
    }
    engine = make_engine(url_at_0003)
    try:
        with pytest.raises(IntegrityError):  # an order without its instance is refused
            async with engine.begin() as conn:
                await conn.execute(
                    OLD_ORDERS.insert(),
                    {"order_no": "1", "workflow_id": "sales_order-1", "customer_id": "C",
                     "customer_name": "C", "customer_email": "c@example.com",
                     "requester": "alice", "variant": "standard", "currency": "EUR",
                     "stage": "received", "amount": 1, "amount_due": 1, "special_change": False,
                     "policy_version": 1, "created_at": CREATED, "updated_at": CREATED},
                )  # fmt: skip
    finally:
        await engine.dispose()


async def test_downgrade_drops_what_the_upgrade_added_and_keeps_the_orders(url_at_0003):
    await _insert_old_rows(url_at_0003)
    schema_before = await inspect_db(url_at_0003, _schema)
    await run_alembic(url_at_0003, "upgrade", "head")

    await run_alembic(url_at_0003, "downgrade", "0003")

    assert await inspect_db(url_at_0003, _schema) == schema_before
    engine = make_engine(url_at_0003)
    try:
        async with engine.connect() as conn:
            orders = (
                await conn.execute(select(OLD_ORDERS.c.order_no).order_by(OLD_ORDERS.c.order_no))
            ).scalars()
            lines = (await conn.execute(select(sa.func.count()).select_from(OLD_LINES))).scalar()
            ledger = (await conn.execute(select(sa.func.count()).select_from(OLD_LEDGER))).scalar()
            assert (list(orders), lines, ledger) == ([no for no, *_ in ORDERS], 1, 3)
    finally:
        await engine.dispose()
    # and up again: the backfill runs on the same data a second time without a conflict
    await run_alembic(url_at_0003, "upgrade", "head")
    assert await inspect_db(url_at_0003, differences_from_models) == []
