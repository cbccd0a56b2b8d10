"""Migration 0003 on SQLite and PostgreSQL: a database of the old schema (NUMERIC money and
quantities) with data in it is upgraded to integer minor units, reads back exactly through
the models, keeps its order lines, indexes and foreign key, matches core/db.py, and
downgrades again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy import select

from core.db import (
    Invoice,
    LedgerEntry,
    Order,
    OrderLine,
    StockItem,
    StockReservation,
    make_engine,
    make_session_factory,
)
from tests.db.conftest import database_at, differences_from_models, inspect_db, run_alembic

AT = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
MONEY, QUANTITY = sa.Numeric(18, 2), sa.Numeric(18, 3)

# the tables as 0002 left them, with the old column types (how the old code bound values:
# on SQLite, SQLAlchemy's NUMERIC stores a float)
_metadata = sa.MetaData()
OLD_ORDERS = sa.Table(
    "orders",
    _metadata,
    *(sa.Column(n, sa.String) for n in ("order_no", "workflow_id", "customer_id")),
    *(sa.Column(n, sa.String) for n in ("customer_name", "customer_email", "requester")),
    *(sa.Column(n, sa.String) for n in ("variant", "currency", "stage")),
    sa.Column("amount", MONEY),
    sa.Column("amount_due", MONEY),
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
    sa.Column("quantity", QUANTITY),
    sa.Column("unit_price", MONEY),
)
OLD_LEDGER = sa.Table(
    "payments_ledger",
    _metadata,
    *(sa.Column(n, sa.String) for n in ("idempotency_key", "order_no", "kind", "currency")),
    *(sa.Column(n, sa.String) for n in ("provider_ref", "status")),
    sa.Column("amount", MONEY),
    sa.Column("created_at", sa.DateTime(timezone=True)),
)
OLD_INVOICES = sa.Table(
    "invoices",
    _metadata,
    *(sa.Column(n, sa.String) for n in ("invoice_no", "order_no", "currency")),
    sa.Column("amount", MONEY),
    sa.Column("issued_at", sa.DateTime(timezone=True)),
)
OLD_STOCK = sa.Table(
    "stock",
    _metadata,
    sa.Column("sku", sa.String),
    sa.Column("description", sa.String),
    sa.Column("on_hand", QUANTITY),
    sa.Column("reserved", QUANTITY),
)
OLD_RESERVATIONS = sa.Table(
    "stock_reservations",
    _metadata,
    *(sa.Column(n, sa.String) for n in ("order_no", "sku", "status")),
    sa.Column("quantity", QUANTITY),
)


def _values(dialect: str) -> dict[str, Decimal]:
    """Values of the old schema: on PostgreSQL NUMERIC was exact, so the largest amounts; on
    SQLite it was a float, which holds these exactly enough to come back."""
    if dialect == "postgresql":
        return {
            "big": Decimal("99999999999999.74"),
            "small": Decimal("0.01"),
            "quantity": Decimal("999999999999999.999"),
            "fraction": Decimal("0.001"),
        }
    return {
        "big": Decimal("1234.56"),
        "small": Decimal("0.01"),
        "quantity": Decimal("10.125"),
        "fraction": Decimal("0.001"),
    }


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def url_at_0002(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database at revision 0002, the schema before exact money."""
    async with database_at(request, tmp_path, "0002") as url:
        yield url


async def _insert_old_rows(url: str, v: dict[str, Decimal]) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                OLD_ORDERS.insert(),
                [
                    {
                        "order_no": no,
                        "workflow_id": f"sales-order-{no}",
                        "customer_id": "CUST-1",
                        "customer_name": "ACME",
                        "customer_email": "buyer@acme.example",
                        "requester": "alice",
                        "variant": "standard",
                        "currency": "EUR",
                        "stage": "closed",
                        "amount": amount,
                        "amount_due": amount,
                        "special_change": False,
                        "policy_version": 1,
                        "created_at": AT,
                        "updated_at": AT,
                    }
                    for no, amount in (("1", v["big"]), ("2", v["small"]))
                ],
            )
            await conn.execute(
                OLD_LINES.insert(),
                [
                    {"order_no": "1", "line_no": 1, "sku": "SKU-A", "description": "",
                     "quantity": v["quantity"], "unit_price": v["big"]},
                    {"order_no": "1", "line_no": 2, "sku": "SKU-B", "description": "",
                     "quantity": v["fraction"], "unit_price": v["small"]},
                ],
            )  # fmt: skip
            await conn.execute(
                OLD_LEDGER.insert(),
                [
                    {"idempotency_key": key, "order_no": "1", "kind": kind, "currency": "EUR",
                     "provider_ref": key, "status": "captured", "amount": amount,
                     "created_at": AT}
                    for key, kind, amount in (("ch", "charge", v["big"]),
                                              ("re", "refund", v["small"]))
                ],
            )  # fmt: skip
            await conn.execute(
                OLD_INVOICES.insert(),
                {"invoice_no": "INV-1", "order_no": "1", "currency": "EUR", "amount": v["big"],
                 "issued_at": AT},
            )  # fmt: skip
            await conn.execute(
                OLD_STOCK.insert(),
                {"sku": "SKU-A", "description": "", "on_hand": v["quantity"],
                 "reserved": v["fraction"]},
            )  # fmt: skip
            await conn.execute(
                OLD_RESERVATIONS.insert(),
                {"order_no": "1", "sku": "SKU-A", "status": "held", "quantity": v["fraction"]},
            )
    finally:
        await engine.dispose()


