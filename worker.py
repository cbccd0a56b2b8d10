"""The procflow worker: runs every process workflow (and the blueprint interpreter, which runs
every published blueprint) and their activities on one task queue.

`python worker.py` reads its settings from PROCFLOW_* environment variables; run as many
copies as you like against the same Temporal server and database to scale out.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.blueprint_calls import BlueprintCallActivities
from activities.mail import SmtpSender
from activities.notifications import MailDispatcher, NotificationActivities
from activities.payments import PaymentActivities, PaymentProvider, SandboxPaymentProvider
from activities.reconcile import ReadModelReconciler
from activities.records import RecordActivities
from activities.warehouse import WarehouseActivities
from core import logs, tracing
from core.db import make_engine, make_session_factory
from core.health import HealthServer, database_ok, temporal_answers
from core.settings import Settings, get_settings, import_process_modules
from core.temporal import connect
from workflows import registry

# The sandbox re-imports every non-passthrough module for each workflow instance it creates
# (a new order, or one replayed after eviction from the cache). For the workflows package
# that meant ~40 ms of CPU and ~0.85 MB per instance, nearly all of it building the same
# pydantic model classes again (measured in bench/README.md). The package is deterministic
# and keeps no mutable module state (tests/workflows/test_module_state.py), so production
# workers import it once. Its determinism is still checked by the strict default sandbox:
# the workflow tests and the replay of every recorded history run without this passthrough.
PASSTHROUGH_MODULES = ("workflows",)


def workflow_runner(process_modules: Sequence[str] = ()) -> SandboxedWorkflowRunner:
    """The sandbox, with the workflows package passed through, and the process modules of
    PROCFLOW_PROCESS_MODULES: imported once, like it (they register their types at import)."""
    modules = (*PASSTHROUGH_MODULES, *process_modules)
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*modules)
    )


WORKFLOW_RUNNER = workflow_runner()
# On SIGTERM/SIGINT the worker stops polling and lets running activities finish this long
# before cancelling them; keep it below the supervisor's kill grace (10 s in scripts/run_stack).
GRACEFUL_SHUTDOWN = timedelta(seconds=8)


class ProcflowWorker:
    """The Temporal worker, the mail dispatcher that drains the outbox and the reconciler that
    writes abnormal ends into the read model: `async with` runs them in the background and
    stops them (the worker first, then a last delivery round and the reconciler's round)."""

    def __init__(
        self, worker: Worker, dispatcher: MailDispatcher, reconciler: ReadModelReconciler
    ) -> None:
        self.worker = worker
        self.dispatcher = dispatcher
        self.reconciler = reconciler

    async def __aenter__(self) -> ProcflowWorker:
        await self.worker.__aenter__()
        self.dispatcher.start()
        self.reconciler.start()
        return self

    def live(self) -> dict[str, bool]:
        """Which of its parts run (the worker's /healthz)."""
        return {
            "worker": self.worker.is_running,
            "mail_dispatcher": self.dispatcher.alive,
            "reconciler": self.reconciler.alive,
        }

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.worker.__aexit__(exc_type, exc, tb)
        finally:
            try:
                await self.dispatcher.stop()
            finally:
                await self.reconciler.stop()


def build_worker(
    client: Client,
    *,
    task_queue: str,
    session_factory: async_sessionmaker,
    sender: SmtpSender,
    provider: PaymentProvider,
    dispatcher: MailDispatcher | None = None,
    reconciler: ReadModelReconciler | None = None,
    process_modules: Sequence[str] | None = None,
    **worker_options,
) -> ProcflowWorker:
    """One worker with the workflow of every registered process type and every activity, its
    mail dispatcher and its read-model reconciler (by default polling as PROCFLOW_RECONCILE_*
    say, for every registered type); tests and `main` both build it here. The process modules
    (by default PROCFLOW_PROCESS_MODULES) are imported first: their types are registered."""
    if process_modules is None:
        process_modules = get_settings().process_modules
    modules = import_process_modules(process_modules)
    dispatcher = dispatcher or MailDispatcher(session_factory, sender)
    if reconciler is None:
        settings = get_settings()
        reconciler = ReadModelReconciler(
            client,
            session_factory,
            poll_s=settings.reconcile_poll_s,
            lookback_s=settings.reconcile_lookback_s,
            # the coded types; it reads the published blueprints itself, each round
            process_types=[t.name for t in registry.PROCESS_TYPES.values() if not t.is_blueprint],
            final_stages=registry.terminal_stages(),
        )
    records = RecordActivities(session_factory, mail_queued=dispatcher.wake)
    notifications = NotificationActivities(session_factory, sender)
    payments = PaymentActivities(provider, session_factory)
    warehouse = WarehouseActivities(session_factory)
    calls = BlueprintCallActivities(session_factory, mail_queued=dispatcher.wake)
    # a traced client (PROCFLOW_TRACING_ENABLED): the worker takes its interceptor over, and the
    # interceptor's workflow side needs opentelemetry passed through the sandbox
    traced = any(isinstance(i, TracingInterceptor) for i in client.config()["interceptors"])
    passthrough = (*modules, *(tracing.PASSTHROUGH_MODULES if traced else ()))
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=registry.workflows(),
        workflow_runner=workflow_runner(passthrough) if passthrough else WORKFLOW_RUNNER,
        activities=[
            records.load_policy,
            records.project,
            notifications.notify,
            payments.capture_payment,
            payments.refund_payment,
            payments.record_incoming_payment,
            warehouse.reserve_stock,
            warehouse.release_stock,
            warehouse.ship_order,
            warehouse.issue_invoice,
            *calls.all(),
        ],
        **worker_options,
    )
    return ProcflowWorker(worker, dispatcher, reconciler)


