"""Prometheus metrics (issue 14): the API's request and business series after driving instances
through the real app and worker, a scrape that cannot reach the database, and the worker's
Temporal SDK metrics on its own endpoint."""

# ruff: noqa: F811 - the API tests' fixtures are imported here, and named as parameters

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.app import create_app
from core.db import LedgerEntry, OutboxMessage, PaymentDecline
from core.settings import Settings
from core.temporal import connect

# the fixtures of the API tests: the app, the real worker on a fresh task queue, a seeded db
from tests.api.conftest import (  # noqa: F401 - fixtures
    Api,
    _running,
    api,
    app,
    client,
    db_url,
    live_api,
    order_body,
    settings,
    task_queue,
    temporal_env,
    worker,
)
from tests.api.test_orders_e2e import _wait_for_stage
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient) -> tuple[dict, Samples]:
    """GET /metrics parsed: the families by name, and every sample by (name, labels)."""
    r = await http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def parse(text: str) -> tuple[dict, Samples]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples: Samples = {}
    for family in families.values():
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def L(**labels: str) -> frozenset[tuple[str, str]]:  # noqa: N802 - reads like a label set
    return frozenset(labels.items())


async def test_request_and_business_series_after_driving_orders(
    live_api: Api, sessions: async_sessionmaker
):
    api = live_api
    # one order approved by the vice-president runs to its end; one waits for its approval
    done, waiting = order_body(600_000), order_body(1_200_000)
    r = await api.post("/orders", "alice", json=done)
    assert r.status_code == 201, r.text
    task_id = r.json()["pending_tasks"][0]["task_id"]
    r = await api.post("/orders", "alice", json=waiting)
    assert r.status_code == 201, r.text
    assert r.json()["pending_tasks"][0]["candidate_roles"] == ["vice-president"]
    r = await api.post(f"/tasks/{task_id}/decision", "victor", json={"outcome": "approved"})
    assert r.status_code == 200, r.text
    final = await _wait_for_stage(api, done["order_no"], "closed")
    assert final["stage"] == "closed", final
    assert (await api.http.get("/no/such/route")).status_code == 404

    families, samples = await scrape(api.http)

    # requests by route template, method and status
    requests = series(samples, "procflow_http_requests_total")
    assert requests[L(route="/orders", method="POST", status="201")] == 2
    assert requests[L(route="/tasks/{task_id}/decision", method="POST", status="200")] == 1
    assert requests[L(route="/auth/token", method="POST", status="200")] == 3  # alice victor mike
    assert requests[L(route="/orders/{order_no}", method="GET", status="200")] >= 1
    assert requests[L(route="unmatched", method="GET", status="404")] == 1
    assert all(dict(labels).keys() == {"route", "method", "status"} for labels in requests)
    # the latency histogram: cumulative buckets ending in +Inf == count, a positive sum
    assert families["procflow_http_request_duration_seconds"].type == "histogram"
    orders = dict(route="/orders", method="POST", status="201")
    buckets = {
        dict(labels)["le"]: value
        for labels, value in series(
            samples, "procflow_http_request_duration_seconds_bucket"
        ).items()
        if labels >= L(**orders)
    }
    bounds = sorted(buckets, key=float)
    assert bounds[-1] == "+Inf" and "0.005" in bounds and "30.0" in bounds
    assert [buckets[b] for b in bounds] == sorted(buckets[b] for b in bounds)
    assert buckets["+Inf"] == 2
    assert samples[("procflow_http_request_duration_seconds_count", L(**orders))] == 2
    assert samples[("procflow_http_request_duration_seconds_sum", L(**orders))] > 0

    # the business series, by process type
    assert series(samples, "procflow_instances_started") == {L(process_type="sales_order"): 2}
    assert series(samples, "procflow_instances") == {
        L(process_type="sales_order", status="running"): 1,
        L(process_type="sales_order", status="completed"): 1,
    }
    assert series(samples, "procflow_instances_ended") == {
        L(process_type="sales_order", status="completed", stage="closed"): 1
    }
    assert series(samples, "procflow_tasks_open") == {
        L(process_type="sales_order", role="vice-president"): 1
    }
    assert series(samples, "procflow_tasks_overdue") == {}
    assert "procflow_tasks_overdue" in families  # present, with no sample: none overdue
    assert series(samples, "procflow_sla_events") == {}
    # the payments ledger, against the database (counts and amounts by currency)
    async with sessions() as session:
        ledger = (
            await session.execute(
                select(
                    LedgerEntry.kind,
                    LedgerEntry.status,
                    LedgerEntry.currency,
                    func.count(),
                    func.sum(LedgerEntry.amount),
                ).group_by(LedgerEntry.kind, LedgerEntry.status, LedgerEntry.currency)
            )
        ).all()
    assert ledger, "the closed order booked no payment"
    expected_counts = {
        L(process_type="sales_order", kind=k, status=s, currency=c): float(n)
        for k, s, c, n, _ in ledger
    }
    expected_amounts = {
        L(process_type="sales_order", kind=k, status=s, currency=c): float(Decimal(a))
        for k, s, c, _, a in ledger
    }
    assert series(samples, "procflow_payments") == expected_counts
    assert series(samples, "procflow_payments_amount") == expected_amounts
    assert sum(v for k, v in expected_amounts.items() if dict(k)["currency"] == "EUR") > 0
    # the outbox: the same rows as the database holds, by status
    async with sessions() as session:
        outbox = dict(
            (
                await session.execute(
                    select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status)
                )
            ).all()
        )
    # the dispatcher may send between the scrape and this query: compare the totals
    got = series(samples, "procflow_outbox_messages")
    assert sum(got.values()) == sum(outbox.values()) > 0
    assert {dict(k)["status"] for k in got} <= {"pending", "sending", "sent", "failed"}
    assert samples[("procflow_business_scrape_errors_total", L())] == 0


