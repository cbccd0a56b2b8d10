"""The procflow worker: runs every process workflow and its activities on one task queue.

`python worker.py` reads its settings from PROCFLOW_* environment variables; run as many
copies as you like against the same Temporal server and database to scale out.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from activities.mail import SmtpSender
from activities.notifications import NotificationActivities
from activities.payments import PaymentActivities, PaymentProvider, SandboxPaymentProvider
from activities.records import RecordActivities
from activities.warehouse import WarehouseActivities
from core.db import make_engine, make_session_factory
from core.settings import Settings, get_settings
from core.temporal import connect
from workflows.sales_order import SalesOrderWorkflow

WORKFLOWS = [SalesOrderWorkflow]
# On SIGTERM/SIGINT the worker stops polling and lets running activities finish this long
# before cancelling them; keep it below the supervisor's kill grace (10 s in scripts/run_stack).
GRACEFUL_SHUTDOWN = timedelta(seconds=8)


def build_worker(
    client: Client,
    *,
    task_queue: str,
    session_factory: async_sessionmaker,
    sender: SmtpSender,
    provider: PaymentProvider,
    **worker_options,
) -> Worker:
    """One worker with every workflow and activity; tests and `main` both build it here."""
    records = RecordActivities(session_factory)
    notifications = NotificationActivities(session_factory, sender)
    payments = PaymentActivities(provider, session_factory)
    warehouse = WarehouseActivities(session_factory)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
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
        ],
        **worker_options,
    )


async def main(settings: Settings) -> None:
    client = await connect(settings)
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
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.info(
        "worker polling task queue %s on %s", settings.task_queue, settings.temporal_address
    )
    async with worker:
        await stop.wait()
        logging.info("worker shutting down: finishing running activities")
    await engine.dispose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main(get_settings()))