def health_server(
    worker: ProcflowWorker, client: Client, engine: AsyncEngine, address: str, timeout_s: float
) -> HealthServer:
    """The worker's GET /healthz (its parts run) and GET /readyz (and Temporal answers and the
    database takes a write) on `address`."""

    async def ready() -> dict[str, bool]:
        parts = worker.live()
        parts["temporal"] = await temporal_answers(client, timeout_s)
        parts["database"] = await database_ok(engine, timeout_s)
        return parts

    return HealthServer(address, worker.live, ready)


async def main(settings: Settings) -> None:
    logs.configure(settings, registry.process_type_of)
    tracing.configure_tracing(settings, "procflow-worker")  # before the client's interceptor
    # the SDK's own metrics (Prometheus) at PROCFLOW_WORKER_METRICS_ADDRESS, when set
    client = await connect(settings, metrics_address=settings.worker_metrics_address)
    if settings.worker_metrics_address:
        logging.info("worker metrics at http://%s/metrics", settings.worker_metrics_address)
    engine = make_engine(settings.database_url)
    session_factory = make_session_factory(engine)
    sender = SmtpSender(
        settings.smtp_host, settings.smtp_port, settings.smtp_timeout_s, settings.mail_from
    )
    provider = SandboxPaymentProvider(
        session_factory,
        decline_customers=set(settings.sandbox_decline_customers),
        pause_before_charge_s=settings.sandbox_pause_before_charge_s,
        pause_after_charge_s=settings.sandbox_pause_after_charge_s,
    )
    worker = build_worker(
        client,
        task_queue=settings.task_queue,
        session_factory=session_factory,
        sender=sender,
        provider=provider,
        dispatcher=MailDispatcher(
            session_factory,
            sender,
            poll_s=settings.mail_poll_s,
            batch_size=settings.mail_batch_size,
            lease_s=settings.mail_lease_s,
            max_backoff_s=settings.mail_max_backoff_s,
            max_attempts=settings.mail_max_attempts,
            max_transient_attempts=settings.mail_max_transient_attempts,
        ),
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        max_cached_workflows=settings.worker_max_cached_workflows,
        process_modules=settings.process_modules,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.info(
        "worker polling task queue %s on %s", settings.task_queue, settings.temporal_address
    )
    async with worker:
        health = None
        if settings.worker_health_address:
            health = health_server(
                worker,
                client,
                engine,
                settings.worker_health_address,
                settings.temporal_rpc_timeout_s,
            )
            await health.start()
        try:
            await stop.wait()
            logging.info("worker shutting down: finishing running activities")
        finally:
            if health is not None:
                await health.stop()
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(get_settings()))
