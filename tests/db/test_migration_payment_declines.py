"""Migration 0006 on SQLite and PostgreSQL: from 0005 up to head, payment_declines matches
core/db.py (its idempotency key unique, its workflow id indexed, amounts exact in cents); down
to 0005 it is gone and the rest of the schema is as 0005 left it, and up again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from core.db import PaymentDecline, make_engine, make_session_factory
from tests.db.conftest import database_at, differences_from_models, inspect_db, run_alembic

TABLE = "payment_declines"


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def url_at_0005(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with database_at(request, tmp_path, "0005") as url:
        yield url


def _tables(conn: sa.Connection) -> set[str]:
    return set(sa.inspect(conn).get_table_names())


def _indexes(conn: sa.Connection) -> dict[str, tuple[list[str], bool]]:
    return {
        ix["name"]: (ix["column_names"], bool(ix["unique"]))
        for ix in sa.inspect(conn).get_indexes(TABLE)
    }


def _decline(key: str, amount: str = "12.34") -> PaymentDecline:
    return PaymentDecline(
        idempotency_key=key,
        workflow_id="sales_order-SO-1",
        order_no="SO-1",
        kind="charge",
        amount=Decimal(amount),
        currency="EUR",
        reason="declined",
    )


async def test_upgrade_creates_payment_declines_as_the_model_has_it(url_at_0005: str):
    assert TABLE not in await inspect_db(url_at_0005, _tables)

    await run_alembic(url_at_0005, "upgrade", "head")

    assert TABLE in await inspect_db(url_at_0005, _tables)
    assert await inspect_db(url_at_0005, differences_from_models) == []
    assert (await inspect_db(url_at_0005, _indexes))["ix_payment_declines_workflow_id"] == (
        ["workflow_id"],
        False,
    )
    engine = make_engine(url_at_0005)
    sessions = make_session_factory(engine)
    try:
        async with sessions.begin() as s:
            s.add(_decline("k-1", "99999999.99"))
        async with sessions() as s:
            row = (await s.scalars(sa.select(PaymentDecline))).one()
            assert row.amount == Decimal("99999999.99") and row.created_at.tzinfo is not None
            stored = (await s.execute(sa.text(f"SELECT amount FROM {TABLE}"))).scalar_one()
            assert stored == 9999999999  # cents
        with pytest.raises(IntegrityError):  # one decline per idempotency key
            async with sessions.begin() as s:
                s.add(_decline("k-1"))
    finally:
        await engine.dispose()


async def test_downgrade_to_0005_drops_it_and_upgrade_brings_it_back(url_at_0005: str):
    before = await inspect_db(url_at_0005, _tables)
    await run_alembic(url_at_0005, "upgrade", "head")

    await run_alembic(url_at_0005, "downgrade", "0005")

    assert await inspect_db(url_at_0005, _tables) == before
    assert TABLE not in before
    await run_alembic(url_at_0005, "upgrade", "head")
    assert await inspect_db(url_at_0005, differences_from_models) == []
