"""A requester sees and touches only their own instances (404, never 403: existence is hidden);
self-approval is refused and the refusal audited; the acting user never comes from a body."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from api.routers.orders import ORDER_NO_TAKEN
from api.routers.tasks import DECISION_REFUSED
from core.db import AuditEntry
from core.settings import Settings
from tests.api.conftest import order_body
from tests.security.conftest import ROOT, Api, bearer
from tests.security.test_authorization import route_table
from workflows.sales_order import sales_order_workflow_id


async def _submit(api: Api, user: str, amount: int = 1_200_000) -> tuple[str, str]:
    body = order_body(amount)
    r = await api.post("/orders", user, json=body)
    assert r.status_code == 201, r.text
    pending = r.json()["pending_tasks"]
    return body["order_no"], pending[0]["task_id"] if pending else ""


async def test_a_requester_gets_404_for_every_read_and_change_of_another_requesters_order(
    live_api: Api,
):
    order_no, task_id = await _submit(live_api, "alice")
    # bob's answer for alice's order and task is the one he gets for ids that do not exist:
    # same status, same body (but for the id he asked about), nothing of alice's in it
    absent_order, absent_task = f"{order_no}X", f"{task_id}X"
    reads = {
        f"/orders/{order_no}": (f"/orders/{absent_order}", absent_order, order_no),
        f"/tasks/{task_id}": (f"/tasks/{absent_task}", absent_task, task_id),
    }
    for url, (absent_url, absent_id, real_id) in reads.items():
        r = await live_api.get(url, "bob")
        nothing = await live_api.get(absent_url, "bob")
        assert (r.status_code, nothing.status_code) == (404, 404), (url, r.text, nothing.text)
        assert r.json() == json.loads(nothing.text.replace(absent_id, real_id)), (url, r.text)
        assert "alice" not in r.text and "ACME" not in r.text, (url, r.text)
    changes = {
        f"/orders/{order_no}/amend": {"description": "bob wants more"},
        f"/orders/{order_no}/cancel": {"reason": "bob does not like it"},
    }
    for url, body in changes.items():
        r = await live_api.post(url, "bob", json=body)
        assert r.status_code == 404, (url, r.text)
        assert r.json() == {"detail": f"order {order_no} not found"}
    # the owner still sees it unchanged, and may act on it
    r = await live_api.get(f"/orders/{order_no}", "alice")
    assert r.status_code == 200 and r.json()["stage"] == "approval", r.text
    assert r.json()["special_change"] is False
    r = await live_api.get(f"/tasks/{task_id}", "alice")
    assert r.status_code == 200, r.text
    # a role that grants more (sales) sees it
    r = await live_api.get(f"/orders/{order_no}", "sam")
    assert r.status_code == 200, r.text


async def test_reusing_another_requesters_order_number_is_409_revealing_nothing_of_it(
    live_api: Api,
):
    bobs = order_body(600_000)
    r = await live_api.post("/orders", "bob", json=bobs)
    assert r.status_code == 201, r.text
    order_no = bobs["order_no"]
    # alice's own order, resubmitted with other content: the answer she gets for bob's number
    alices = order_body(100)
    assert (await live_api.post("/orders", "alice", json=alices)).status_code == 201
    own = await live_api.post("/orders", "alice", json={**alices, "loyalty_discount": True})
    assert own.status_code == 409, own.text

    for body in (bobs, {**order_body(100), "order_no": order_no}):
        r = await live_api.post("/orders", "alice", json=body)
        assert r.status_code == 409, r.text
        assert r.json() == own.json() == {"detail": ORDER_NO_TAKEN}
    # every read or change of it stays 404 for her
    assert (await live_api.get(f"/orders/{order_no}", "alice")).status_code == 404
    for url, body in (
        (f"/orders/{order_no}/amend", {"description": "mine now"}),
        (f"/orders/{order_no}/cancel", {"reason": "mine now"}),
    ):
        r = await live_api.post(url, "alice", json=body)
        assert r.status_code == 404 and r.json() == {"detail": f"order {order_no} not found"}
    r = await live_api.get(f"/orders/{order_no}", "bob")
    assert r.json()["special_change"] is False and r.json()["stage"] == "approval"


async def test_order_lists_and_search_show_a_requester_only_their_own_orders(live_api: Api):
    alices, _ = await _submit(live_api, "alice", 100)
    bobs, _ = await _submit(live_api, "bob", 100)
    for user, own, other in (("alice", alices, bobs), ("bob", bobs, alices)):
        r = await live_api.get("/orders", user)
        listed = {o["order_no"] for o in r.json()["items"]}
        assert own in listed and other not in listed, (user, listed)
        assert {o["requester"] for o in r.json()["items"]} == {user}
    r = await live_api.get("/orders", "mike")
    assert {alices, bobs} <= {o["order_no"] for o in r.json()["items"]}

    # search reads eventually consistent visibility: wait until the manager sees both
    deadline = time.monotonic() + 15
    while True:
        r = await live_api.get("/orders/search", "mike", params={"customer_id": "CUST-ACME"})
        if {alices, bobs} <= {h["order_no"] for h in r.json()["items"]}:
            break
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.3)
    for user, own, other in (("alice", alices, bobs), ("bob", bobs, alices)):
        r = await live_api.get("/orders/search", user, params={"customer_id": "CUST-ACME"})
        hits = {h["order_no"] for h in r.json()["items"]}
        assert own in hits and other not in hits, (user, hits)


async def test_self_approval_is_refused_with_403_audited_and_leaves_the_task_open(
    live_api: Api, sessions: async_sessionmaker
):
    order_no, task_id = await _submit(live_api, "vera", 600_000)
    r = await live_api.post(f"/tasks/{task_id}/decision", "vera", json={"outcome": "approved"})
    assert r.status_code == 403, r.text
    reason = "vera requested this process and may not decide its own task"
    assert r.json() == {"detail": reason}

    async with sessions() as session:
        rows = (
            await session.scalars(select(AuditEntry).where(AuditEntry.action == DECISION_REFUSED))
        ).all()
    assert len(rows) == 1
    row = rows[0]
    assert (row.actor, row.task_id, row.comment) == ("vera", task_id, reason)
    assert row.workflow_id == sales_order_workflow_id(order_no)
    assert row.event_key.startswith("refused:") and row.at is not None

    r = await live_api.get(f"/tasks/{task_id}", "victor")
    assert r.json()["status"] == "open" and r.json()["decided_by"] is None
    r = await live_api.get(f"/orders/{order_no}", "vera")
    assert r.json()["stage"] == "approval" and r.json()["decisions"] == []


async def test_a_decision_the_workflow_refuses_as_not_permitted_is_audited(
    live_api: Api, sessions: async_sessionmaker
):
    _, task_id = await _submit(live_api, "alice", 600_000)
    r = await live_api.post(f"/tasks/{task_id}/decision", "diana", json={"outcome": "approved"})
    assert r.status_code == 403, r.text
    async with sessions() as session:
        row = await session.scalar(
            select(AuditEntry).where(
                AuditEntry.task_id == task_id, AuditEntry.action == DECISION_REFUSED
            )
        )
    assert row is not None and row.actor == "diana" and row.action == DECISION_REFUSED
    assert row.comment == r.json()["detail"]


FORBIDDEN_FIELDS = ["actor", "requester", "user", "username", "status", "decided_by"]
# the sign-in form: username is its credential; the codec cookie is made from the bearer token
NOT_A_BODY_OF_ITS_OWN = {("POST", "/auth/token"), ("POST", "/codec/session")}
# bodies that are a published document (JSON or YAML, read by the checker): an unknown key is a
# 422 naming it all the same; the dry run answers 200 listing it among the document's problems
DOCUMENTS = {("POST", "/definitions/{process}"), ("POST", "/definitions/{process}/validate")}


def _valid_body(path: str) -> dict:
    return {
        "/orders": order_body(100),
        "/orders/{order_no}/amend": {"description": "x"},
        "/orders/{order_no}/cancel": {"reason": "x"},
        "/orders/{order_no}/payments": {"event_id": "e", "amount": "1"},
        "/tasks/{task_id}/decision": {"outcome": "approved"},
        "/tasks/{task_id}/delegate": {"to_user": "victor"},
        "/policies/{process_type}": {"document": {}},
        "/processes/{process_type}": order_body(100),
        "/processes/{process_type}/{business_key}/cancel": {"reason": "x"},
        "/processes/{process_type}/{business_key}/events/{event}": {
            "event_id": "e",
            "amount": "1",
        },
        "/codec/decode": {"payloads": []},
        "/codec/encode": {"payloads": []},
    }.get(path, {})


@pytest.mark.parametrize("field", FORBIDDEN_FIELDS)
async def test_every_post_body_refuses_acting_user_and_status_fields(
    api: Api, app: FastAPI, settings: Settings, role_users: dict, field: str
):
    posts = [(m, p) for m, p in route_table(app) if m == "POST"]
    assert len(posts) >= 12
    checked = 0
    for method, path in posts:
        if (method, path) in NOT_A_BODY_OF_ITS_OWN:
            continue
        route = next(
            r
            for r in app.routes
            for r in getattr(r, "effective_route_contexts", lambda r=r: [])()
            if isinstance(r.original_route, APIRoute)
            and r.original_route.path == path
            and method in (r.original_route.methods or ())
        ).original_route
        url = path.format(
            order_no="X1",
            task_id="nope",
            process_type="sales_order",
            business_key="X1",
            event="payment",
            process="complaint",
        )
        body = {**_valid_body(path), field: "ada"}
        r = await api.http.post(url, json=body, headers=bearer(settings, ROOT))
        if (method, path) in DOCUMENTS:
            if path.endswith("/validate"):
                assert r.status_code == 200 and not r.json()["valid"], (path, field, r.text)
                assert field in {e["path"] for e in r.json()["errors"]}, (path, r.text)
            else:
                assert r.status_code == 422, (path, field, r.text)
                assert ["body", field] in [e["loc"] for e in r.json()["detail"]], r.text
            checked += 1
            continue
        assert route.body_field is not None, f"{path} takes no body"
        assert r.status_code == 422, (path, field, r.text)
        locs = [e["loc"] for e in r.json()["detail"]]
        assert ["body", field] in locs, (path, field, locs)
        assert any(e["type"] == "extra_forbidden" for e in r.json()["detail"])
        checked += 1
    assert checked == len(posts) - len(NOT_A_BODY_OF_ITS_OWN)
