"""The API process is killed while it starts an order (the client gets no answer) and comes
back: the client's retry of the same request finds the same instance, the decision goes through
the new API process, and the order completes with one order row and one charge."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from temporalio.service import RPCError

from activities.mail import SmtpSender
from activities.payments import SandboxPaymentProvider
from scripts.seed import DEMO_PASSWORD
from tests.faults.orders import charges, check_nothing_lost_or_doubled, order_body
from tests.faults.processes import ApiProcess, procflow_env, until
from tests.support import record_figure
from worker import build_worker
from workflows.sales_order import SalesOrderWorkflow, Stage, sales_order_workflow_id

ORDER_NO = "A-1"


@pytest.mark.timeout(90)
async def test_api_killed_mid_request_client_retry_finds_the_same_order_which_completes(
    dev_env, database, mail_sink, processes, tmp_path
):
    db_url, sessions = database
    client = dev_env.client
    queue = f"faults-api-{uuid.uuid4()}"
    env = procflow_env(
        temporal_address=client.service_client.config.target_host,
        task_queue=queue,
        database_url=db_url,
        update_wait_s="20",
    )
    first = ApiProcess(env, tmp_path / "api-1.log")
    processes.start(first)
    await first.ready()
    body = order_body(ORDER_NO, 600_000)
    wid = sales_order_workflow_id(ORDER_NO)
    handle = client.get_workflow_handle_for(SalesOrderWorkflow.run, wid)

    async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
        alice = await _login(http, "alice")
        victor = await _login(http, "victor")
        # no worker yet: the API has started the instance and waits for it to settle
        pending = asyncio.create_task(http.post("/orders", json=body, headers=alice))
        await until(lambda: _exists(handle), 30, "the API started the instance")
        run_id = (await handle.describe()).run_id
        in_flight = int(await _exists(handle) and not pending.done())
        first.kill()
        with pytest.raises(httpx.TransportError):
            await pending  # the client never learns whether its order was taken
    record_figure("API SIGKILL mid-request: instances in flight", in_flight)
    assert in_flight == 1

    worker = build_worker(
        client,
        task_queue=queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )
    async with worker:
        second = ApiProcess(env, tmp_path / "api-2.log", port=first.port)
        processes.start(second)
        await second.ready()
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
            retry = await http.post("/orders", json=body, headers=alice)
            assert retry.status_code == 200, retry.text  # the same instance, not a new one
            status = retry.json()
            assert status["workflow_id"] == wid and status["stage"] == Stage.APPROVAL
            [task] = status["pending_tasks"]
            assert task["candidate_roles"] == ["vice-president"]
            decided = await http.post(
                f"/tasks/{task['task_id']}/decision",
                json={"outcome": "approved"},
                headers=victor,
            )
            assert decided.status_code == 200, decided.text
        result = await asyncio.wait_for(handle.result(), 60)

    assert result.stage == Stage.CLOSED
    assert (await handle.describe()).run_id == run_id
    assert await charges(sessions, ORDER_NO) == 1
    assert await check_nothing_lost_or_doubled(sessions, [ORDER_NO]) == (0, 0)


async def _login(http: httpx.AsyncClient, username: str) -> dict[str, str]:
    r = await http.post("/auth/token", data={"username": username, "password": DEMO_PASSWORD})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def _exists(handle) -> bool:
    try:
        await handle.describe()
    except RPCError:
        return False
    return True
