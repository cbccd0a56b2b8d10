"""The authorization cells of delegation and reassignment, through the API as the tester tried
them: whoever finally decides must hold a candidate role, never be the requester, and a
manager's reassignment goes only to someone entitled."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client

from core.db import TaskRow
from tests.api.conftest import Api, order_body

BIG = 600_000  # one vice-president task
UPDATE_ACCEPTED = "workflow_execution_update_accepted_event_attributes"


async def _order(api: Api, as_: str) -> tuple[str, str]:
    body = order_body(BIG)
    r = await api.post("/orders", as_, json=body)
    assert r.status_code == 201, r.text
    return body["order_no"], r.json()["pending_tasks"][0]["task_id"]


async def _decide(api: Api, task: str, as_: str) -> int:
    r = await api.post(f"/tasks/{task}/decision", as_, json={"outcome": "approved"})
    return r.status_code


async def test_delegating_to_a_user_without_the_role_is_refused(live_api: Api):
    _, task = await _order(live_api, "alice")
    r = await live_api.post(f"/tasks/{task}/delegate", "victor", json={"to_user": "pete"})
    assert r.status_code == 403 and "pete" in r.json()["detail"], r.text
    assert await _decide(live_api, task, "pete") == 403


async def test_a_manager_who_ordered_cannot_reassign_his_task_to_a_requester(live_api: Api):
    _, task = await _order(live_api, "mike")
    assert await _decide(live_api, task, "mike") == 403
    r = await live_api.post(f"/tasks/{task}/reassign", "mike", json={"to_user": "alice"})
    assert r.status_code == 403, r.text
    assert await _decide(live_api, task, "alice") == 404  # not even visible to her


async def test_a_manager_reassigns_only_to_someone_entitled_and_decides_nothing(live_api: Api):
    no, task = await _order(live_api, "alice")
    r = await live_api.post(f"/tasks/{task}/delegate", "mike", json={"to_user": "mike"})
    assert r.status_code == 403, r.text
    assert await _decide(live_api, task, "mike") == 403
    r = await live_api.post(f"/tasks/{task}/reassign", "mike", json={"to_user": "victor"})
    assert r.status_code == 200 and r.json()["assignee"] == "victor", r.text
    assert await _decide(live_api, task, "victor") == 200


RETIRED = "retired_process"  # a type this deployment does not register


async def _set_process_type(sessions: async_sessionmaker, task: str, process_type: str) -> str:
    async with sessions.begin() as session:
        row = await session.get(TaskRow, task)
        assert row is not None
        row.process_type = process_type
        return row.workflow_id


async def _updates(client: Client, workflow_id: str) -> list[str]:
    """The names of the updates the workflow accepted so far."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return [
        e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
        for e in history.events
        if e.HasField(UPDATE_ACCEPTED)
    ]


async def test_a_task_of_an_unregistered_process_type_is_refused_naming_it_and_nothing_is_sent(
    live_api: Api, client: Client, sessions: async_sessionmaker
):
    _, task = await _order(live_api, "alice")
    workflow_id = await _set_process_type(sessions, task, RETIRED)
    before = await _updates(client, workflow_id)
    actions = [
        ("decision", {"json": {"outcome": "approved"}}),
        ("acknowledge", {}),
        ("claim", {}),
        ("release", {}),
        ("delegate", {"json": {"to_user": "victor"}}),
        ("reassign", {"json": {"to_user": "victor"}}),
    ]
    for action, kw in actions:
        r = await live_api.post(f"/tasks/{task}/{action}", "victor", **kw)
        assert r.status_code == 409, (action, r.text)
        assert RETIRED in r.json()["detail"], (action, r.text)
    assert await _updates(client, workflow_id) == before, "an update reached the workflow"
    # the only obstacle was the type: registered again, the same decision goes through
    await _set_process_type(sessions, task, "sales_order")
    assert await _decide(live_api, task, "victor") == 200
