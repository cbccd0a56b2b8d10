"""Fixtures for API tests: the local Temporal dev server (one per session), and per test a
fresh task queue, a migrated and seeded SQLite database, a loopback SMTP sink, the real worker
and the app driven by httpx through ASGITransport inside its lifespan.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core.settings import Settings
from scripts.mailsink import MailSink
from scripts.seed import DEMO_PASSWORD
from tests.support import free_port, seed_database


@pytest_asyncio.fixture(scope="session")
async def temporal_env(dev_env: WorkflowEnvironment) -> WorkflowEnvironment:
    return dev_env


@pytest.fixture
def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def task_queue() -> str:
    return f"api-test-{uuid.uuid4()}"


@pytest_asyncio.fixture
async def db_url(db_url: str) -> str:
    """The migrated database of tests/conftest.py, seeded with the demo users and stock."""
    return await seed_database(db_url)


@pytest.fixture
def settings(db_url: str, task_queue: str) -> Settings:
    return Settings(database_url=db_url, task_queue=task_queue, update_wait_s=20.0)


@pytest_asyncio.fixture
async def worker(
    client: Client, task_queue: str, sessions: async_sessionmaker, mail_sink: MailSink
) -> AsyncIterator[None]:
    """The real worker (workflows and activities) on this test's task queue."""
    from activities.mail import SmtpSender
    from activities.payments import SandboxPaymentProvider
    from worker import build_worker

    w = build_worker(
        client,
        task_queue=task_queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )
    async with w:
        yield


@dataclass
class Api:
    """An httpx client on the app that signs in demo users on demand."""

    http: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)

    async def login(self, username: str) -> dict[str, str]:
        if username not in self.tokens:
            r = await self.http.post(
                "/auth/token", data={"username": username, "password": DEMO_PASSWORD}
            )
            assert r.status_code == 200, r.text
            self.tokens[username] = r.json()["access_token"]
        return {"Authorization": f"Bearer {self.tokens[username]}"}

    async def get(self, url: str, as_: str, **kw) -> httpx.Response:
        return await self.http.get(url, headers=await self.login(as_), **kw)

    async def post(self, url: str, as_: str, **kw) -> httpx.Response:
        return await self.http.post(url, headers=await self.login(as_), **kw)


async def _running(app: FastAPI) -> AsyncIterator[Api]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Api(http)


@pytest_asyncio.fixture
async def app(settings: Settings, client: Client) -> FastAPI:
    return create_app(settings, temporal_client=client)


@pytest_asyncio.fixture
async def api(app: FastAPI) -> AsyncIterator[Api]:
    """The app against the dev server, without a worker (nothing progresses)."""
    async for a in _running(app):
        yield a


@pytest_asyncio.fixture
async def live_api(app: FastAPI, worker: None) -> AsyncIterator[Api]:
    """The app with the real worker running on the test's task queue."""
    async for a in _running(app):
        yield a


@pytest_asyncio.fixture
async def dead_temporal_api(db_url: str) -> AsyncIterator[Api]:
    """An app whose Temporal address is a closed port."""
    settings = Settings(
        database_url=db_url,
        temporal_address=f"127.0.0.1:{free_port()}",
        temporal_rpc_timeout_s=2.0,
    )
    async for a in _running(create_app(settings)):
        yield a


def order_body(amount: int | str = 1_200_000, *, order_no: str | None = None, **extra) -> dict:
    """A valid OrderDetails body: one line of SKU-PRINTER for amount."""
    body = {
        "order_no": order_no or f"T{uuid.uuid4().hex[:10]}",
        "customer": {
            "id": "CUST-ACME",
            "company_name": "ACME Ltd",
            "contact_phone": "+49 30 1234567",
            "email": "buyer@acme.example",
        },
        "lines": [{"sku": "SKU-PRINTER", "quantity": "1", "unit_price": str(amount)}],
        "currency": "EUR",
    }
    body.update(extra)
    return body
