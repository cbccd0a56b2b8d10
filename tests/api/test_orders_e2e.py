"""End to end: the API against the real SalesOrderWorkflow, worker, database and mail sink."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from core.db import Order
from core.settings import Settings
from core.temporal import CUSTOMER_ID, PROCESS_TYPE
from tests.api.conftest import Api, order_body
from workflows.sales_order import (
    LEGACY_WORKFLOW_ID_PREFIX,
    MEMO_FINGERPRINT,
    SalesOrderInput,
    SalesOrderWorkflow,
    input_fingerprint,
    sales_order_workflow_id,
)

pytestmark = pytest.mark.timeout(120)


async def _inbox(api: Api, user: str, order_no: str, **params) -> list[dict]:
    r = await api.get("/tasks", user, params={"business_key": order_no, **params})
    assert r.status_code == 200, r.text
    return r.json()["items"]


# the order's end stages: the read model has them once the instance's last projection is written
END_STAGES = ("closed", "rejected", "cancelled", "failed")


async def _wait_for_stage(api: Api, order_no: str, stage: str, timeout: float = 60) -> dict:
    """The order's live status (a query) once it is in `stage`; for an end stage, once the
    read model shows it too: the query reads the workflow's state, which is at the end while
    the last projection (a local activity) is still being written."""
    deadline = time.monotonic() + timeout
    while True:
        status = (await api.get(f"/orders/{order_no}", "mike")).json()
        if status["stage"] == stage and stage in END_STAGES:
            listed = (await api.get("/orders", "mike", params={"stage": stage})).json()
            if order_no in [o["order_no"] for o in listed["items"]]:
                return status
        elif status["stage"] == stage:
            return status
        if time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.3)


async def test_start_is_idempotent_and_a_reused_order_no_conflicts(live_api: Api):
    api = live_api
    body = order_body(1_200_000)
    first = await api.post("/orders", "alice", json=body)
    assert first.status_code == 201, first.text
    status = first.json()
    assert status["requester"] == "alice"
    assert status["amount"] == "1200000.00"
    assert status["stage"] == "approval"
    assert status["policy_version"] == 1
    assert [t["candidate_roles"] for t in status["pending_tasks"]] == [["vice-president"]]

    # the first task is in the read model when the start returns
    inbox = await _inbox(api, "victor", body["order_no"])
    assert [t["task_id"] for t in inbox] == [status["pending_tasks"][0]["task_id"]]

    again = await api.post("/orders", "alice", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["workflow_id"] == status["workflow_id"]
    assert len(again.json()["pending_tasks"]) == 1

    changed = order_body(1_300_000, order_no=body["order_no"])
    conflict = await api.post("/orders", "alice", json=changed)
    assert conflict.status_code == 409
    assert conflict.json() == {"detail": "order_no already used with a different order"}
    # a different requester with the same body is a different order too
    other = await api.post("/orders", "bob", json=body)
    assert other.status_code == 409


async def test_requester_cannot_approve_her_own_order(live_api: Api):
    api = live_api
    body = order_body(600_000)
    r = await api.post("/orders", "vera", json=body)
    assert r.status_code == 201, r.text
    task_id = r.json()["pending_tasks"][0]["task_id"]

    # her own task is not in her inbox, and deciding it is refused
    assert await _inbox(api, "vera", body["order_no"]) == []
    refused = await api.post(f"/tasks/{task_id}/decision", "vera", json={"outcome": "approved"})
    assert refused.status_code == 403, refused.text
    assert "vera" in refused.json()["detail"]
    status = (await api.get(f"/orders/{body['order_no']}", "vera")).json()
    assert [t["task_id"] for t in status["pending_tasks"]] == [task_id]
    assert status["decisions"] == []

    approved = await api.post(f"/tasks/{task_id}/decision", "victor", json={"outcome": "approved"})
    assert approved.status_code == 200, approved.text
    assert approved.json()["task"]["status"] == "closed"
    final = await _wait_for_stage(api, body["order_no"], "closed")
    assert final["stage"] == "closed"


async def test_approval_chain_runs_to_closing_and_mails_the_customer(live_api: Api, mail_sink):
    api = live_api
    body = order_body(1_200_000)
    order_no = body["order_no"]
    start = await api.post("/orders", "alice", json=body)
    assert start.status_code == 201, start.text
    vp_task = start.json()["pending_tasks"][0]["task_id"]

    # victor approves: the sales director's task is in diana's inbox when the response returns
    r = await api.post(
        f"/tasks/{vp_task}/decision", "victor", json={"outcome": "approved", "comment": "fine"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["task"]["decided_by"] == "victor"
    diana = await _inbox(api, "diana", order_no)
    assert len(diana) == 1
    sd_task = diana[0]["task_id"]
    assert sd_task != vp_task
    assert await _inbox(api, "victor", order_no) == []

    # rejecting without a comment is refused, naming the field
    r = await api.post(f"/tasks/{sd_task}/decision", "diana", json={"outcome": "rejected"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "comment"]
    # an outcome the task does not offer
    r = await api.post(f"/tasks/{sd_task}/decision", "diana", json={"outcome": "maybe"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "outcome"]
    # someone without the role
    r = await api.post(f"/tasks/{sd_task}/decision", "victor", json={"outcome": "approved"})
    assert r.status_code == 403

    status = (await api.get(f"/orders/{order_no}", "alice")).json()
    assert [d["actor"] for d in status["decisions"]] == ["victor"]
    assert [t["task_id"] for t in status["pending_tasks"]] == [sd_task]

    r = await api.post(f"/tasks/{sd_task}/decision", "diana", json={"outcome": "approved"})
    assert r.status_code == 200, r.text

    final = await _wait_for_stage(api, order_no, "closed")
    assert final["stage"] == "closed", final
    assert [d["actor"] for d in final["decisions"]] == ["victor", "diana"]
    assert final["pending_tasks"] == []
    assert final["invoice_no"]

    # deciding a closed task: the instance has ended (or the task is closed)
    r = await api.post(f"/tasks/{sd_task}/decision", "diana", json={"outcome": "approved"})
    assert r.status_code == 409, r.text

    deadline = time.monotonic() + 20
    while not mail_sink.messages and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert mail_sink.messages, "no mail reached the sink"

    listed = (await api.get("/orders", "mike", params={"stage": "closed"})).json()
    assert order_no in [o["order_no"] for o in listed["items"]]


async def test_closed_task_of_a_running_order_is_409(live_api: Api):
    api = live_api
    body = order_body(1_200_000)
    start = await api.post("/orders", "alice", json=body)
    vp_task = start.json()["pending_tasks"][0]["task_id"]
    r = await api.post(f"/tasks/{vp_task}/decision", "victor", json={"outcome": "approved"})
    assert r.status_code == 200
    r = await api.post(f"/tasks/{vp_task}/decision", "victor", json={"outcome": "approved"})
    assert r.status_code == 409, r.text
    assert "closed" in r.json()["detail"]


async def test_unknown_task_and_unknown_order_are_404(live_api: Api):
    api = live_api
    r = await api.post(
        f"/tasks/nope-{uuid.uuid4().hex}/decision", "victor", json={"outcome": "approved"}
    )
    assert r.status_code == 404
    r = await api.get(f"/tasks/nope-{uuid.uuid4().hex}", "victor")
    assert r.status_code == 404
    r = await api.get(f"/orders/NOPE{uuid.uuid4().hex[:8]}", "mike")
    assert r.status_code == 404
    assert "not found" in r.json()["detail"]
    r = await api.post(f"/orders/NOPE{uuid.uuid4().hex[:8]}/cancel", "mike", json={"reason": "x"})
    assert r.status_code == 404


async def test_requesters_see_only_their_own_orders(live_api: Api):
    api = live_api
    mine = order_body(100)
    theirs = order_body(200)
    assert (await api.post("/orders", "alice", json=mine)).status_code == 201
    assert (await api.post("/orders", "bob", json=theirs)).status_code == 201
    assert (await api.get(f"/orders/{theirs['order_no']}", "alice")).status_code == 404
    assert (await api.get(f"/orders/{theirs['order_no']}", "mike")).status_code == 200
    listed = (await api.get("/orders", "alice")).json()
    assert {o["requester"] for o in listed["items"]} == {"alice"}
    assert mine["order_no"] in [o["order_no"] for o in listed["items"]]
    everyone = (await api.get("/orders", "mike")).json()
    assert {mine["order_no"], theirs["order_no"]} <= {o["order_no"] for o in everyone["items"]}


async def test_claim_delegate_and_inbox_of_taken_tasks(live_api: Api):
    api = live_api
    body = order_body(700_000)
    start = await api.post("/orders", "alice", json=body)
    task_id = start.json()["pending_tasks"][0]["task_id"]

    r = await api.post(f"/tasks/{task_id}/claim", "victor")
    assert r.status_code == 200, r.text
    assert r.json()["assignee"] == "victor"
    # vera (vice-president too) no longer sees it, unless she asks for taken tasks
    assert await _inbox(api, "vera", body["order_no"]) == []
    taken = await _inbox(api, "vera", body["order_no"], include_taken="true")
    assert [(t["task_id"], t["taken"]) for t in taken] == [(task_id, True)]
    assert (await api.post(f"/tasks/{task_id}/claim", "vera")).status_code == 409

    r = await api.post(
        f"/tasks/{task_id}/delegate", "victor", json={"to_user": "nobody-here", "comment": "x"}
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "to_user"]
    r = await api.post(
        f"/tasks/{task_id}/delegate", "victor", json={"to_user": "alice", "comment": "x"}
    )
    assert r.status_code == 403  # alice requested the order: four eyes
    r = await api.post(f"/tasks/{task_id}/reassign", "victor", json={"to_user": "vera"})
    assert r.status_code == 403  # only managers reassign
    r = await api.post(f"/tasks/{task_id}/reassign", "mike", json={"to_user": "vera"})
    assert r.status_code == 200, r.text
    assert [t["task_id"] for t in await _inbox(api, "vera", body["order_no"])] == [task_id]


async def test_cancel_and_payment_signal(live_api: Api):
    api = live_api
    body = order_body(800_000)
    order_no = body["order_no"]
    assert (await api.post("/orders", "alice", json=body)).status_code == 201
    r = await api.post(
        f"/orders/{order_no}/payments",
        "fiona",
        json={"event_id": f"ev-{order_no}", "amount": "10.00"},
    )
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] is True and r.json()["paid"] == "10.00"
    r = await api.post(f"/orders/{order_no}/cancel", "bob", json={"reason": "not mine"})
    assert r.status_code == 404  # another requester's order is not revealed
    r = await api.post(f"/orders/{order_no}/cancel", "alice", json={"reason": "changed mind"})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "cancelled"
    # the instance has ended: signals and updates are 409
    r = await api.post(
        f"/orders/{order_no}/payments", "fiona", json={"event_id": "ev-late", "amount": "1"}
    )
    assert r.status_code == 409, r.text
    r = await api.post(f"/orders/{order_no}/amend", "mike", json={"description": "x"})
    assert r.status_code == 409, r.text


async def test_search_through_visibility(live_api: Api):
    api = live_api
    customer = f"CUST-{uuid.uuid4().hex[:8]}"
    body = order_body(900_000)
    body["customer"]["id"] = customer
    assert (await api.post("/orders", "alice", json=body)).status_code == 201
    # visibility is eventually consistent: poll
    hits: list[dict] = []
    deadline = time.monotonic() + 20
    while not hits and time.monotonic() < deadline:
        r = await api.get(
            "/orders/search", "mike", params={"customer_id": customer, "min_amount": 800000}
        )
        assert r.status_code == 200, r.text
        hits = r.json()["items"]
        await asyncio.sleep(0.5)
    assert [h["order_no"] for h in hits] == [body["order_no"]]
    assert hits[0]["amount"] == 900000.0
    assert hits[0]["status"] == "RUNNING"
    r = await api.get("/orders/search", "mike", params={"customer_id": customer, "max_amount": 100})
    assert r.json()["items"] == []
    # quotes in values are escaped, not injected
    r = await api.get("/orders/search", "mike", params={"customer_id": "x' OR Stage != '"})
    assert r.status_code == 200, r.text
    assert r.json()["items"] == []


async def test_replayed_submissions_write_nothing_to_the_instance_history(
    live_api: Api, client: Client
):
    body = order_body(1_200_000)
    first = await live_api.post("/orders", "alice", json=body)
    assert first.status_code == 201, first.text
    wid = first.json()["workflow_id"]
    assert wid == sales_order_workflow_id(body["order_no"])
    assert wid.startswith("sales_order-")
    handle = client.get_workflow_handle(wid)
    before = len((await handle.fetch_history()).events)

    for _ in range(10):
        again = await live_api.post("/orders", "alice", json=body)
        assert again.status_code == 200, again.text
        assert again.json()["settled"] is True
        assert again.json()["stage"] == "approval"
        assert [t["task_id"] for t in again.json()["pending_tasks"]] == [
            t["task_id"] for t in first.json()["pending_tasks"]
        ]
    assert len((await handle.fetch_history()).events) == before


async def _legacy_instance(
    client: Client, sessions, settings: Settings, requester: str = "alice"
) -> tuple[dict, str]:
    """An instance started as before the rename ('sales-order-<no>'), with its read model."""
    body = order_body(1_200_000, order_no=f"L{uuid.uuid4().hex[:8]}")
    inp = SalesOrderInput.model_validate({**body, "requester": requester})
    wid = f"{LEGACY_WORKFLOW_ID_PREFIX}{inp.order_no}"
    await client.start_workflow(
        SalesOrderWorkflow.run,
        inp,
        id=wid,
        task_queue=settings.task_queue,
        memo={MEMO_FINGERPRINT: input_fingerprint(inp)},
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(PROCESS_TYPE, "sales_order"),
                SearchAttributePair(CUSTOMER_ID, inp.customer.id),
            ]
        ),
    )
    deadline = time.monotonic() + 30
    while True:
        async with sessions() as s:
            row = await s.get(Order, inp.order_no)
        if row is not None:
            break
        assert time.monotonic() < deadline, "the legacy instance wrote no read model"
        await asyncio.sleep(0.2)
    assert row.workflow_id == wid
    return body, wid


async def test_an_order_under_a_legacy_id_is_reached_under_that_id(
    live_api: Api, client: Client, sessions, settings: Settings
):
    body, wid = await _legacy_instance(client, sessions, settings)
    order_no = body["order_no"]

    status = await _wait_for_stage(live_api, order_no, "approval")
    assert status["workflow_id"] == wid
    r = await live_api.get(f"/orders/{order_no}", "alice")
    assert r.status_code == 200 and r.json()["workflow_id"] == wid, r.text

    # resubmitting never starts a second instance under the new id
    again = await live_api.post("/orders", "alice", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["workflow_id"] == wid
    changed = await live_api.post("/orders", "alice", json={**body, "loyalty_discount": True})
    assert changed.status_code == 409, changed.text
    with pytest.raises(RPCError) as err:
        await client.get_workflow_handle(sales_order_workflow_id(order_no)).describe()
    assert err.value.status == RPCStatusCode.NOT_FOUND

    # search strips the legacy prefix
    deadline = time.monotonic() + 20
    while True:
        r = await live_api.get(
            "/orders/search", "mike", params={"customer_id": body["customer"]["id"], "limit": 200}
        )
        hits = [h for h in r.json()["items"] if h["workflow_id"] == wid]
        if hits:
            break
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.3)
    assert hits[0]["order_no"] == order_no

    r = await live_api.post(
        f"/orders/{order_no}/payments", "fiona", json={"event_id": f"ev-{order_no}", "amount": "5"}
    )
    assert r.status_code == 202, r.text
    r = await live_api.post(f"/orders/{order_no}/amend", "alice", json={"description": "blue"})
    assert r.status_code == 200, r.text
    assert r.json()["special_change"] is True
    r = await live_api.post(f"/orders/{order_no}/cancel", "bob", json={"reason": "x"})
    assert r.status_code == 404, r.text
    r = await live_api.post(f"/orders/{order_no}/cancel", "alice", json={"reason": "no longer"})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "cancelled" and r.json()["workflow_id"] == wid
