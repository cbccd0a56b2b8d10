"""The database layer: timestamps come back timezone-aware in UTC on SQLite too."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import select

from core.db import AuditEntry, Base, make_engine, make_session_factory


async def test_timestamps_are_read_back_aware_in_utc(tmp_path):
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = make_session_factory(engine)
    bucharest = timezone(timedelta(hours=2))
    at = datetime(2026, 11, 23, 17, 30, tzinfo=bucharest)
    async with sessions() as s, s.begin():
        s.add(AuditEntry(event_key="k", workflow_id="w", actor="a", action="x", at=at))
    async with sessions() as s:
        got = (await s.execute(select(AuditEntry.at))).scalar_one()
    await engine.dispose()
    assert got.tzinfo is not None
    assert got == at and got.astimezone(UTC).hour == 15
