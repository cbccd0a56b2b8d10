"""Fixtures for the database suite: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from core.db import Base, make_engine
from scripts.migrate import alembic_config, ensure_sqlite_dir
from tests.support import PostgresServer


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """A fresh migrated database, SQLite and PostgreSQL in turn."""
    return any_db_url


async def run_alembic(url: str, action: str, revision: str) -> None:
    """`alembic upgrade|downgrade REVISION` on url (alembic's env.py runs its own event loop)."""
    await asyncio.to_thread(getattr(command, action), alembic_config(url), revision)


@asynccontextmanager
async def database_at(
    request: pytest.FixtureRequest, tmp_path: Path, revision: str
) -> AsyncIterator[str]:
    """A fresh database of the fixture's parameter ("sqlite" or "postgresql") migrated up to
    revision only: the schema a migration test starts from; dropped afterwards."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        ensure_sqlite_dir(url)
        await run_alembic(url, "upgrade", revision)
        yield url
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = await server.create_database()
    try:
        await run_alembic(url, "upgrade", revision)
        yield url
    finally:
        await server.drop_database(url)


async def inspect_db(url: str, fn):  # type: ignore[no-untyped-def]
    """fn(connection) on a connection of its own to url (sync, as sa.inspect needs)."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def differences_from_models(conn: sa.Connection) -> list:
    """What Alembic's autogenerate finds between the database and core/db.py ([]: none)."""
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return compare_metadata(context, Base.metadata)
