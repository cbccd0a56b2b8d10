"""SIGKILL of the worker in the middle of the payment: before the provider is called, and after
it charged but before the activity answered. A new worker finishes both orders, each charged
once. (The capture's retry comes when its 30 s start-to-close timeout expires.)

The kill must land while K-AFTER's charge is committed but unanswered and K-BEFORE's is held
before the provider: K-BEFORE starts once K-AFTER is charged and has PAUSE_AFTER_S to reach
the provider, however busy the machine (the two pauses together stay under the capture's 30 s
timeout, so K-AFTER's first attempt is still the running one when the kill comes)."""

from __future__ import annotations

import asyncio
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
from workflows.sales_order import Stage, sales_order_workflow_id

PAUSE_BEFORE_S = 8  # the sandbox holds each new charge this long before the provider call
PAUSE_AFTER_S = 18  # ... and this long after the charge committed, before it answers


@pytest.mark.timeout(150)
async def test_worker_killed_before_or_after_the_charge_each_order_is_charged_once(
    dev_env, database, mail_sink, processes, tmp_path
):
    db_url, sessions = database
    client = dev_env.client
    queue = f"faults-kill-{uuid.uuid4()}"
    env = procflow_env(
        temporal_address=dev_env.client.service_client.config.target_host,
        task_queue=queue,
        database_url=db_url,
        smtp_host=mail_sink.host,
        smtp_port=str(mail_sink.port),
    )
    paused = env | {
        "PROCFLOW_SANDBOX_PAUSE_BEFORE_CHARGE_S": str(PAUSE_BEFORE_S),
        "PROCFLOW_SANDBOX_PAUSE_AFTER_CHARGE_S": str(PAUSE_AFTER_S),
    }
    first = processes.start(worker_process(paused, tmp_path / "worker-1.log"))

    # K-AFTER charges, then its answer is held back; meanwhile K-BEFORE reaches the provider
    charged = await start(client, order("K-AFTER"), queue)
    await until(lambda: _charged(sessions, "K-AFTER"), 60, "K-AFTER is charged")
    not_charged = await start(client, order("K-BEFORE"), queue)
    await until(
        lambda: _logged(first.output(), f"before charge {sales_order_workflow_id('K-BEFORE')}"),
        PAUSE_AFTER_S,
        "the worker holds K-BEFORE's charge (while K-AFTER's answer is held back)",
    )
    # the state the kill interrupts: both captures running, one charged, one not
    running = [h.id for h in (charged, not_charged) if await capture_running(h)]
    charged_before_kill = await charges(sessions, "K-BEFORE")
    first.kill()
    record_figure("worker SIGKILL mid-payment: instances in flight", len(running))
    assert running == [charged.id, not_charged.id], "both captures must still be unanswered"
    assert charged_before_kill == 0

    processes.start(worker_process(env, tmp_path / "worker-2.log"))
    results = await asyncio.wait_for(asyncio.gather(charged.result(), not_charged.result()), 90)

    assert [r.stage for r in results] == [Stage.CLOSED, Stage.CLOSED]
    # the first attempt died with the worker; the second, on the new worker, answered
    assert await capture_attempts(charged) == [2]
    assert await capture_attempts(not_charged) == [2]
    assert await charges(sessions, "K-AFTER") == 1
    assert await charges(sessions, "K-BEFORE") == 1
    assert await check_nothing_lost_or_doubled(sessions, ["K-AFTER", "K-BEFORE"]) == (0, 0)


async def _charged(sessions, order_no: str) -> bool:
    return await charges(sessions, order_no) == 1


async def _logged(output: str, text: str) -> bool:
    return text in output
