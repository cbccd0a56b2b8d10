"""Fault fixtures: a seeded database, and a registry of the OS processes a test starts (worker,
API, Temporal dev server) that are all stopped at its end whatever happened. The session's dev
server, the SMTP sink and the migrated database come from tests/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import async_sessionmaker

from core.db import make_engine, make_session_factory
from scripts.seed import seed
from tests.faults.processes import Proc


@pytest_asyncio.fixture
async def database(db_url: str) -> AsyncIterator[tuple[str, async_sessionmaker]]:
    """The migrated database, seeded (demo users, policy v1, stock), with its sessions."""
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    await seed(factory)
    try:
        yield db_url, factory
    finally:
        await engine.dispose()


class Processes:
    """Every process a test started, stopped in reverse order at teardown."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    def start(self, proc: Proc) -> Proc:
        proc.start()
        if proc not in self.started:
            self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()
