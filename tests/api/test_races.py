"""Concurrency and duplicates: racing requests record exactly one outcome, the others get 409,
and the audit log agrees with the workflow history."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from core.db import AuditEntry, LedgerEntry, Order
from tests.api.conftest import Api, order_body
from tests.support import record_figure
from workflows.sales_order import sales_order_workflow_id

pytestmark = pytest.mark.timeout(120)


async def _accepted_updates(client: Client, order_no: str, name: str) -> int:
    """Updates the instance accepted (a validator refusal leaves no event)."""
    handle = client.get_workflow_handle(sales_order_workflow_id(order_no))
    accepted = [
        e
        async for e in handle.fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
        and e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
        == name
    ]
    return len(accepted)


async def _audit(sessions, order_no: str, prefix: str) -> list[AuditEntry]:
    async with sessions() as s:
        rows = await s.execute(
            select(AuditEntry).where(
                AuditEntry.workflow_id == sales_order_workflow_id(order_no),
                AuditEntry.action.startswith(prefix),
            )
        )
        return list(rows.scalars())


async def _signed_in(api: Api, *users: str) -> None:
    """Sign in before the race: only the requests race, not password checks (a sign-in that
    finds every check slot busy on a loaded machine is a 503, not what is tested here)."""
    for user in users:
        await api.login(user)


def _duplicates(found: int) -> None:
    record_figure("duplicates found", found, add=True)


async def test_same_start_sent_five_times_at_once_makes_one_instance(live_api: Api, sessions):
    body = order_body(600_000)
    await _signed_in(live_api, "alice")
    responses = await asyncio.gather(
        *(live_api.post("/orders", "alice", json=body) for _ in range(5))
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 200, 200, 201], [r.text for r in responses]
    assert len({r.json()["workflow_id"] for r in responses}) == 1
    async with sessions() as s:
        orders = (
            await s.execute(
                select(func.count()).select_from(Order).where(Order.order_no == body["order_no"])
            )
        ).scalar_one()
    _duplicates(orders - 1)
    assert orders == 1


async def test_same_decision_sent_twice_at_once_records_one(live_api: Api, client, sessions):
    status = (await live_api.post("/orders", "alice", json=order_body(1_200_000))).json()
    task_id = status["pending_tasks"][0]["task_id"]
    url = f"/tasks/{task_id}/decision"
    await _signed_in(live_api, "victor")
    first, second = await asyncio.gather(
        live_api.post(url, "victor", json={"outcome": "approved"}),
        live_api.post(url, "victor", json={"outcome": "approved"}),
    )
    audited = await _audit(sessions, status["order_no"], "decided:")
    accepted = await _accepted_updates(client, status["order_no"], "decide")
    _duplicates(max(0, len(audited) - 1) + max(0, accepted - 1))
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    assert len(audited) == 1
    assert accepted == 1


async def test_two_approvers_racing_for_one_task(live_api: Api, client, sessions):
    # alice's order: both victor and vera hold the vice-president role
    status = (await live_api.post("/orders", "alice", json=order_body(700_000))).json()
    task_id = status["pending_tasks"][0]["task_id"]
    url = f"/tasks/{task_id}/decision"
    await _signed_in(live_api, "victor", "vera")
    victor, vera = await asyncio.gather(
        live_api.post(url, "victor", json={"outcome": "approved"}),
        live_api.post(url, "vera", json={"outcome": "rejected", "comment": "too risky"}),
    )
    assert sorted([victor.status_code, vera.status_code]) == [200, 409]
    winner = "victor" if victor.status_code == 200 else "vera"
    audited = await _audit(sessions, status["order_no"], "decided:")
    assert [a.actor for a in audited] == [winner]
    assert await _accepted_updates(client, status["order_no"], "decide") == 1
    final = (await live_api.get(f"/orders/{status['order_no']}", "alice")).json()
    assert [d["actor"] for d in final["decisions"]] == [winner]


@pytest.mark.parametrize("round_", range(3))
async def test_approve_and_cancel_racing_end_in_one_consistent_outcome(
    live_api: Api, client, sessions, round_
):
    status = (await live_api.post("/orders", "alice", json=order_body(600_000))).json()
    no = status["order_no"]
    task_id = status["pending_tasks"][0]["task_id"]
    await _signed_in(live_api, "victor", "mike")
    approve, cancel = await asyncio.gather(
        live_api.post(f"/tasks/{task_id}/decision", "victor", json={"outcome": "approved"}),
        live_api.post(f"/orders/{no}/cancel", "mike", json={"reason": "customer called"}),
    )
    assert approve.status_code in (200, 409) and cancel.status_code in (200, 409), (
        approve.text,
        cancel.text,
    )
    final = (await live_api.get(f"/orders/{no}", "alice")).json()
    for _ in range(50):  # an approval may still be shipping the order
        if final["stage"] in ("closed", "cancelled"):
            break
        await asyncio.sleep(0.2)
        final = (await live_api.get(f"/orders/{no}", "alice")).json()
    async with sessions() as s:
        ledger = list(
            (await s.execute(select(LedgerEntry).where(LedgerEntry.order_no == no))).scalars()
        )
    charged = sum(e.amount for e in ledger if e.kind == "charge")
    refunded = sum(e.amount for e in ledger if e.kind == "refund")
    if cancel.status_code == 200:
        assert final["stage"] == "cancelled"
        assert charged == refunded  # whatever was taken was given back
    else:
        assert approve.status_code == 200 and final["stage"] == "closed"
        assert charged == 600_000 and refunded == 0
    assert len([e for e in ledger if e.kind == "charge"]) <= 1
    decided = await _audit(sessions, no, "decided:")
    assert len(decided) == await _accepted_updates(client, no, "decide")
    cancels = await _audit(sessions, no, "cancel_requested")
    assert len(cancels) == await _accepted_updates(client, no, "cancel")