async def _read_through_models(url: str) -> dict[str, list[str]]:
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        async with sessions() as s:
            orders = (
                await s.execute(select(Order.amount, Order.amount_due).order_by(Order.order_no))
            ).all()
            lines = (
                await s.execute(
                    select(OrderLine.quantity, OrderLine.unit_price).order_by(OrderLine.line_no)
                )
            ).all()
            ledger = await s.scalars(
                select(LedgerEntry.amount).order_by(LedgerEntry.idempotency_key)
            )
            invoices = await s.scalars(select(Invoice.amount))
            stock = (await s.execute(select(StockItem.on_hand, StockItem.reserved))).all()
            held = await s.scalars(select(StockReservation.quantity))
            return {
                "orders": [str(x) for row in orders for x in row],
                "order_lines": [str(x) for row in lines for x in row],
                "payments_ledger": [str(x) for x in ledger],
                "invoices": [str(x) for x in invoices],
                "stock": [str(x) for row in stock for x in row],
                "stock_reservations": [str(x) for x in held],
            }  # fmt: skip
    finally:
        await engine.dispose()


def _expected(v: dict[str, Decimal]) -> dict[str, list[str]]:
    big, small, quantity, fraction = (str(v[k]) for k in ("big", "small", "quantity", "fraction"))
    return {
        "orders": [big, big, small, small],
        "order_lines": [quantity, big, fraction, small],
        "payments_ledger": [big, small],  # ch, re
        "invoices": [big],
        "stock": [quantity, fraction],
        "stock_reservations": [fraction],
    }


def _schema(conn: sa.Connection) -> dict[str, object]:
    inspector = sa.inspect(conn)
    return {
        "indexes": {
            t: sorted(ix["name"] or "" for ix in inspector.get_indexes(t))
            for t in ("orders", "order_lines", "payments_ledger", "stock_reservations")
        },
        "order_lines_fk": [
            (fk["referred_table"], fk["constrained_columns"], fk["options"].get("ondelete"))
            for fk in inspector.get_foreign_keys("order_lines")
        ],
    }


async def test_upgrade_converts_existing_money_and_quantities_exactly(url_at_0002):
    dialect = sa.make_url(url_at_0002).get_backend_name()
    values = _values(dialect)
    await _insert_old_rows(url_at_0002, values)
    schema_before = await inspect_db(url_at_0002, _schema)

    await run_alembic(url_at_0002, "upgrade", "0003")

    assert await _read_through_models(url_at_0002) == _expected(values)
    engine = make_engine(url_at_0002)
    try:
        async with engine.connect() as conn:
            stored = (
                await conn.execute(
                    sa.text("SELECT amount, amount_due FROM orders ORDER BY order_no")
                )
            ).all()
    finally:
        await engine.dispose()
    cents = int(values["big"] * 100)
    assert [tuple(row) for row in stored] == [(cents, cents), (1, 1)]
    # SQLite recreated orders: its order lines survived, indexes and the foreign key are back
    assert await inspect_db(url_at_0002, _schema) == schema_before
    # and the later migrations bring it to the models (0004 on data converted by 0003)
    await run_alembic(url_at_0002, "upgrade", "head")
    assert await _read_through_models(url_at_0002) == _expected(values)
    assert await inspect_db(url_at_0002, differences_from_models) == []


async def test_downgrade_gives_the_old_columns_their_values_back(url_at_0002):
    dialect = sa.make_url(url_at_0002).get_backend_name()
    values = _values(dialect)
    await _insert_old_rows(url_at_0002, values)
    schema_before = await inspect_db(url_at_0002, _schema)
    await run_alembic(url_at_0002, "upgrade", "head")

    await run_alembic(url_at_0002, "downgrade", "0002")

    engine = make_engine(url_at_0002)
    try:
        async with engine.connect() as conn:
            amounts = (
                (await conn.execute(select(OLD_ORDERS.c.amount).order_by(OLD_ORDERS.c.order_no)))
                .scalars()
                .all()
            )
            quantities = (
                (await conn.execute(select(OLD_LINES.c.quantity).order_by(OLD_LINES.c.line_no)))
                .scalars()
                .all()
            )
    finally:
        await engine.dispose()  # fmt: skip
    assert [str(a) for a in amounts] == [str(values["big"]), str(values["small"])]
    assert [str(q) for q in quantities] == [str(values["quantity"]), str(values["fraction"])]
    assert await inspect_db(url_at_0002, _schema) == schema_before


async def test_upgrade_rounds_sqlite_values_half_up_once(tmp_path):
    """SQLite kept whatever it was given: a float of three places in a money column is read as
    the decimal that was written (1.005, not the float just below it) and rounded half-up,
    where SQLite's own round(1.005 * 100) would give 1.00."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    await run_alembic(url, "upgrade", "0002")
    values = {"big": Decimal("1.005"), "small": Decimal("2.675"), "quantity": Decimal("0.0125"),
              "fraction": Decimal("7")}  # fmt: skip
    await _insert_old_rows(url, values)

    await run_alembic(url, "upgrade", "head")

    got = await _read_through_models(url)
    assert got["orders"] == ["1.01", "1.01", "2.68", "2.68"]
    assert got["order_lines"] == ["0.013", "1.01", "7.000", "2.68"]
