"""Health probes shared by the API and the worker (issue 14).

`database_takes_write` and `temporal_answers` are the readiness checks both use; `HealthServer`
serves `GET /healthz` (liveness) and `GET /readyz` (readiness) for a process that has no HTTP
server of its own: the worker (PROCFLOW_WORKER_HEALTH_ADDRESS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger("procflow.health")

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


async def database_ok(engine: AsyncEngine, timeout_s: float) -> bool:
    """`database_takes_write` as a yes or no (the reason logged as a warning)."""
    try:
        await database_takes_write(engine, timeout_s)
    except Exception as err:  # noqa: BLE001 - any failure means not ready
        log.warning("readiness: the database does not take writes: %s", err)
        return False
    return True


async def temporal_answers(client: Any, timeout_s: float) -> bool:
    """The Temporal frontend reports healthy within timeout_s (a `temporalio.client.Client`)."""
    try:
        return bool(await client.service_client.check_health(timeout=timedelta(seconds=timeout_s)))
    except Exception as err:  # noqa: BLE001 - unreachable, refused, timed out: not ready
        log.warning("readiness: Temporal does not answer: %s", err)
        return False


Checks = Mapping[str, bool]


def _answer(parts: Checks) -> JSONResponse:
    ok = all(parts.values())
    body = {"status": "ok" if ok else "unavailable"}
    body |= {name: "ok" if up else "unavailable" for name, up in parts.items()}
    headers = {} if ok else {"Retry-After": "5"}
    return JSONResponse(body, status_code=200 if ok else 503, headers=headers)


class _QuietServer(uvicorn.Server):
    """uvicorn inside a process that owns its signals (the worker stops it itself)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HealthServer:
    """GET /healthz and GET /readyz on `address` (host:port).

    `live()` names the parts that must be running (200 when all are, else 503 naming the one
    that is not); `ready()` adds what the process needs from outside (Temporal, the database).
    Both answer JSON: {"status": "ok" | "unavailable", "<part>": "ok" | "unavailable", ...}.
    An address that cannot be bound is logged and the process runs without the endpoint."""

    def __init__(
        self,
        address: str,
        live: Callable[[], Checks],
        ready: Callable[[], Awaitable[Checks]],
    ) -> None:
        self.address = address
        self._live = live
        self._ready = ready
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    async def _healthz(self, request: Request) -> JSONResponse:
        return _answer(self._live())

    async def _readyz(self, request: Request) -> JSONResponse:
        return _answer(await self._ready())

    def _bind(self) -> socket.socket | None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit():
            log.error("health address %r is not host:port; no health endpoint", self.address)
            return None
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), int(port)))
        except OSError as err:
            sock.close()
            log.error(
                "health address %s cannot be bound (%s); no health endpoint", self.address, err
            )
            return None
        return sock

    async def start(self) -> bool:
        """Serve in the background; False (and logged) when the address cannot be bound."""
        sock = self._bind()
        if sock is None:
            return False
        self.port = sock.getsockname()[1]
        app = Starlette(routes=[Route("/healthz", self._healthz), Route("/readyz", self._readyz)])
        config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, log_level="warning"
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="health")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():  # it could not start; its error is logged by uvicorn
            await asyncio.gather(self._task, return_exceptions=True)
            return False
        log.info("health at http://%s/healthz and /readyz", self.address)
        return True

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self._server = self._task = None
