"""The generic process gateway (/processes) on the real sales order workflow, worker, database
and visibility; /orders answers as its friendly alias."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.routers.orders import ORDER_NO_TAKEN
from core.db import Order
from tests.api.conftest import Api, order_body
from tests.processes.review import REVIEW
from workflows import registry
from workflows.sales_order import sales_order_workflow_id

pytestmark = pytest.mark.timeout(240)

START = "/processes/sales_order"


def _status_url(key: str) -> str:
    return f"{START}/{key}"


async def _wait(api: Api, key: str, stage: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = await api.get(_status_url(key), "mike")
        assert r.status_code == 200, r.text
        if r.json()["stage"] == stage:
            return r.json()
        assert time.monotonic() < deadline, r.json()
        await asyncio.sleep(0.3)


async def _assert_nothing_started(client: Client, sessions: async_sessionmaker, key: str) -> None:
    with pytest.raises(RPCError) as err:
        await client.get_workflow_handle(sales_order_workflow_id(key)).describe()
    assert err.value.status == RPCStatusCode.NOT_FOUND
    listed = [
        w async for w in client.list_workflows(f"WorkflowId = '{sales_order_workflow_id(key)}'")
    ]
    assert listed == []
    async with sessions() as s:
        assert await s.get(Order, key) is None


# ------------------------------------------------------------------------------ start
async def test_a_start_is_idempotent_and_another_body_under_its_key_conflicts(
    live_api: Api, client: Client
):
    body = order_body(1_200_000)
    key = body["order_no"]
    first = await live_api.post(START, "alice", json=body)
    assert first.status_code == 201, first.text
    started = first.json()
    assert started["workflow_id"] == sales_order_workflow_id(key)
    assert started["requester"] == "alice"
    assert started["stage"] == "approval"
    assert [t["candidate_roles"] for t in started["pending_tasks"]] == [["vice-president"]]
    handle = client.get_workflow_handle(started["workflow_id"])
    before = len((await handle.fetch_history()).events)

    again = await live_api.post(START, "alice", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["workflow_id"] == started["workflow_id"]
    assert [t["task_id"] for t in again.json()["pending_tasks"]] == [
        t["task_id"] for t in started["pending_tasks"]
    ]
    assert len((await handle.fetch_history()).events) == before  # nothing written

    changed = await live_api.post(START, "alice", json=order_body(1_300_000, order_no=key))
    assert changed.status_code == 409, changed.text
    assert changed.json() == {"detail": ORDER_NO_TAKEN}
    # the same body from another requester is another start too
    other = await live_api.post(START, "bob", json=body)
    assert other.status_code == 409, other.text
    assert len((await handle.fetch_history()).events) == before


@pytest.mark.parametrize(
    "change,loc",
    [
        pytest.param({"requester": "victor"}, ["body", "requester"], id="requester-in-body"),
        pytest.param({"lines": []}, ["body", "lines"], id="no-lines"),
        pytest.param({"order_no": "has space"}, ["body", "order_no"], id="bad-order-no"),
        pytest.param({"currency": "XYZ"}, ["body", "currency"], id="no-iso-currency"),
        pytest.param(
            {"lines": [{"sku": "SKU-NOPE", "quantity": "1", "unit_price": "10"}]},
            ["body", "lines", 0, "sku"],
            id="unknown-sku",
        ),
    ],
)
async def test_a_bad_start_body_is_422_naming_the_field_and_starts_nothing(
    api: Api, client: Client, sessions: async_sessionmaker, change: dict, loc: list
):
    body = order_body(100, **change)
    r = await api.post(START, "alice", json=body)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]], r.text
    assert all("input" not in e for e in r.json()["detail"])
    await _assert_nothing_started(client, sessions, body["order_no"])


async def test_a_start_needs_a_start_role_and_a_json_object(api: Api):
    r = await api.post(START, "fiona", json=order_body())
    assert r.status_code == 403, r.text
    assert r.json()["detail"] == "requires one of the roles: requester, sales, manager"
    r = await api.post(START, "alice", json=["not", "an", "object"])
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body"]


async def test_an_unknown_process_type_is_404_naming_it_on_every_route(api: Api):
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/processes/nope", {"json": {"anything": 1}}),
        ("GET", "/processes/nope/K1", {}),
        ("POST", "/processes/nope/K1/cancel", {"json": {}}),
        ("POST", "/processes/nope/K1/events/payment", {"json": {"bad": True}}),
    ]
    for method, url, kw in calls:
        r = await api.http.request(method, url, headers=await api.login("mike"), **kw)
        assert r.status_code == 404, (url, r.text)
        assert r.json() == {"detail": "unknown process type 'nope'"}, url
    # an event the type does not have: 404 naming it, before its body is looked at
    r = await api.post(f"{START}/K1/events/refund", "fiona", json={"bad": True})
    assert r.status_code == 404, r.text
    assert r.json() == {"detail": "process type sales_order has no event 'refund'"}
    # without credentials nothing is said about types
    r = await api.http.get("/processes/nope/K1")
    assert r.status_code == 401


@pytest.fixture
def uncancellable() -> Iterator[str]:
    """A second registered type: the document review (tests/processes) without cancellation."""
    name = f"test_type_{uuid.uuid4().hex[:8]}"
    registry.register(dataclasses.replace(REVIEW, name=name, cancel_update=None))
    try:
        yield name
    finally:
        registry.unregister(name)


async def test_a_type_without_cancellation_is_409_naming_it(api: Api, uncancellable: str):
    r = await api.post(f"/processes/{uncancellable}/K1/cancel", "mike", json={"reason": "x"})
    assert r.status_code == 409, r.text
    assert r.json() == {"detail": f"process type {uncancellable} cannot be cancelled"}


# ------------------------------------------------------------------------------ status
async def test_the_status_is_hidden_from_other_requesters_and_equals_the_orders_alias(
    live_api: Api,
):
    body = order_body(1_200_000)
    key = body["order_no"]
    assert (await live_api.post("/orders", "alice", json=body)).status_code == 201
    mine = await live_api.get(_status_url(key), "alice")
    assert mine.status_code == 200, mine.text
    alias = await live_api.get(f"/orders/{key}", "alice")
    assert alias.status_code == 200
    assert mine.json() == alias.json()
    assert (await live_api.get(_status_url(key), "mike")).json() == mine.json()

    # bob gets what he gets for a key that does not exist, nothing of alice's
    theirs = await live_api.get(_status_url(key), "bob")
    absent = await live_api.get(_status_url(f"{key}X"), "bob")
    assert (theirs.status_code, absent.status_code) == (404, 404)
    assert theirs.json() == {"detail": f"order {key} not found"}
    assert absent.json() == {"detail": f"order {key}X not found"}
    # a key that cannot be one is 422 before Temporal is asked
    r = await live_api.get(_status_url("no spaces"), "mike")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["path", "business_key"]

    # started through /processes, the alias knows it: the same start again is 200 there
    other = order_body(100)
    first = await live_api.post(START, "alice", json=other)
    assert first.status_code == 201, first.text
    again = await live_api.post("/orders", "alice", json=other)
    assert again.status_code == 200, again.text
    assert again.json()["workflow_id"] == first.json()["workflow_id"]


# ------------------------------------------------------------------------------ cancel, events
async def test_cancel_through_processes_by_the_requester(live_api: Api):
    body = order_body(800_000)
    key = body["order_no"]
    assert (await live_api.post(START, "alice", json=body)).status_code == 201
    cancel = f"{START}/{key}/cancel"
    r = await live_api.post(cancel, "bob", json={"reason": "not mine"})
    assert r.status_code == 404, r.text  # another requester's instance is not revealed
    assert r.json() == {"detail": f"order {key} not found"}
    r = await live_api.post(cancel, "victor", json={"reason": "no role for it"})
    assert r.status_code == 403, r.text
    assert "requester" in r.json()["detail"] and "manager" in r.json()["detail"]
    r = await live_api.post(cancel, "alice", json={})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "reason"]
    r = await live_api.post(cancel, "alice", json={"reason": "changed mind"})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "cancelled"
    status = await live_api.get(_status_url(key), "alice")
    assert status.json()["stage"] == "cancelled"
    # the instance has ended: its events are 409
    r = await live_api.post(
        f"{START}/{key}/events/payment", "fiona", json={"event_id": "late", "amount": "1"}
    )
    assert r.status_code == 409, r.text


async def test_the_payment_event_is_accepted_once_then_duplicate_and_a_changed_one_conflicts(
    live_api: Api,
):
    body = order_body(800_000)
    key = body["order_no"]
    assert (await live_api.post(START, "alice", json=body)).status_code == 201
    url = f"{START}/{key}/events/payment"
    event = {"event_id": f"ev-{key}", "amount": "10.00"}

    r = await live_api.post(url, "alice", json=event)
    assert r.status_code == 403, r.text  # finance reports payments
    assert r.json() == {"detail": "requires one of the roles: finance"}
    r = await live_api.post(url, "fiona", json={"event_id": "x", "amount": "-1"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "amount"]
    r = await live_api.post(url, "fiona", json={**event, "actor": "fiona"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "actor"]

    accepted = await live_api.post(url, "fiona", json=event)
    assert accepted.status_code == 202, accepted.text
    receipt = accepted.json()
    assert receipt["accepted"] is True and receipt["event"] == "payment"
    assert receipt["duplicate"] is False
    assert receipt["outcome"]["paid"] == "10.00"

    again = await live_api.post(url, "fiona", json=event)
    assert again.status_code == 202, again.text
    assert again.json()["duplicate"] is True
    assert again.json()["outcome"]["paid"] == "10.00"
    assert again.json()["outcome"]["duplicate"] is True

    conflict = await live_api.post(url, "fiona", json={**event, "amount": "11.00"})
    assert conflict.status_code == 409, conflict.text
    assert event["event_id"] in conflict.json()["detail"]
    # the alias answers the same for the same instance
    alias = await live_api.post(f"/orders/{key}/payments", "fiona", json=event)
    assert alias.status_code == 202, alias.text
    assert alias.json() == {"accepted": True, **again.json()["outcome"]}
    status = (await live_api.get(_status_url(key), "mike")).json()
    assert status["paid"] == "10.00"


# ------------------------------------------------------------------------------ search
async def _search(api: Api, user: str, **params) -> dict:
    r = await api.get("/processes", user, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def _until(api: Api, user: str, expected: set[str], timeout: float = 60, **params) -> dict:
    """Visibility is eventually consistent: wait until the search finds exactly expected."""
    deadline = time.monotonic() + timeout
    while True:
        page = await _search(api, user, limit=200, **params)
        if {h["business_key"] for h in page["items"]} == expected:
            return page
        assert time.monotonic() < deadline, (params, page)
        await asyncio.sleep(0.3)


async def _start(api: Api, user: str, customer: str, amount: int) -> str:
    body = order_body(amount)
    body["customer"]["id"] = customer
    r = await api.post(START, user, json=body)
    assert r.status_code == 201, r.text
    return body["order_no"]


async def test_search_narrows_by_each_filter(live_api: Api):
    customer = f"CUST-{uuid.uuid4().hex[:8]}"  # these instances only, on the shared server
    before = datetime.now(UTC) - timedelta(seconds=1)
    waiting = [await _start(live_api, "alice", customer, 1_200_000) for _ in range(2)]
    small = await _start(live_api, "bob", customer, 100)  # no approval: runs to its end
    await _wait(live_api, small, "closed")
    everything = set(waiting) | {small}

    page = await _until(live_api, "mike", everything, customer_id=customer)
    hit = next(h for h in page["items"] if h["business_key"] == small)
    assert hit["process_type"] == "sales_order"
    assert hit["workflow_id"] == sales_order_workflow_id(small)
    assert hit["requester"] == "bob" and hit["customer_id"] == customer
    await _until(live_api, "mike", everything, customer_id=customer, process_type="sales_order")
    await _until(live_api, "mike", set(waiting), customer_id=customer, requester="alice")
    await _until(live_api, "mike", {small}, customer_id=customer, stage="closed")
    await _until(live_api, "mike", set(waiting), customer_id=customer, stage="approval")
    await _until(live_api, "mike", {small}, customer_id=customer, status="COMPLETED")
    await _until(live_api, "mike", set(waiting), customer_id=customer, status="RUNNING")
    page = await _until(
        live_api, "mike", set(waiting), customer_id=customer, pending_role="vice-president"
    )
    assert all(h["pending_roles"] == ["vice-president"] for h in page["items"])
    await _until(live_api, "mike", set(), customer_id=customer, pending_role="sales-director")
    await _until(
        live_api, "mike", everything, customer_id=customer, started_after=before.isoformat()
    )
    page = await _until(
        live_api, "mike", set(), customer_id=customer, started_before=before.isoformat()
    )
    assert "StartTime <" in page["query"]
    # the requester sees her own only, whatever requester she names
    await _until(live_api, "bob", {small}, customer_id=customer)
    await _until(live_api, "bob", set(), customer_id=customer, requester="alice")
    # quotes in values are escaped, not injected
    await _until(live_api, "mike", set(), customer_id="x' OR Stage != '")


@pytest.mark.parametrize(
    "params,loc",
    [
        pytest.param({"stage": "nonsense"}, ["query", "stage"], id="unknown-stage"),
        pytest.param({"process_type": "nope"}, ["query", "process_type"], id="unknown-type"),
        pytest.param({"status": "SLEEPING"}, ["query", "status"], id="unknown-status"),
        pytest.param({"started_after": "yesterday"}, ["query", "started_after"], id="bad-date"),
        pytest.param(
            {"started_after": "2026-02-01T00:00:00Z", "started_before": "2026-01-01T00:00:00Z"},
            ["query", "started_before"],
            id="empty-range",
        ),
        pytest.param({"limit": 500}, ["query", "limit"], id="limit-too-large"),
        pytest.param({"page_token": "forged"}, ["query", "page_token"], id="forged-token"),
    ],
)
async def test_a_bad_search_filter_is_422_naming_it(api: Api, params: dict, loc: list):
    r = await api.get("/processes", "mike", params=params)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc


async def test_a_requesters_search_pages_are_full_pages_of_her_own(live_api: Api):
    customer = f"CUST-{uuid.uuid4().hex[:8]}"
    alices = {await _start(live_api, "alice", customer, 100) for _ in range(3)}
    # newer instances of another requester come first: a page filtered after paging would
    # hold none of alice's
    bobs = {await _start(live_api, "bob", customer, 100) for _ in range(3)}
    await _until(live_api, "mike", alices | bobs, customer_id=customer)

    pages: list[list[str]] = []
    params: dict = {"customer_id": customer, "limit": 2}
    while True:
        page = await _search(live_api, "alice", **params)
        assert "Requester = 'alice'" in page["query"]
        if page["items"]:
            pages.append([h["business_key"] for h in page["items"]])
        if page["next_page_token"] is None:
            break
        token = page["next_page_token"]
        params = {**params, "page_token": token}
        assert len(pages) <= 3, pages
    assert [len(p) for p in pages] == [2, 1], pages
    assert set(sum(pages, [])) == alices
    # a token is good for the search it came from only
    r = await live_api.get(
        "/processes",
        "alice",
        params={"customer_id": customer, "stage": "closed", "page_token": token},
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["query", "page_token"]


# ------------------------------------------------------------------------------ OpenAPI
@pytest.fixture
def review() -> Iterator[str]:
    """A second registered type: the document review of tests/processes."""
    registry.register(REVIEW)
    try:
        yield REVIEW.name
    finally:
        registry.unregister(REVIEW.name)


def _refs(schema: dict) -> set[str]:
    return {ref["$ref"].removeprefix("#/components/schemas/") for ref in schema["anyOf"]}


def test_the_openapi_documents_the_start_schema_of_every_process_type(app: FastAPI, review: str):
    schema = app.openapi()
    # blueprint types another test of this process published are documented too: left out here
    blueprints = [t for t in registry.PROCESS_TYPES.values() if t.is_blueprint]
    theirs = {f"process.{t.start_model.__name__}" for t in blueprints} | {
        f"process.{m.__name__}"
        for t in blueprints
        for m in [t.status_model, *(e.model for e in t.events.values())]
    }
    coded = {t.name for t in blueprints}.isdisjoint
    start = schema["paths"]["/processes/{process_type}"]["post"]
    body = start["requestBody"]["content"]["application/json"]["schema"]
    assert _refs(body) - theirs == {"process.OrderDetails", "process.ReviewStart"}
    listed = {k: v for k, v in start["x-process-types"].items() if coded({k})}
    assert listed == {"sales_order": "OrderDetails", review: "ReviewStart"}
    components = schema["components"]["schemas"]
    assert "order_no" in components["process.OrderDetails"]["properties"]
    assert components["process.ReviewStart"]["required"] == ["doc_no", "title"]
    status = start["responses"]["201"]["content"]["application/json"]["schema"]
    assert _refs(status) - theirs == {"process.SalesOrderStatus", "process.ReviewStatus"}
    event = schema["paths"]["/processes/{process_type}/{business_key}/events/{event}"]["post"]
    event_body = event["requestBody"]["content"]["application/json"]["schema"]
    assert _refs(event_body) - theirs == {"process.PaymentEvent", "process.CommentAdded"}
    assert {k: v for k, v in event["x-process-events"].items() if coded({k})} == {
        "sales_order": {"payment": "PaymentEvent"},
        review: {"comment_added": "CommentAdded"},
    }
    for path in (
        "/processes",
        "/processes/{process_type}/{business_key}",
        "/processes/{process_type}/{business_key}/cancel",
    ):
        assert schema["paths"][path], path
