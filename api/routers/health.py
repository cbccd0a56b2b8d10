"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from datetime import timedelta
from pathlib import Path

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.errors import TemporalUnavailable
from api.schemas import Health

log = logging.getLogger("procflow.api")

router = APIRouter(tags=["health"])

# PostgreSQL: a row lock needs a transaction that may write (refused on a standby or in a
# read-only session) and writes nothing; SKIP LOCKED: probes never queue behind each other;
# alembic_version is there once the schema is
_PG_WRITE_PROBE = "SELECT version_num FROM alembic_version FOR UPDATE SKIP LOCKED"


# SQLite: a page written (and rolled back) in a transaction that holds the write lock; the
# lock alone is not enough, as a connection that opened the file read-only takes it too
_SQLITE_WRITE_PROBE = "UPDATE alembic_version SET version_num = version_num"


def _sqlite_takes_write(path: str, timeout_s: float) -> None:
    """A new connection to the file writes a page under SQLite's write lock, rolled back.

    A new connection, not a pooled one: one opened before the file became read-only still
    writes its cache and only its commit fails; a new one opens the file read-only and is
    refused at the first page it writes.
    """
    uri = f"{Path(path).absolute().as_uri()}?mode=rw"  # never creates the file
    conn = sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_SQLITE_WRITE_PROBE)
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


async def database_takes_write(engine: AsyncEngine, timeout_s: float) -> None:
    """Raise (sqlalchemy/sqlite3 OperationalError, TimeoutError) unless the database takes a
    write within timeout_s; nothing is written (the write transaction is rolled back)."""
    async with asyncio.timeout(timeout_s):
        if engine.dialect.name == "sqlite":
            path = engine.url.database
            if path and path != ":memory:":
                await asyncio.to_thread(_sqlite_takes_write, path, timeout_s)
                return
            async with engine.connect() as conn:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
                await conn.exec_driver_sql(_SQLITE_WRITE_PROBE)
                await conn.rollback()
            return
        async with engine.connect() as conn:
            bound_ms = max(1, int(timeout_s * 1000))
            await conn.execute(text(f"SET LOCAL statement_timeout = {bound_ms}"))
            await conn.execute(text(_PG_WRITE_PROBE))
            await conn.rollback()


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "the database or Temporal is down"}},
)
async def readyz(request: Request, response: Response) -> Health:
    """Readiness: the database takes a write (rolled back) and the Temporal frontend reports
    healthy."""
    settings = request.app.state.settings
    timeout = settings.temporal_rpc_timeout_s
    db_ok = temporal_ok = False
    try:
        await database_takes_write(request.app.state.engine, timeout)
        db_ok = True
    except Exception as err:  # noqa: BLE001 - any failure means not ready
        log.warning("readiness: the database does not take writes: %s", err)
    try:
        client = await request.app.state.temporal.get()
        temporal_ok = await client.service_client.check_health(timeout=timedelta(seconds=timeout))
    except (TemporalUnavailable, Exception):  # noqa: BLE001
        pass
    ok = db_ok and temporal_ok
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "5"
    return Health(
        status="ok" if ok else "unavailable",
        database="ok" if db_ok else "unavailable",
        temporal="ok" if temporal_ok else "unavailable",
    )
