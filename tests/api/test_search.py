"""Search through Temporal visibility: a requester's pages are full pages of their own orders
(the ownership filter is part of the visibility query, not applied to a page afterwards)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.api.conftest import Api, order_body

pytestmark = pytest.mark.timeout(180)


async def _submit(api: Api, user: str, customer: str) -> str:
    body = order_body(100)
    body["customer"]["id"] = customer
    r = await api.post("/orders", user, json=body)
    assert r.status_code == 201, r.text
    return body["order_no"]


async def _search(api: Api, user: str, **params) -> dict:
    r = await api.get("/orders/search", user, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def _until_visible(api: Api, customer: str, expected: set[str]) -> None:
    """Visibility is eventually consistent: wait until the manager sees every order."""
    deadline = time.monotonic() + 30
    while True:
        page = await _search(api, "mike", customer_id=customer, limit=200)
        if expected <= {h["order_no"] for h in page["items"]}:
            return
        assert time.monotonic() < deadline, page
        await asyncio.sleep(0.3)


async def test_a_requester_with_more_orders_than_a_page_gets_full_pages_of_her_own(
    live_api: Api,
):
    customer = f"CUST-{uuid.uuid4().hex[:8]}"
    alices = [await _submit(live_api, "alice", customer) for _ in range(5)]
    # newer orders of another requester come first in visibility: a page filtered after
    # paging would hold none of alice's
    bobs = [await _submit(live_api, "bob", customer) for _ in range(4)]
    await _until_visible(live_api, customer, set(alices) | set(bobs))

    first = await _search(live_api, "alice", customer_id=customer, limit=2)
    second = await _search(live_api, "alice", customer_id=customer, limit=2, offset=2)
    third = await _search(live_api, "alice", customer_id=customer, limit=2, offset=4)
    pages = [[h["order_no"] for h in p["items"]] for p in (first, second, third)]
    assert [len(p) for p in pages] == [2, 2, 1], pages
    assert sorted(sum(pages, [])) == sorted(alices)
    assert "Requester = 'alice'" in first["query"]

    everything = await _search(live_api, "alice", customer_id=customer, limit=200)
    assert {h["order_no"] for h in everything["items"]} == set(alices)
    # a role that sees every order is not narrowed to its own
    managers = await _search(live_api, "mike", customer_id=customer, limit=5)
    assert len(managers["items"]) == 5
    assert "Requester" not in managers["query"]
