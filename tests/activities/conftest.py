"""Fixtures for activity unit tests: a migrated SQLite file database and a loopback mail sink."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

# `pytest` (unlike `python -m pytest`) does not put the project root on sys.path and the
# project is not installed in the venv; pyproject could say `pythonpath = ["."]` instead.
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sqlalchemy.ext.asyncio import async_sessionmaker  # noqa: E402
from temporalio.testing import ActivityEnvironment  # noqa: E402

from core.db import StockItem, make_engine, make_session_factory  # noqa: E402
from scripts.mailsink import MailSink  # noqa: E402
from scripts.migrate import upgrade  # noqa: E402


@pytest.fixture
async def db_url(tmp_path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'records.db'}"
    # env.py runs its own event loop (asyncio.run): keep it off this test's loop
    await asyncio.to_thread(upgrade, url)
    return url


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[async_sessionmaker]:
    engine = make_engine(db_url)
    try:
        yield make_session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def activity_env() -> ActivityEnvironment:
    return ActivityEnvironment()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mail_sink(tmp_path) -> Iterator[MailSink]:
    sink = MailSink("127.0.0.1", free_port(), tmp_path / "mail")
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
async def stock(sessions: async_sessionmaker) -> dict[str, Decimal]:
    levels = {"SKU-A": Decimal(10), "SKU-B": Decimal(5)}
    async with sessions.begin() as session:
        for sku, on_hand in levels.items():
            session.add(StockItem(sku=sku, description=sku, on_hand=on_hand, reserved=0))
    return levels
