"""A moment of read-only data (issue 11): the engine, the mail dispatcher, the readiness probe
and order starts, on SQLite and PostgreSQL.

The read-only spell is real: on SQLite the database's directory and files are made immutable
(`chattr +i`, as the tester did under `make run`; root sees no other permission stop a write);
on PostgreSQL `default_transaction_read_only` turns every session read-only (`ALTER SYSTEM` and a
reload: what a session sees on a standby), and, set on the database too, a session opened during
the spell stays read-only after it, as a SQLite connection that opened a read-only file does.
Without `chattr` (not root, or a filesystem without attributes) the SQLite tests are skipped, and
fail when CI is set.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from activities.mail import Send, SmtpSender
from activities.models import Notification
from activities.notifications import MailDispatcher, outbox_rows
from api.app import create_app
from core.db import Order, OutboxMessage, StockItem, make_engine, make_session_factory
from core.settings import Settings
from scripts.mailsink import MailSink
from tests.api.conftest import Api, order_body
from tests.support import seed_database
from workflows.sales_order import sales_order_workflow_id

# ------------------------------------------------------------------------------ the spell


def _chattr(flag: str, paths: list[Path]) -> None:
    try:
        subprocess.run(
            ["chattr", flag, *map(str, paths)], check=True, capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as err:
        stderr = getattr(err, "stderr", b"") or b""
        detail = f"chattr {flag} failed: {err} {stderr.decode(errors='replace')}".strip()
        if flag == "-i":  # the files must never stay immutable
            raise RuntimeError(detail) from err
        if os.environ.get("CI"):
            pytest.fail(f"cannot make the SQLite files read-only in CI: {detail}")
        pytest.skip(f"cannot make the SQLite files read-only (needs root and chattr): {detail}")


def _sqlite_files(db_url: str) -> list[Path]:
    """The directory and the files the tester froze: the database and its WAL."""
    path = Path(make_url(db_url).database or "")
    wal = path.with_name(path.name + "-wal")
    return [path.parent, path, *([wal] if wal.exists() else [])]


def _admin_dsn(db_url: str) -> dict:
    url = make_url(db_url)
    return {"host": url.host, "port": url.port, "user": url.username, "database": url.database}


async def _wait_pg_read_only(db_url: str, value: str) -> None:
    """Until a new session of the server sees default_transaction_read_only = value (then the
    postmaster has reloaded and signalled the running sessions too)."""
    async with asyncio.timeout(30):
        while True:
            conn = await asyncpg.connect(**_admin_dsn(db_url))
            try:
                if await conn.fetchval("SHOW default_transaction_read_only") == value:
                    return
            finally:
                await conn.close()
            await asyncio.sleep(0.05)


async def _pg_read_only(db_url: str, on: bool) -> None:
    # the admin session keeps writing whatever the server's default
    admin = await asyncpg.connect(
        **_admin_dsn(db_url), server_settings={"default_transaction_read_only": "off"}
    )
    database = '"' + str(make_url(db_url).database).replace('"', '""') + '"'
    try:
        if on:
            await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            await admin.execute(f"ALTER DATABASE {database} SET default_transaction_read_only = on")
        else:
            await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
            await admin.execute(f"ALTER DATABASE {database} RESET default_transaction_read_only")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    await _wait_pg_read_only(db_url, "on" if on else "off")


@asynccontextmanager
async def read_only(db_url: str) -> AsyncIterator[None]:
    """The database cannot be written inside the block; it can again after it."""
    if db_url.startswith("sqlite"):
        files = _sqlite_files(db_url)
        _chattr("+i", files)
        try:
            yield
        finally:
            _chattr("-i", files)
        return
    await _pg_read_only(db_url, True)
    try:
        yield
    finally:
        await _pg_read_only(db_url, False)


# ------------------------------------------------------------------------------ the engine


async def _add_item(sessions: async_sessionmaker, sku: str) -> None:
    async with sessions.begin() as session:
        session.add(StockItem(sku=sku, description=sku, on_hand=Decimal(1), reserved=0))


async def _skus(sessions: async_sessionmaker) -> list[str]:
    async with sessions() as session:
        return sorted(await session.scalars(select(StockItem.sku)))


async def test_the_same_engine_writes_again_after_a_read_only_spell(db_url: str):
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    try:
        await _add_item(sessions, "BEFORE")
        async with read_only(db_url):
            # several connections at once: new ones are opened while nothing can be written
            held = [await engine.connect() for _ in range(3)]
            for conn in held:
                await conn.close()
            for i in range(3):
                with pytest.raises(DBAPIError):
                    await _add_item(sessions, f"DURING-{i}")
        # more writes than the pool holds connections, each on whichever the pool gives
        for i in range(8):
            await _add_item(sessions, f"AFTER-{i}")
        assert await _skus(sessions) == sorted(["BEFORE", *(f"AFTER-{i}" for i in range(8))])
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------ the mail


class _Spell:
    """One read-only spell, begun from inside the dispatcher and ended by the test."""

    def __init__(self, db_url: str) -> None:
        self._cm = read_only(db_url)
        self.started = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self._cm.__aenter__()

    async def end(self) -> None:
        if self.started:
            await self._cm.__aexit__(None, None, None)


class _ReadOnlyAfterSession(SmtpSender):
    """The real SMTP sender; the first time one of its sessions has carried its mails, the
    database turns read-only (between the SMTP answers and the mark "sent")."""

    def __init__(self, sink: MailSink, spell: _Spell) -> None:
        super().__init__(sink.host, sink.port, timeout=5, mail_from="procflow@localhost")
        self._spell = spell

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Send]:
        async with super().connection() as send:
            yield send
        await self._spell.start()


async def test_a_dispatcher_whose_mark_failed_marks_first_and_sends_each_mail_once(
    db_url: str, sessions: async_sessionmaker, mail_sink: MailSink
):
    notes = [
        Notification(
            idempotency_key=f"sales_order-RO-1:mail:{i}",
            workflow_id="sales_order-RO-1",
            subject=f"mail {i}",
            body=f"body {i}",
            to_emails=["buyer@example.com"],
        )
        for i in range(3)
    ]
    async with sessions.begin() as session:
        await session.execute(
            insert(OutboxMessage), outbox_rows(notes, [["buyer@example.com"]] * 3, None)
        )
    spell = _Spell(db_url)
    # a short lease: were the rows claimable again, this dispatcher would claim them at once
    dispatcher = MailDispatcher(sessions, _ReadOnlyAfterSession(mail_sink, spell), lease_s=0.2)
    try:
        with pytest.raises(DBAPIError):
            await dispatcher.deliver_due()  # sent, then the mark fails
        assert spell.started
        assert len(mail_sink.messages) == 3
        with pytest.raises(DBAPIError):
            await dispatcher.deliver_due()  # still read-only: the mark fails again
    finally:
        await spell.end()
    await asyncio.sleep(0.5)  # every lease has ended
    while await dispatcher.deliver_due():
        pass
    assert sorted(m["Subject"] for m in mail_sink.messages) == [f"mail {i}" for i in range(3)]
    async with sessions() as session:
        rows = list(await session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))
    assert [(r.status, r.attempts) for r in rows] == [("sent", 0)] * 3
    assert all(r.sent_at for r in rows)
    assert dispatcher.sent == 3


# ------------------------------------------------------------------------------ the API


@pytest_asyncio.fixture
async def seeded_url(db_url: str) -> str:
    return await seed_database(db_url)


@pytest.fixture
def settings(seeded_url: str) -> Settings:
    # a start that waited for its first tasks would wait update_wait_s: longer than the
    # bound the tests give a start refused for the database
    return Settings(
        database_url=seeded_url,
        task_queue=f"ro-test-{uuid.uuid4()}",
        temporal_rpc_timeout_s=5.0,
        update_wait_s=60.0,
    )


@pytest_asyncio.fixture
async def api(settings: Settings, dev_env: WorkflowEnvironment) -> AsyncIterator[Api]:
    app: FastAPI = create_app(settings, temporal_client=dev_env.client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Api(http)


async def test_readyz_is_503_while_the_database_is_read_only_and_ok_after(
    seeded_url: str, api: Api
):
    r = await api.http.get("/readyz")
    assert r.status_code == 200, r.text
    async with read_only(seeded_url):
        r = await api.http.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json() == {"status": "unavailable", "database": "unavailable", "temporal": "ok"}
        assert r.headers["retry-after"]
    r = await api.http.get("/readyz")  # the same app, without a restart
    assert r.status_code == 200, r.text
    assert r.json()["database"] == "ok"


async def test_a_start_that_cannot_write_is_503_and_starts_no_workflow(
    seeded_url: str, settings: Settings, api: Api, dev_env: WorkflowEnvironment
):
    await api.login("alice")
    body = order_body()
    async with read_only(seeded_url):
        # bounded well below update_wait_s: a start that reached Temporal would wait that long
        async with asyncio.timeout(settings.temporal_rpc_timeout_s + 10):
            r = await api.post("/orders", "alice", json=body)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"]
    assert "database does not take writes" in r.json()["detail"]
    wid = sales_order_workflow_id(body["order_no"])
    with pytest.raises(RPCError) as err:
        await dev_env.client.get_workflow_handle(wid).describe()
    assert err.value.status == RPCStatusCode.NOT_FOUND
    engine = make_engine(seeded_url)
    try:
        async with make_session_factory(engine)() as session:
            assert await session.scalar(select(func.count()).select_from(Order)) == 0
    finally:
        await engine.dispose()
