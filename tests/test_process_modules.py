"""PROCFLOW_PROCESS_MODULES: coded process types beyond the built-in ones, imported at start-up
by the worker and the API (each module registers its types as it is imported). The bench's
hand-coded complaint (bench/coded_complaint.py) is the module: the API lists it, the worker
runs it, and one complaint goes through the API to its end on that worker."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from api.app import create_app
from core.db import ProcessInstance
from core.settings import ProcessModuleError, Settings, import_process_modules
from scripts.mailsink import MailSink
from scripts.seed import DEMO_PASSWORD
from tests.support import seed_database
from workflows import registry

pytestmark = pytest.mark.timeout(120)

MODULE = "bench.coded_complaint"
TYPE = "coded_complaint"


@pytest.fixture
def unregistered() -> Iterator[None]:
    """The coded complaint neither imported nor registered before and after the test."""

    def forget() -> None:
        sys.modules.pop(MODULE, None)
        if TYPE in registry.PROCESS_TYPES:
            registry.unregister(TYPE)

    forget()
    try:
        yield
    finally:
        forget()


@pytest.fixture
def client(dev_env: WorkflowEnvironment) -> Client:
    return dev_env.client


@pytest_asyncio.fixture
async def seeded(db_url: str) -> str:
    return await seed_database(db_url)


@pytest.fixture
def settings(seeded: str) -> Settings:
    return Settings(
        database_url=seeded,
        task_queue=f"modules-{uuid.uuid4()}",
        process_modules=[MODULE],
        update_wait_s=20.0,
    )


@pytest_asyncio.fixture
async def http(
    settings: Settings, client: Client, unregistered: None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with the coded complaint among its process modules, over ASGITransport."""
    app = create_app(settings, temporal_client=client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as h:
            yield h


async def _headers(http: httpx.AsyncClient, user: str) -> dict[str, str]:
    r = await http.post("/auth/token", data={"username": user, "password": DEMO_PASSWORD})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def test_the_setting_takes_a_comma_separated_or_a_json_list(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PROCFLOW_PROCESS_MODULES", " bench.coded_complaint , other.module ")
    assert Settings().process_modules == [MODULE, "other.module"]
    monkeypatch.setenv("PROCFLOW_PROCESS_MODULES", '["bench.coded_complaint"]')
    assert Settings().process_modules == [MODULE]
    monkeypatch.delenv("PROCFLOW_PROCESS_MODULES")
    assert Settings().process_modules == []


def test_a_module_that_cannot_be_imported_stops_the_api_naming_the_setting(db_url: str):
    settings = Settings(database_url=db_url, process_modules=["no_such_package.processes"])
    with pytest.raises(ProcessModuleError, match="PROCFLOW_PROCESS_MODULES") as caught:
        create_app(settings)
    assert "no_such_package.processes" in str(caught.value)
    with pytest.raises(ProcessModuleError, match="no_such_package"):
        import_process_modules(["no_such_package.processes"])


async def test_a_module_that_cannot_be_imported_stops_the_worker_naming_the_setting(
    client: Client, sessions: async_sessionmaker, mail_sink: MailSink
):
    from worker import build_worker

    with pytest.raises(ProcessModuleError, match="PROCFLOW_PROCESS_MODULES"):
        build_worker(
            client,
            task_queue=f"modules-{uuid.uuid4()}",
            session_factory=sessions,
            sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
            provider=SandboxPaymentProvider(sessions),
            process_modules=["no_such_package.processes"],
        )


async def test_the_api_lists_the_type_of_a_process_module(http: httpx.AsyncClient):
    r = await http.get("/process-types", headers=await _headers(http, "alice"))
    assert r.status_code == 200, r.text
    listed = {t["name"]: t for t in r.json()}
    assert {"sales_order", "complaint", TYPE} <= set(listed)
    coded = listed[TYPE]
    assert set(coded["start_schema"]["required"]) == {
        "ticket_no",
        "company_name",
        "customer_email",
        "channel",
        "summary",
    }
    assert [e["name"] for e in coded["events"]] == ["feedback_received"]


async def test_the_worker_runs_the_type_of_a_process_module_through_the_api(
    http: httpx.AsyncClient,
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker,
    mail_sink: MailSink,
):
    from worker import build_worker

    w = build_worker(
        client,
        task_queue=settings.task_queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
        process_modules=[MODULE],
    )
    coded = sys.modules[MODULE].CodedComplaintWorkflow
    config = w.worker.config()
    assert coded in config["workflows"]
    # imported once, like the workflows package: not again per instance inside the sandbox
    runner = config["workflow_runner"]
    assert isinstance(runner, SandboxedWorkflowRunner)
    assert MODULE in runner.restrictions.passthrough_modules
    assert TYPE in w.reconciler.process_types
    ticket = f"T-{uuid.uuid4().hex[:10].upper()}"
    body = {
        "ticket_no": ticket,
        "company_name": "ACME Ltd",
        "customer_email": "buyer@acme.example",
        "channel": "web",
        "summary": "The mugs arrived broken.",
    }
    async with w:
        alice, stan = await _headers(http, "alice"), await _headers(http, "stan")
        r = await http.post(f"/processes/{TYPE}", json=body, headers=alice)
        assert r.status_code == 201, r.text
        wid = r.json()["workflow_id"]
        assert r.json()["pending_tasks"][0]["task_id"] == f"{wid}.t1"
        for n, outcome, fields in (
            (1, "acknowledged", {}),
            (2, "recorded", {"category": "service", "severity": "low"}),
            (3, "resolved", {"resolution": "Sent new mugs."}),
        ):
            task_id = f"{wid}.t{n}"
            await _until(lambda t=task_id: _open(http, stan, t), f"task {task_id} open")
            r = await http.post(
                f"/tasks/{task_id}/decision",
                json={"outcome": outcome, "fields": fields},
                headers=stan,
            )
            assert r.status_code == 200, r.text
        r = await http.post(f"/tasks/{wid}.t2/decision", json={"outcome": "recorded"}, headers=stan)
        assert r.status_code == 409, r.text  # decided already
        event = f"/processes/{TYPE}/{ticket}/events/feedback_received"

        async def heard_back() -> bool:
            r = await http.post(event, json={"score": 5}, headers=alice)
            assert r.status_code in (202, 409), r.text
            return r.status_code == 202

        await _until(heard_back, "the feedback event taken")

        async def closed() -> bool:
            async with sessions() as s:
                row = await s.scalar(
                    select(ProcessInstance).where(ProcessInstance.workflow_id == wid)
                )
            return row is not None and (row.stage, row.status) == ("closed", "completed")

        await _until(closed, "the read model's closed complaint")
        assert await client.get_workflow_handle(wid).result() == "closed"
        # the acknowledgement and the status, through the catalog's activity and SMTP
        await _until(lambda: _mails_to(mail_sink, body["customer_email"], 2), "two mails")


async def _open(http: httpx.AsyncClient, headers: dict[str, str], task_id: str) -> bool:
    r = await http.get(f"/tasks/{task_id}", headers=headers)
    return r.status_code == 200 and r.json()["status"] == "open"


async def _mails_to(sink: MailSink, address: str, n: int) -> bool:
    return len([m for m in sink.messages if address in m["To"]]) >= n


async def _until(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.2)
