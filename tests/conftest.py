"""Fixtures shared by every test folder: the Temporal dev server (one per session), a SQLite
database migrated by Alembic (or, through any_db_url, each of SQLite and PostgreSQL; one
PostgreSQL server per session), and a real SMTP server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from core.db import make_engine, make_session_factory
from core.temporal import AMOUNT, CUSTOMER_ID, PENDING_ROLES, PROCESS_TYPE, REQUESTER, STAGE
from scripts.mailsink import MailSink
from tests.support import (
    ADDITIVE,
    FIGURES,
    PostgresServer,
    binary,
    free_port,
    migrated_sqlite,
    record_figure,
    require_postgres_bindir,
)


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """The real Temporal dev server with this project's search attributes."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        search_attributes=[PROCESS_TYPE, STAGE, CUSTOMER_ID, AMOUNT, PENDING_ROLES, REQUESTER],
        data_converter=pydantic_data_converter,
        ui=False,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, started from the installed binaries.

    Without them the PostgreSQL tests fail when CI is set (CI must never skip them silently)
    and are skipped otherwise.
    """
    server = PostgresServer(require_postgres_bindir()).init()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


async def _sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file at the newest migration (a copy of one Alembic migrated once)."""
    return await migrated_sqlite(tmp_path / "procflow.db")


@pytest_asyncio.fixture
async def db_url(tmp_path: Path) -> str:
    """A fresh SQLite file at the newest migration."""
    return await _sqlite_url(tmp_path)


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database at the newest migration, once on SQLite and once on PostgreSQL (a new
    database with a random name on the session's server); folders that override `db_url`
    with it run their database tests on both."""
    if request.param == "sqlite":
        yield await _sqlite_url(tmp_path)
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = await server.migrated_database()
    try:
        yield url
    finally:
        await server.drop_database(url)


@pytest_asyncio.fixture
async def sessions(db_url: str) -> AsyncIterator[async_sessionmaker]:
    engine = make_engine(db_url)
    try:
        yield make_session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def mail_sink(tmp_path: Path) -> Iterator[MailSink]:
    sink = MailSink("127.0.0.1", free_port(), tmp_path / "mail")
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


# The longest files run first, so that the pytest-xdist workers run the short ones beside them
# rather than one long file alone at the end (make test uses --dist loadfile).
LONGEST_FIRST = (
    "tests/workflows/test_continue_as_new.py",  # 5,000 updates in a row, about 150 s
    "tests/faults/test_worker_kill.py",
    "tests/test_run_stack_crashes.py",
    "tests/workflows/test_policy_property.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        return rank.get(item.nodeid.split("::", 1)[0], len(rank))

    items.sort(key=key)  # stable: the order within a file and among the others stays


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its figures to the controller, which prints them."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["procflow_figures"] = dict(FIGURES)
        workeroutput["procflow_additive"] = sorted(ADDITIVE)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """Controller side of pytest-xdist: merge a finished worker's figures."""
    output = getattr(node, "workeroutput", {}) or {}
    additive = set(output.get("procflow_additive", []))
    for name, value in output.get("procflow_figures", {}).items():
        if name in additive and isinstance(value, int | float):
            record_figure(name, value, add=True)
        else:
            FIGURES[name] = value


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the figures that the reliability and security tests recorded."""
    if not FIGURES:
        return
    terminalreporter.section("procflow figures")
    for name in sorted(FIGURES):
        terminalreporter.write_line(f"{name}: {FIGURES[name]}")
