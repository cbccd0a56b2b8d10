"""exact money: amounts as BIGINT cents, quantities as BIGINT thousandths

SQLite has no exact NUMERIC (it stored NUMERIC(18, 2) as a float: 99999999999999.74 read back
as .73), so every money column becomes a count of cents and every quantity a count of
thousandths (core/db.py `MinorUnits`), on SQLite and on PostgreSQL alike.

The stored values are converted, rounded half-up once from what the old column held: on
PostgreSQL its exact NUMERIC (`round(x * 100)`); on SQLite the float, an integer or a text,
read as the shortest decimal that gives the float back (the value the application wrote) and
scaled in Python with exact decimals, since SQLite's `round(x * 100)` on a float can land on
the wrong side of a half. The downgrade divides again; on SQLite the old column holds floats.

SQLite changes a column's type by recreating its table (batch mode). Dropping `orders` with
foreign keys enforced (core/db.py turns them on) would cascade into `order_lines`, and the
pragma cannot be turned off inside the migration's transaction, so `order_lines` gives up its
foreign key while `orders` is recreated and gets it back afterwards.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Context, Decimal

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY, QUANTITY = 2, 3  # decimal places: cents, thousandths

# table -> [(column, decimal places)]; order_lines before and after orders (see above)
COLUMNS: dict[str, list[tuple[str, int]]] = {
    "order_lines": [("quantity", QUANTITY), ("unit_price", MONEY)],
    "orders": [("amount", MONEY), ("amount_due", MONEY)],
    "payments_ledger": [("amount", MONEY)],
    "invoices": [("amount", MONEY)],
    "stock": [("on_hand", QUANTITY), ("reserved", QUANTITY)],
    "stock_reservations": [("quantity", QUANTITY)],
}

# the name PostgreSQL gave it; on SQLite 0001 left it unnamed, the convention names it
_ORDER_LINES_FK = "order_lines_order_no_fkey"
_NAMING = {"fk": "%(table_name)s_%(column_0_name)s_fkey"}
_EXACT = Context(prec=60)  # wide enough that no conversion step rounds


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _minor_units(value: float | int | str, places: int) -> int:
    """An old SQLite value as an integer count of 10**-places units, rounded half-up once."""
    exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    return int(_EXACT.scaleb(exact, places).quantize(Decimal(1), ROUND_HALF_UP, _EXACT))


def _rescale_sqlite_values(table: str, columns: list[tuple[str, int]]) -> None:
    names = ", ".join(name for name, _ in columns)
    rows = op.get_bind().execute(sa.text(f"SELECT rowid, {names} FROM {table}")).all()
    if not rows:
        return
    assignments = ", ".join(f"{name} = :{name}" for name, _ in columns)
    op.get_bind().execute(
        sa.text(f"UPDATE {table} SET {assignments} WHERE rowid = :rowid"),
        [
            {"rowid": row[0]}
            | {name: _minor_units(row[i + 1], places) for i, (name, places) in enumerate(columns)}
            for row in rows
        ],
    )


def _alter(table: str, to_minor_units: bool) -> None:
    sqlite = _sqlite()
    with op.batch_alter_table(table, naming_convention=_NAMING) as batch_op:
        if sqlite and table == "order_lines":
            batch_op.drop_constraint(_ORDER_LINES_FK, type_="foreignkey")
        for name, places in COLUMNS[table]:
            factor = 10**places
            numeric = sa.Numeric(precision=18, scale=places)
            batch_op.alter_column(
                name,
                existing_type=numeric if to_minor_units else sa.BigInteger(),
                type_=sa.BigInteger() if to_minor_units else numeric,
                existing_nullable=False,
                postgresql_using=(
                    f"round({name} * {factor})::bigint"
                    if to_minor_units
                    else f"{name}::numeric / {factor}"
                ),
            )


def _restore_order_lines_fk() -> None:
    if _sqlite():
        with op.batch_alter_table("order_lines") as batch_op:
            batch_op.create_foreign_key(
                _ORDER_LINES_FK, "orders", ["order_no"], ["order_no"], ondelete="CASCADE"
            )


def upgrade() -> None:
    if _sqlite():
        for table, columns in COLUMNS.items():
            _rescale_sqlite_values(table, columns)
    for table in COLUMNS:
        _alter(table, to_minor_units=True)
        if table == "orders":
            _restore_order_lines_fk()


def downgrade() -> None:
    for table in COLUMNS:
        _alter(table, to_minor_units=False)
        if table == "orders":
            _restore_order_lines_fk()
    if _sqlite():
        for table, columns in COLUMNS.items():
            assignments = ", ".join(f"{name} = {name} / {10**places}.0" for name, places in columns)
            op.execute(f"UPDATE {table} SET {assignments}")
