"""Traces (issue 14): with tracing on, one decision is one trace, from the HTTP request through
the update and the workflow to the activities it causes; off (the default) nothing is traced."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core import tracing
from core.settings import Settings
from core.temporal import connect
from scripts.mailsink import MailSink
from tests.api.conftest import _running, order_body
from tests.support import seed_database

pytestmark = pytest.mark.timeout(120)


@pytest_asyncio.fixture
async def db_url(db_url: str) -> str:
    """The migrated database, seeded with the demo users and stock."""
    return await seed_database(db_url)


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """An in-memory exporter on the process's TracerProvider (set once, by configure_tracing)."""
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(
        Settings(tracing_enabled=True), "procflow-test", exporter=exporter
    )
    return exporter


def _settings(dev_env: WorkflowEnvironment, db_url: str, **kw) -> Settings:
    return Settings(
        database_url=db_url,
        task_queue=f"tracing-{uuid.uuid4()}",
        temporal_address=dev_env.client.service_client.config.target_host,
        update_wait_s=20.0,
        **kw,
    )


def _one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, sorted(s.name for s in spans))
    return found[0]


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _is_ancestor(ancestor: ReadableSpan, span: ReadableSpan, spans: Sequence[ReadableSpan]) -> bool:
    by_id = {s.context.span_id: s for s in spans}
    current: ReadableSpan | None = span
    while current is not None and current.parent is not None:
        if current.parent.span_id == ancestor.context.span_id:
            return True
        current = by_id.get(current.parent.span_id)
    return False


def _key(span: ReadableSpan) -> str:
    """A SendMail span's outbox key."""
    return str((span.attributes or {}).get("procflow.mail_key", ""))


async def _spans_until(
    exporter: InMemorySpanExporter, *names: str, mail_of: str = ""
) -> tuple[ReadableSpan, ...]:
    """The finished spans once every name is among them (the server span ends as the response
    has been sent), and a SendMail whose key holds `mail_of` if given; at most 10 s."""
    for _ in range(100):
        spans = exporter.get_finished_spans()
        mailed = not mail_of or any(s.name == "SendMail" and mail_of in _key(s) for s in spans)
        if set(names) <= {s.name for s in spans} and mailed:
            return spans
        await asyncio.sleep(0.1)
    return exporter.get_finished_spans()