@pytest_asyncio.fixture
async def declining_api(
    app: FastAPI,
    client: Client,
    task_queue: str,
    settings: Settings,
    sessions: async_sessionmaker,
    mail_sink,
) -> AsyncIterator[Api]:
    """live_api, with the sandbox declining the charges of the customers in
    settings.sandbox_decline_customers, as worker.py builds it."""
    from activities.mail import SmtpSender
    from activities.payments import SandboxPaymentProvider
    from worker import build_worker

    w = build_worker(
        client,
        task_queue=task_queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(
            sessions, decline_customers=set(settings.sandbox_decline_customers)
        ),
    )
    async with w:
        async for a in _running(app):
            yield a


async def test_declined_charges_are_in_the_payment_series(
    declining_api: Api, settings: Settings, sessions: async_sessionmaker
):
    """A charge the provider declines (the order is cancelled) counts under
    status="declined" beside the ledger's captured charge, by process type and currency."""
    api = declining_api
    decliner = settings.sandbox_decline_customers[0]
    declined = order_body(1_000)
    declined["customer"] = {**declined["customer"], "id": decliner}
    captured = order_body(2_000)  # below every approval tier: charged at once
    for body in (declined, captured):
        r = await api.post("/orders", "alice", json=body)
        assert r.status_code == 201, r.text
    final = await _wait_for_stage(api, declined["order_no"], "cancelled")
    assert final["stage"] == "cancelled", final
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the other order's capture
        async with sessions() as session:
            charges = (await session.scalars(select(LedgerEntry.order_no))).all()
        if charges:
            break
        await asyncio.sleep(0.3)
    assert charges == [captured["order_no"]]
    async with sessions() as session:
        decline = (await session.scalars(select(PaymentDecline))).one()
    assert (decline.order_no, decline.kind) == (declined["order_no"], "charge")
    assert decline.workflow_id == f"sales_order-{declined['order_no']}"

    families, samples = await scrape(api.http)

    sales = dict(process_type="sales_order", kind="charge", currency="EUR")
    assert series(samples, "procflow_payments") == {
        L(**sales, status="declined"): 1,
        L(**sales, status="captured"): 1,
    }
    assert series(samples, "procflow_payments_amount") == {
        L(**sales, status="declined"): 1_000.0,
        L(**sales, status="captured"): 2_000.0,
    }
    assert "declined" in families["procflow_payments"].documentation
    assert samples[("procflow_business_scrape_errors_total", L())] == 0


@asynccontextmanager
async def _never_answers() -> AsyncIterator[None]:
    await asyncio.sleep(3600)
    yield


async def test_a_database_that_fails_or_hangs_leaves_the_business_series_out(
    api: Api, app: FastAPI, caplog: pytest.LogCaptureFixture
):
    _, samples = await scrape(api.http)
    assert series(samples, "procflow_instances_started") == {}  # nothing started: no sample
    assert samples[("procflow_business_scrape_errors_total", L())] == 0

    # a database error: the series are left out, the error counted, the scrape answered
    def broken() -> None:
        raise OSError("database unreachable")

    app.state.session_factory = broken
    with caplog.at_level(logging.WARNING, logger="procflow.metrics"):
        families, samples = await scrape(api.http)
    assert "procflow_instances" not in families and "procflow_outbox_messages" not in families
    assert samples[("procflow_business_scrape_errors_total", L())] == 1
    assert "database unreachable" in caplog.text
    assert series(samples, "procflow_http_requests_total")  # the request series still there

    # a database that never answers: the scrape ends after the timeout
    app.state.metrics.scrape_timeout_s = 0.2
    app.state.session_factory = _never_answers
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="procflow.metrics"):
        families, samples = await scrape(api.http)
    assert time.monotonic() - started < 5
    assert "procflow_instances" not in families
    assert samples[("procflow_business_scrape_errors_total", L())] == 2
    requests = series(samples, "procflow_http_requests_total")
    # the two earlier scrapes: a request is counted once it has been answered
    assert requests[L(route="/metrics", method="GET", status="200")] == 2
    assert "timed out after 0.2 s" in caplog.text


