"""Migration 0007 on SQLite and PostgreSQL: notification_outbox gains trace_context (null for
the rows queued before), as core/db.py has it; down to 0006 it is gone, the rows kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa

from core.db import make_engine
from tests.db.conftest import database_at, differences_from_models, run_alembic


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def url_at_0006(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with database_at(request, tmp_path, "0006") as url:
        yield url


async def _run(url: str, fn):  # type: ignore[no-untyped-def]
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def _columns(conn: sa.Connection) -> set[str]:
    return {c["name"] for c in sa.inspect(conn).get_columns("notification_outbox")}


def _queue_one(conn: sa.Connection) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO notification_outbox (idempotency_key, workflow_id, recipients, subject,"
            " body, status, created_at, attempts) VALUES ('k1', 'wf-1', '[]', 's', 'b',"
            " 'pending', CURRENT_TIMESTAMP, 0)"
        )
    )


def _trace_contexts(conn: sa.Connection) -> list:
    return list(conn.execute(sa.text("SELECT trace_context FROM notification_outbox")).scalars())


async def test_0007_adds_the_trace_context_and_takes_it_away_again(url_at_0006: str):
    await _run(url_at_0006, _queue_one)
    assert "trace_context" not in await _run(url_at_0006, _columns)

    await run_alembic(url_at_0006, "upgrade", "0007")
    assert "trace_context" in await _run(url_at_0006, _columns)
    assert await _run(url_at_0006, _trace_contexts) == [None]  # queued before: no trace
    await run_alembic(url_at_0006, "upgrade", "head")
    assert await _run(url_at_0006, differences_from_models) == []

    await run_alembic(url_at_0006, "downgrade", "0006")
    assert "trace_context" not in await _run(url_at_0006, _columns)
    count = await _run(
        url_at_0006,
        lambda c: c.execute(sa.text("SELECT count(*) FROM notification_outbox")).scalar_one(),
    )
    assert count == 1  # the row queued before is still there
