"""SIGTERM (a rolling deploy) of a worker while it runs the payment: it finishes the activity
it holds and exits cleanly; the new worker carries the order on, without a retry or a second
charge."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.faults.orders import (
    capture_attempts,
    capture_running,
    charges,
    check_nothing_lost_or_doubled,
    order,
    start,
)
from tests.faults.processes import procflow_env, until, worker_process
from tests.support import record_figure
from workflows.sales_order import Stage

# the charge commits, then the answer takes this long: SIGTERM arrives meanwhile (less than the
# worker's 8 s graceful shutdown, which lets the capture finish)
PAUSE_S = 5


@pytest.mark.timeout(90)
async def test_worker_sigterm_finishes_the_running_payment_and_a_new_worker_completes(
    dev_env, database, mail_sink, processes, tmp_path
):
    db_url, sessions = database
    client = dev_env.client
    queue = f"faults-term-{uuid.uuid4()}"
    env = procflow_env(
        temporal_address=dev_env.client.service_client.config.target_host,
        task_queue=queue,
        database_url=db_url,
        smtp_host=mail_sink.host,
        smtp_port=str(mail_sink.port),
    )
    old = processes.start(
        worker_process(
            env | {"PROCFLOW_SANDBOX_PAUSE_AFTER_CHARGE_S": str(PAUSE_S)},
            tmp_path / "worker-old.log",
        )
    )
    handle = await start(client, order("G-1"), queue)
    await until(lambda: _charged(sessions, "G-1"), 60, "G-1 is charged")

    in_flight = int(await capture_running(handle))
    terminated = time.monotonic()
    old.terminate()
    processes.start(worker_process(env, tmp_path / "worker-new.log"))
    record_figure("worker SIGTERM mid-payment: instances in flight", in_flight)
    assert in_flight == 1, "SIGTERM must arrive while the capture is unanswered"

    assert await old.exited(30) == 0, old.output()[-3000:]
    assert "worker shutting down" in old.output()
    result = await asyncio.wait_for(handle.result(), 60)
    took = time.monotonic() - terminated
    record_figure("worker SIGTERM mid-payment: seconds to completion", round(took, 1))

    assert result.stage == Stage.CLOSED
    # the old worker answered the capture itself: one attempt, no 30 s timeout, no retry
    # (how fast the order completes is a figure, not a check: speed belongs in `make bench`)
    assert await capture_attempts(handle) == [1]
    assert await charges(sessions, "G-1") == 1
    assert await check_nothing_lost_or_doubled(sessions, ["G-1"]) == (0, 0)


async def _charged(sessions, order_no: str) -> bool:
    return await charges(sessions, order_no) == 1