async def test_one_decision_is_one_trace(
    dev_env: WorkflowEnvironment,
    db_url: str,
    sessions: async_sessionmaker,
    mail_sink: MailSink,
    exporter: InMemorySpanExporter,
) -> None:
    from activities.mail import SmtpSender
    from activities.payments import SandboxPaymentProvider
    from worker import build_worker

    settings = _settings(dev_env, db_url, tracing_enabled=True)
    client = await connect(settings)
    interceptors = client.config()["interceptors"]
    assert [type(i) for i in interceptors] == [tracing.DecisionTracingInterceptor]
    worker = build_worker(
        client,
        task_queue=settings.task_queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )
    # not given to the worker a second time (it takes the client's over: the spans below)
    assert list(worker.worker.config().get("interceptors", [])) == []
    # and opentelemetry passed through the workflow sandbox
    runner = worker.worker.config()["workflow_runner"]
    assert "opentelemetry" in runner.restrictions.passthrough_modules  # type: ignore[attr-defined]

    app = create_app(settings, temporal_client=client)
    async with worker:
        async for api in _running(app):
            exporter.clear()
            body = order_body(1_200_000)
            start = await api.post("/orders", "alice", json=body)
            assert start.status_code == 201, start.text
            task_id = start.json()["pending_tasks"][0]["task_id"]
            # a mail too, sent by the dispatcher after the response
            started = await _spans_until(exporter, "POST /orders", "SendMail")
            exporter.clear()

            r = await api.post(f"/tasks/{task_id}/decision", "victor", json={"outcome": "approved"})
            assert r.status_code == 200, r.text
            # and the sales director's task mail, sent later by the worker's dispatcher
            t2 = task_id.removesuffix(".t1") + ".t2"
            spans = await _spans_until(
                exporter,
                "POST /tasks/{task_id}/decision",
                "RunActivity:project",
                mail_of=f":task:{t2}:",
            )
            exporter.clear()
            for probe in ("/healthz", "/readyz", "/metrics"):
                assert (await api.http.get(probe)).status_code == 200, probe
            assert (await api.get("/orders", "alice")).status_code == 200
            # the order's status (a workflow query): the request is traced, the query not
            order_no = body["order_no"]
            assert (await api.get(f"/orders/{order_no}", "alice")).status_code == 200
            queried = await _spans_until(exporter, "GET /orders/{order_no}")
            quiet = [
                s for s in await _spans_until(exporter, "GET /orders") if "/orders" not in s.name
            ]

    # a server span per request, not one per ASGI message; the probes and scrapes untraced
    assert not [s.name for s in spans if s.name.endswith((" http send", " http receive"))]
    assert not [s.name for s in quiet], [s.name for s in quiet]
    assert not [s.name for s in queried if "Query" in s.name], [s.name for s in queried]

    # the order's start: the workflow's spans hang on the request that started it
    http_start = _one(started, "POST /orders")
    run = next(s for s in started if s.name.startswith("RunWorkflow:"))
    assert run.context.trace_id == http_start.context.trace_id
    assert _is_ancestor(http_start, run, started)
    # its mails (the customer's stage mails) are in the order's trace
    for mail in (s for s in started if s.name == "SendMail"):
        assert mail.context.trace_id == http_start.context.trace_id

    # the decision: one trace, HTTP -> update -> workflow -> the projection it caused
    http = _one(spans, "POST /tasks/{task_id}/decision")
    assert http.kind == SpanKind.SERVER and http.parent is None  # the root
    update = _one(spans, "StartWorkflowUpdate:decide")
    validate = _one(spans, "ValidateUpdate:decide")
    handle = _one(spans, "HandleUpdate:decide")
    project_starts = [s for s in spans if s.name == "StartActivity:project"]
    project_runs = [s for s in spans if s.name == "RunActivity:project"]
    assert project_starts and len(project_runs) == len(project_starts)

    decision = [http, update, validate, handle, *project_starts, *project_runs]
    assert {s.context.trace_id for s in decision} == {http.context.trace_id}
    assert update.kind == SpanKind.CLIENT and _is_ancestor(http, update, spans)
    assert _parent_id(validate) == update.context.span_id
    assert _parent_id(handle) == update.context.span_id
    # the workflow's start is linked, not the parent
    assert [link.context.span_id for link in handle.links] != []
    for started_span in project_starts:  # the local projection, from the main loop's step
        assert _parent_id(started_span) == handle.context.span_id
    starts = {s.context.span_id for s in project_starts}
    for ran in project_runs:
        assert _parent_id(ran) in starts
        assert ran.attributes is not None
        assert ran.attributes["temporalWorkflowID"] == start.json()["workflow_id"]
    # the mail the decision queued: sent by the dispatcher, in the decision's trace, the child
    # of the projection that queued it
    mails = [s for s in spans if s.name == "SendMail" and f":task:{t2}:" in _key(s)]
    assert mails, sorted(s.name for s in spans)
    runs = {s.context.span_id for s in project_runs}
    for late in (s for s in spans if s.name == "SendMail" and s not in mails):
        assert late.context.trace_id == http_start.context.trace_id  # the order's, sent late
    for mail in mails:
        assert mail.kind == SpanKind.CLIENT
        assert mail.context.trace_id == http.context.trace_id
        assert _parent_id(mail) in runs
        assert mail.attributes is not None
        assert mail.attributes["procflow.workflow_id"] == start.json()["workflow_id"]
        assert mail.attributes["procflow.recipients"] >= 1
    # nothing of the decision went to the order's trace
    assert all(s.context.trace_id == http.context.trace_id for s in spans if "decide" in s.name)


async def test_tracing_is_off_by_default_and_exports_nothing(
    dev_env: WorkflowEnvironment, db_url: str, exporter: InMemorySpanExporter
) -> None:
    assert Settings().tracing_enabled is False and Settings().otlp_endpoint == ""
    settings = _settings(dev_env, db_url)
    assert tracing.interceptors(settings) == []
    assert tracing.passthrough_modules(settings) == ()
    assert tracing.configure_tracing(settings, "procflow-test") is None
    client = await connect(settings)
    assert list(client.config()["interceptors"]) == []

    exporter.clear()  # on the process's provider: anything traced would land here
    app = create_app(settings, temporal_client=client)
    async for api in _running(app):
        r = await api.http.get("/healthz")
        assert r.status_code == 200, r.text
        handle = await client.start_workflow(
            "NoSuchWorkflow", id=f"untraced-{uuid.uuid4()}", task_queue=settings.task_queue
        )
        await handle.terminate()
    assert [(s.name, s.attributes) for s in exporter.get_finished_spans()] == []


async def test_otlp_endpoint_setting_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROCFLOW_TRACING_ENABLED", "true")
    monkeypatch.setenv("PROCFLOW_OTLP_ENDPOINT", "http://collector:4318/v1/traces")
    settings = Settings()
    assert settings.tracing_enabled and settings.otlp_endpoint.endswith("/v1/traces")
    assert [type(i) for i in tracing.interceptors(settings)] == [tracing.DecisionTracingInterceptor]
    assert tracing.passthrough_modules(settings) == ("opentelemetry",)
