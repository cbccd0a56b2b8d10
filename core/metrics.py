"""Prometheus metrics of the API (issue 14): requests by route template, method and status with
a latency histogram, and the business series, read from the database at scrape time.

Each app has its own registry (`ApiMetrics`), so that several apps in one process (the tests)
count apart. The business series are gauges of the read model's current state, by process
type: instances by status (all of them: the instances started), instances ended by status and
end stage, open tasks per candidate role, overdue tasks, SLA events by kind, the payments
ledger by kind, status and currency (counts and amounts; declined charges and refunds, from
payment_declines, as status "declined"), the mail outbox by status. A scrape
bounds its queries (settings.metrics_scrape_timeout_s); past it, or on a database error, the
business series are left out of that scrape and procflow_business_scrape_errors_total goes up.

The worker's metrics are the Temporal SDK's own, served by its runtime (core/temporal.py
metrics_runtime, PROCFLOW_WORKER_METRICS_ADDRESS).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.db import (
    LedgerEntry,
    OutboxMessage,
    PaymentDecline,
    ProcessInstance,
    SlaEvent,
    TaskCandidate,
    TaskRow,
)

log = logging.getLogger("procflow.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "unmatched"  # the route label of a request no route matched (a 404)
UNKNOWN_TYPE = "unknown"  # the process type of a ledger row or decline with no known instance
DECLINED = "declined"  # the status label of the declined charges and refunds
# latency buckets in seconds: decisions wait for the workflow (update_wait_s, up to 30 s)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BusinessCollector(Collector):
    """The business series of the last `refresh`; `collect` yields them (none after a failed
    refresh). refresh and collect run back to back under the scrape lock of ApiMetrics."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families

    async def refresh(self, session_factory: async_sessionmaker, now: datetime) -> None:
        async with session_factory() as session:
            self.families = await business_families(session, now)


