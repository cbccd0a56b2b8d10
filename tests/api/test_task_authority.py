"""The authorization cells of delegation and reassignment, through the API as the tester tried
them: whoever finally decides must hold a candidate role, never be the requester, and a
manager's reassignment goes only to someone entitled."""

from __future__ import annotations

from tests.api.conftest import Api, order_body

BIG = 600_000  # one vice-president task


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