def test_metrics_can_be_switched_off(db_url: str):
    on = create_app(Settings(database_url=db_url))
    off = create_app(Settings(database_url=db_url, metrics_enabled=False))
    assert "/metrics" in on.openapi()["paths"]
    assert "/metrics" not in off.openapi()["paths"]
    assert not hasattr(off.state, "metrics")


# --- the worker: the Temporal SDK's own metrics ---------------------------------------------


@activity.defn
async def metrics_echo(text: str) -> str:
    return text


@workflow.defn(sandboxed=False)  # a probe; this module imports the app
class MetricsProbeWorkflow:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(
            metrics_echo, text, start_to_close_timeout=timedelta(seconds=10)
        )


def _target(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


async def worker_scrape(env: WorkflowEnvironment) -> tuple[str, str]:
    """The SDK metrics of a worker that ran one workflow with an activity, and its task queue."""
    address = f"127.0.0.1:{free_port()}"
    sdk = await connect(Settings(temporal_address=_target(env)), metrics_address=address)
    queue = f"metrics-{uuid.uuid4()}"
    async with Worker(
        sdk, task_queue=queue, workflows=[MetricsProbeWorkflow], activities=[metrics_echo]
    ):
        result = await sdk.execute_workflow(
            MetricsProbeWorkflow.run, "ping", id=f"metrics-{uuid.uuid4()}", task_queue=queue
        )
        assert result == "ping"
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://{address}/metrics")
    assert r.status_code == 200, r.text
    return r.text, queue


async def test_the_worker_serves_the_sdk_metrics(dev_env: WorkflowEnvironment):
    text, queue = await worker_scrape(dev_env)
    families, samples = parse(text)
    # workflow task and activity latencies, schedule-to-start, sticky cache, slots
    for name in (
        "temporal_workflow_task_execution_latency",
        "temporal_workflow_task_schedule_to_start_latency",
        "temporal_workflow_endtoend_latency",
        "temporal_activity_execution_latency",
        "temporal_activity_schedule_to_start_latency",
        "temporal_sticky_cache_size",
        "temporal_worker_task_slots_available",
        "temporal_workflow_completed",
    ):
        assert name in families, (name, sorted(families))
    ours = L(task_queue=queue, namespace="default")
    completed = [
        v for (n, labels), v in samples.items()
        if n == "temporal_workflow_completed_total" and labels >= ours
    ]  # fmt: skip
    assert completed == [1]
    latency = [
        labels
        for (n, labels) in samples
        if n == "temporal_activity_execution_latency_count" and labels >= ours
    ]
    assert latency and all(dict(labels)["activity_type"] == "metrics_echo" for labels in latency)
    assert samples[("temporal_activity_execution_latency_count", latency[0])] == 1


async def test_a_taken_metrics_address_is_logged_and_the_client_connects(
    dev_env: WorkflowEnvironment, caplog: pytest.LogCaptureFixture
):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with caplog.at_level(logging.WARNING, logger="procflow.temporal"):
            sdk = await connect(
                Settings(temporal_address=_target(dev_env)), metrics_address=address
            )
    assert "PROCFLOW_WORKER_METRICS_ADDRESS" in caplog.text and address in caplog.text
    assert await sdk.service_client.check_health()


def test_make_run_gives_the_worker_its_metrics_address(tmp_path) -> None:
    from scripts import run_stack

    config = run_stack.parse_args(["--metrics-port", "9555", "--data-dir", str(tmp_path)])
    env = run_stack.child_env(config)
    assert env["PROCFLOW_WORKER_METRICS_ADDRESS"] == "127.0.0.1:9555"
    assert Settings(worker_metrics_address=env["PROCFLOW_WORKER_METRICS_ADDRESS"])
    off = run_stack.parse_args(["--metrics-port", "0", "--data-dir", str(tmp_path)])
    assert run_stack.child_env(off)["PROCFLOW_WORKER_METRICS_ADDRESS"] == ""
    assert run_stack.parse_args(["--data-dir", str(tmp_path)]).metrics_port == 9464
