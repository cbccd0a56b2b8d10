"""Operators find instances in the Temporal UI by their search attributes: `PendingRoles` names
the roles an instance waits for now, and moves on with the approval chain."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from temporalio.client import Client

from tests.api.conftest import Api, order_body
from workflows.sales_order import sales_order_workflow_id

pytestmark = pytest.mark.timeout(180)


async def _listed(client: Client, query: str) -> set[str]:
    return {w.id async for w in client.list_workflows(query)}


async def _until_listed(client: Client, expected: dict[str, set[str]], timeout_s: float = 60):
    """Visibility is eventually consistent: poll until every query lists exactly its ids."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {query: await _listed(client, query) for query in expected}
        if found == expected:
            return
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.3)


async def test_pending_roles_lists_an_order_waiting_for_its_vice_president_only(
    live_api: Api, client: Client
):
    customer = f"CUST-{uuid.uuid4().hex[:8]}"  # these two orders only, on the shared server
    started = []
    for _ in range(2):  # 1,200,000: the vice-president first, then the sales director
        body = order_body(1_200_000)
        body["customer"]["id"] = customer
        r = await live_api.post("/orders", "alice", json=body)
        assert r.status_code == 201, r.text
        assert [t["candidate_roles"] for t in r.json()["pending_tasks"]] == [["vice-president"]]
        started.append(r.json())
    waiting_vp, waiting_sd = started
    task_id = waiting_sd["pending_tasks"][0]["task_id"]
    r = await live_api.post(f"/tasks/{task_id}/decision", "victor", json={"outcome": "approved"})
    assert r.status_code == 200, r.text
    status = (await live_api.get(f"/orders/{waiting_sd['order_no']}", "alice")).json()
    assert [t["candidate_roles"] for t in status["pending_tasks"]] == [["sales-director"]]

    scope = f"ProcessType = 'sales_order' AND CustomerId = '{customer}'"
    vp_id = sales_order_workflow_id(waiting_vp["order_no"])
    sd_id = sales_order_workflow_id(waiting_sd["order_no"])
    await _until_listed(
        client,
        {
            f"PendingRoles = 'vice-president' AND {scope}": {vp_id},
            f"PendingRoles = 'sales-director' AND {scope}": {sd_id},
            scope: {vp_id, sd_id},
        },
    )
