"""Migration 0005 on SQLite and PostgreSQL: from an empty database up to head, the blueprint
tables match core/db.py (a version's process and seq are unique together, the current version
must be a stored one); down to 0004 they are gone, and up again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from core.db import BlueprintCurrent, BlueprintVersion, make_engine, make_session_factory
from tests.db.conftest import database_at, differences_from_models, inspect_db, run_alembic

AT = datetime(2026, 12, 8, 9, 0, tzinfo=UTC)
TABLES = {"blueprint_versions", "blueprint_current"}


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database with no schema at all (revision `base`)."""
    async with database_at(request, tmp_path, "base") as url:
        yield url


def _tables(conn: sa.Connection) -> set[str]:
    return set(sa.inspect(conn).get_table_names())


def _version(version: str, seq: int) -> BlueprintVersion:
    return BlueprintVersion(
        version=version,
        process="complaint",
        seq=seq,
        title="Customer complaint",
        document="{}",
        source=None,
        published_by="ada",
        published_at=AT,
        note="",
    )


async def test_upgrade_from_empty_creates_the_blueprint_tables_as_the_models_have_them(
    empty_url: str,
):
    await run_alembic(empty_url, "upgrade", "head")

    assert TABLES <= await inspect_db(empty_url, _tables)
    assert await inspect_db(empty_url, differences_from_models) == []
    engine = make_engine(empty_url)
    sessions = make_session_factory(engine)
    try:
        async with sessions() as s:
            s.add(_version("sha256:a", 1))
            await s.flush()
            s.add(BlueprintCurrent(process="complaint", version="sha256:a", updated_by="ada"))
            await s.commit()
            row = await s.get(BlueprintVersion, "sha256:a")
            assert row is not None and row.published_at == AT and row.source is None
        with pytest.raises(IntegrityError):  # the same seq twice in one process
            async with sessions() as s:
                s.add(_version("sha256:b", 1))
                await s.commit()
        with pytest.raises(IntegrityError):  # a current version that is not stored
            async with sessions() as s:
                s.add(BlueprintCurrent(process="other", version="sha256:none", updated_by="ada"))
                await s.commit()
    finally:
        await engine.dispose()


async def test_downgrade_to_0004_drops_them_and_upgrade_brings_them_back(empty_url: str):
    await run_alembic(empty_url, "upgrade", "0004")
    before = await inspect_db(empty_url, _tables)
    await run_alembic(empty_url, "upgrade", "head")

    await run_alembic(empty_url, "downgrade", "0004")

    assert await inspect_db(empty_url, _tables) == before
    assert not TABLES & before
    await run_alembic(empty_url, "upgrade", "head")
    assert await inspect_db(empty_url, differences_from_models) == []
    await run_alembic(empty_url, "downgrade", "base")
    assert await inspect_db(empty_url, _tables) <= {"alembic_version"}
