"""End to end through the API: special change, prepaid payments, policy versions, bad decisions."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.api.conftest import Api, order_body

pytestmark = pytest.mark.timeout(120)


async def _decide(api: Api, task_id: str, user: str, **body):
    return await api.post(f"/tasks/{task_id}/decision", user, json=body)


async def _inbox_ids(api: Api, user: str, order_no: str) -> list[str]:
    r = await api.get("/tasks", user, params={"business_key": order_no})
    assert r.status_code == 200, r.text
    return [t["task_id"] for t in r.json()["items"]]


async def test_special_change_needs_three_acknowledgements_through_the_api(live_api: Api):
    api = live_api
    body = order_body(600_000)
    no = body["order_no"]
    started = (await api.post("/orders", "alice", json=body)).json()
    vp_task = started["pending_tasks"][0]["task_id"]
    r = await api.post(f"/orders/{no}/amend", "alice", json={"description": "blue logo"})
    assert r.status_code == 200, r.text
    assert r.json()["special_change"] is True
    acks = {u: await _inbox_ids(api, u, no) for u in ("paula", "pete", "ivy")}
    assert all(len(ids) == 1 for ids in acks.values()), acks
    # an approver cannot acknowledge for production
    wrong = await api.post(f"/tasks/{acks['pete'][0]}/acknowledge", "victor", json={})
    assert wrong.status_code == 403
    assert (await _decide(api, vp_task, "victor", outcome="approved")).status_code == 200
    for user in ("paula", "pete"):
        r = await api.post(f"/tasks/{acks[user][0]}/acknowledge", user, json={"comment": "ok"})
        assert r.status_code == 200, r.text
    status = (await api.get(f"/orders/{no}", "alice")).json()
    assert status["stage"] == "paid"  # held before stock reservation until inspection agrees
    assert [t["kind"] for t in status["pending_tasks"]] == ["acknowledgement"]
    r = await api.post(f"/tasks/{acks['ivy'][0]}/acknowledge", "ivy", json={})
    assert r.status_code == 200
    # answered once the step it caused is written (before the stock reservation), not at closed
    assert r.json()["stage"] == "paid"
    from tests.api.test_orders_e2e import _wait_for_stage

    assert (await _wait_for_stage(api, no, "closed"))["stage"] == "closed"
    # the read model agrees (the helper waits for it at an end stage)
    listed = (await api.get("/orders", "mike", params={"stage": "closed"})).json()
    assert no in [o["order_no"] for o in listed["items"]]


async def test_prepaid_order_waits_for_the_reported_payment(live_api: Api):
    api = live_api
    body = order_body(2_000_000, variant="prepaid_entry")
    no = body["order_no"]
    status = (await api.post("/orders", "alice", json=body)).json()
    assert status["stage"] == "awaiting_payment"
    assert status["pending_tasks"][0]["kind"] == "payment"
    # only finance may report payments; the amount must be positive
    assert (
        await api.post(
            f"/orders/{no}/payments", "alice", json={"event_id": "e1", "amount": "2000000"}
        )
    ).status_code == 403
    bad = await api.post(f"/orders/{no}/payments", "fiona", json={"event_id": "e1", "amount": 0})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "amount"
    for _ in range(2):  # the provider redelivers the same event
        r = await api.post(
            f"/orders/{no}/payments", "fiona", json={"event_id": "e1", "amount": "2000000"}
        )
        assert r.status_code == 202
    from tests.api.test_orders_e2e import _wait_for_stage

    final = await _wait_for_stage(api, no, "closed")
    assert final["stage"] == "closed"
    assert final["paid"] == "2000000.00"
    assert [p["kind"] for p in final["payments"]] == ["incoming"]
    # the one decision is the payment task's, closed as paid by the process itself
    payment_task = status["pending_tasks"][0]["task_id"]
    assert [(d["task_id"], d["outcome"], d["actor"]) for d in final["decisions"]] == [
        (payment_task, "paid", "system")
    ]


async def test_new_policy_version_applies_to_new_orders_only(live_api: Api):
    api = live_api
    running = (await api.post("/orders", "alice", json=order_body(600_000))).json()
    assert running["policy_version"] == 1
    doc = (await api.get("/policies/sales_order", "ada")).json()["document"]
    doc["approval_tiers"][0]["min_amount"] = "100"
    r = await api.post("/policies/sales_order", "ada", json={"document": doc, "note": "tighter"})
    assert r.status_code == 201 and r.json()["version"] == 2
    new = (await api.post("/orders", "alice", json=order_body(200))).json()
    assert new["policy_version"] == 2 and new["stage"] == "approval"
    still = (await api.get(f"/orders/{running['order_no']}", "alice")).json()
    assert still["policy_version"] == 1


async def test_rejection_needs_a_comment_and_an_allowed_outcome(live_api: Api):
    api = live_api
    status = (await api.post("/orders", "alice", json=order_body(700_000))).json()
    task_id = status["pending_tasks"][0]["task_id"]
    r = await _decide(api, task_id, "victor", outcome="rejected")
    assert r.status_code == 422 and "comment" in r.text
    r = await _decide(api, task_id, "victor", outcome="maybe")
    assert r.status_code == 422 and "outcome" in r.text
    r = await _decide(api, task_id, "victor", outcome="rejected", comment="price too low")
    assert r.status_code == 200 and r.json()["stage"] == "rejected"
    assert (await _decide(api, task_id, "victor", outcome="approved")).status_code == 409


async def test_one_provider_event_pays_one_order_and_is_refused_elsewhere(live_api: Api):
    """The tester's repro: one event id posted to four prepaid orders paid only the first."""
    api = live_api
    orders = []
    for _ in range(4):
        body = order_body(100, variant="prepaid_entry")
        assert (await api.post("/orders", "alice", json=body)).status_code == 201
        orders.append(body["order_no"])
    first, *others = orders
    event = {"event_id": f"E-{first}-a", "amount": "100.00"}
    r = await api.post(f"/orders/{first}/payments", "fiona", json=event)
    assert r.status_code == 202 and r.json()["paid"] == "100.00", r.text
    again = await api.post(f"/orders/{first}/payments", "fiona", json=event)
    assert again.status_code == 202 and again.json()["duplicate"] is True
    for no, amount in zip(others, ("100.00", "5000.00", "50.00"), strict=True):
        r = await api.post(
            f"/orders/{no}/payments",
            "fiona",
            json={"event_id": event["event_id"], "amount": amount},
        )
        assert r.status_code == 409, r.text
        assert event["event_id"] in r.json()["detail"]
    for no in others:
        st = (await api.get(f"/orders/{no}", "alice")).json()
        assert st["stage"] == "awaiting_payment" and Decimal(st["paid"]) == 0
    # cancelling one of them refunds nothing of the first order's money
    r = await api.post(f"/orders/{others[-1]}/cancel", "alice", json={"reason": "probe"})
    assert r.status_code == 200 and Decimal(r.json()["refunded"]) == 0, r.text
    from tests.api.test_orders_e2e import _wait_for_stage

    final = await _wait_for_stage(api, first, "closed")
    figures = [Decimal(final[k]) for k in ("paid", "refunded", "balance")]
    assert figures == [Decimal(100), 0, 0]