class ApiMetrics:
    """The registry of one app: the request series, the business collector, the error count."""

    def __init__(self, scrape_timeout_s: float = 5.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.scrape_timeout_s = scrape_timeout_s
        labels = ("route", "method", "status")
        self.requests = Counter(
            "procflow_http_requests",
            "HTTP requests answered, by route template, method and status",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "procflow_http_request_duration_seconds",
            "time from a request's arrival to the end of its response, by route template, "
            "method and status",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scrape_errors = Counter(
            "procflow_business_scrape_errors",
            "scrapes whose business queries failed or timed out (their series left out)",
            registry=self.registry,
        )
        self.business = BusinessCollector()
        self.registry.register(self.business)
        self._lock = asyncio.Lock()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)

    async def scrape(self, session_factory: async_sessionmaker | None) -> bytes:
        """The text exposition: the request series, and the business series when the database
        answered within the timeout."""
        async with self._lock:
            self.business.families = []
            if session_factory is not None:
                try:
                    async with asyncio.timeout(self.scrape_timeout_s):
                        await self.business.refresh(session_factory, datetime.now(UTC))
                except Exception as err:  # noqa: BLE001 - any failure: series out, counted
                    self.business.families = []
                    self.scrape_errors.inc()
                    why = (
                        f"the database queries timed out after {self.scrape_timeout_s:g} s"
                        if isinstance(err, TimeoutError)
                        else f"{type(err).__name__}: {err}"
                    )
                    log.warning("business metrics left out of this scrape (%s)", why)
            return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The path template of the route that matched (`/orders/{order_no}`), else `unmatched`."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestMetrics:
    """ASGI middleware: counts each HTTP request and times it, labelled by the matched route's
    template (read after routing, from the scope the router fills in), method and status (500
    when the app failed before answering). The router writes scope["route"] into the scope
    dict that the middlewares pass down, so this one can sit anywhere in the stack."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(
                route_template(scope),
                scope.get("method", ""),
                status,
                time.perf_counter() - started,
            )


def _gauge(
    name: str, documentation: str, labels: Iterable[str], rows: Iterable[tuple]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for *values, value in rows:
        family.add_metric([str(v) for v in values], float(value))
    return family


def _decimal(value: object) -> Decimal:
    if value is None:
        return Decimal(0)
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _payment_rows(
    ledger: Iterable[tuple], declines: Iterable[tuple]
) -> list[tuple[tuple[str, str, str, str], tuple[int, float]]]:
    """(process type, kind, status, currency) -> (count, amount) of the ledger's groups and
    the declines' (status `declined`), sorted; a label set in both (no ledger status is
    `declined`) is added up, never exported twice."""
    merged: dict[tuple[str, str, str, str], tuple[int, Decimal]] = {}
    rows = [(t, k, s, c, n, a) for t, k, s, c, n, a in ledger]
    rows += [(t, k, DECLINED, c, n, a) for t, k, c, n, a in declines]
    for process_type, kind, status, currency, count, amount in rows:
        labels = (str(process_type), str(kind), str(status), str(currency))
        seen_count, seen_amount = merged.get(labels, (0, Decimal(0)))
        merged[labels] = (seen_count + int(count), seen_amount + _decimal(amount))
    return [(labels, (count, float(amount))) for labels, (count, amount) in sorted(merged.items())]


async def business_families(session: AsyncSession, now: datetime) -> list[Metric]:
    """The business series from the read model (one query each)."""
    pi = ProcessInstance
    instances = (
        await session.execute(
            select(pi.process_type, pi.status, func.count()).group_by(pi.process_type, pi.status)
        )
    ).all()
    ended = (
        await session.execute(
            select(pi.process_type, pi.status, pi.stage, func.count())
            .where(pi.status != "running")
            .group_by(pi.process_type, pi.status, pi.stage)
        )
    ).all()
    started: dict[str, int] = {}
    for process_type, _status, count in instances:
        started[process_type] = started.get(process_type, 0) + count
    open_tasks = (
        await session.execute(
            select(TaskRow.process_type, TaskCandidate.role, func.count())
            .join(TaskCandidate, TaskCandidate.task_id == TaskRow.task_id)
            .where(TaskRow.status == "open")
            .group_by(TaskRow.process_type, TaskCandidate.role)
        )
    ).all()
    overdue = (
        await session.execute(
            select(TaskRow.process_type, func.count())
            .where(TaskRow.status == "open", TaskRow.due_at.is_not(None), TaskRow.due_at < now)
            .group_by(TaskRow.process_type)
        )
    ).all()
    sla = (
        await session.execute(
            select(pi.process_type, SlaEvent.kind, func.count())
            .join(pi, pi.workflow_id == SlaEvent.workflow_id)
            .group_by(pi.process_type, SlaEvent.kind)
        )
    ).all()
    ledger_type = func.coalesce(pi.process_type, UNKNOWN_TYPE)
    ledger = (
        await session.execute(
            select(
                ledger_type,
                LedgerEntry.kind,
                LedgerEntry.status,
                LedgerEntry.currency,
                func.count(),
                func.sum(LedgerEntry.amount),
            )
            .outerjoin(pi, pi.workflow_id == LedgerEntry.workflow_id)
            .group_by(ledger_type, LedgerEntry.kind, LedgerEntry.status, LedgerEntry.currency)
        )
    ).all()
    declines = (
        await session.execute(
            select(
                ledger_type,
                PaymentDecline.kind,
                PaymentDecline.currency,
                func.count(),
                func.sum(PaymentDecline.amount),
            )
            .outerjoin(pi, pi.workflow_id == PaymentDecline.workflow_id)
            .group_by(ledger_type, PaymentDecline.kind, PaymentDecline.currency)
        )
    ).all()
    payments = _payment_rows(ledger, declines)
    outbox = (
        await session.execute(
            select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status)
        )
    ).all()
    payment_labels = ("process_type", "kind", "status", "currency")
    return [
        _gauge(
            "procflow_instances_started",
            "instances in the read model (every one started), by process type",
            ["process_type"],
            sorted(started.items()),
        ),
        _gauge(
            "procflow_instances",
            "instances by process type and status (running, completed, failed, cancelled, "
            "terminated)",
            ["process_type", "status"],
            instances,
        ),
        _gauge(
            "procflow_instances_ended",
            "ended instances by process type, status and end stage (the outcome)",
            ["process_type", "status", "stage"],
            ended,
        ),
        _gauge(
            "procflow_tasks_open",
            "open human tasks by process type and candidate role (a task with two candidate "
            "roles counts under each)",
            ["process_type", "role"],
            open_tasks,
        ),
        _gauge(
            "procflow_tasks_overdue",
            "open human tasks past their due time, by process type",
            ["process_type"],
            overdue,
        ),
        _gauge(
            "procflow_sla_events",
            "SLA events (reminded, escalated, breached) by process type and kind",
            ["process_type", "kind"],
            sla,
        ),
        _gauge(
            "procflow_payments",
            "payments ledger entries (charge, refund, incoming) and declined charges and refunds "
            "(status declined), by process type, kind, status and currency",
            payment_labels,
            [(*labels, count) for labels, (count, _) in payments],
        ),
        _gauge(
            "procflow_payments_amount",
            "sum of the amounts of the payments ledger entries and of the declined charges and "
            "refunds (status declined), by process type, kind, status and currency (in the "
            "currency's units)",
            payment_labels,
            [(*labels, amount) for labels, (_, amount) in payments],
        ),
        _gauge(
            "procflow_outbox_messages",
            "mails in the outbox by status (pending, sending, sent, failed)",
            ["status"],
            outbox,
        ),
    ]
