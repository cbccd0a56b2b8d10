"""The inbox query of `GET /tasks` on SQLite and PostgreSQL: keyset pages (`after`) walk the
inbox as offset pages do, ties of created_at included; `count=false` leaves `total` null and
the page unchanged; both ways of finding the page (from the caller's candidate rows, or by
walking the open tasks in order) give the same answer; bad paging parameters are a 422 naming
the parameter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from fastapi import HTTPException
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.testing import ActivityEnvironment

from activities.models import ProjectionBatch, TaskSnapshot
from activities.records import RecordActivities
from api.routers import tasks as tasks_router
from api.routers.tasks import inbox
from api.schemas import Principal, TaskPage
from core.db import make_engine, make_session_factory
from tests.api.conftest import Api

T0 = datetime(2026, 3, 2, 8, 30, tzinfo=UTC)
VICTOR = Principal(
    username="victor", display_name="Victor", email="victor@example.com", roles=["vice-president"]
)
# the two ways the handler finds a page: 0 candidate rows are "few" never, 10**6 always
PLANS = {"walk_open_tasks": 0, "from_candidates": 1_000_000}


def _task(
    n: int,
    *,
    roles: list[str] | None = None,
    minutes: int = 0,
    assignee: str | None = None,
    requester: str = "alice",
    status: str = "open",
) -> TaskSnapshot:
    return TaskSnapshot(
        task_id=f"sales_order-Q{n}.t1",
        workflow_id=f"sales_order-Q{n}",
        process_type="sales_order",
        business_key=f"Q{n}",
        name="vice-president approval",
        kind="approval",
        candidate_roles=roles if roles is not None else ["vice-president"],
        assignee=assignee,
        requester=requester,
        outcomes=["approved", "rejected"],
        status=status,  # type: ignore[arg-type]
        outcome="approved" if status == "closed" else None,
        decided_by="victor" if status == "closed" else None,
        created_at=T0 + timedelta(minutes=minutes),
        closed_at=T0 + timedelta(hours=5) if status == "closed" else None,
        revision=1,
    )


# Victor's inbox, oldest first: ties of created_at (minute 3 twice, minute 7 three times) are
# ordered by task_id; around them tasks he must not see.
VISIBLE = [
    _task(10, minutes=1),
    _task(11, minutes=2, roles=["manager", "vice-president"]),
    _task(12, minutes=3),
    _task(13, minutes=3, roles=["sales-director"], assignee="victor"),  # assigned to him
    _task(14, minutes=5),
    _task(15, minutes=7),
    _task(16, minutes=7),
    _task(17, minutes=7),
    _task(18, minutes=9),
    _task(19, minutes=11),
    _task(20, minutes=12),
]
HIDDEN = [
    _task(30, minutes=4, roles=["sales-director"]),  # another role
    _task(31, minutes=6, status="closed"),
    _task(32, minutes=8, requester="victor"),  # his own request
    _task(33, minutes=7, assignee="vera"),  # taken by another vice-president
]
TAKEN = "sales_order-Q33.t1"


@pytest_asyncio.fixture
async def any_sessions(any_db_url: str) -> AsyncIterator[async_sessionmaker]:
    """A migrated SQLite and PostgreSQL database in turn, with the tasks above projected."""
    engine = make_engine(any_db_url)
    sessions = make_session_factory(engine)
    await ActivityEnvironment().run(
        RecordActivities(sessions).project, ProjectionBatch(tasks=[*VISIBLE, *HIDDEN])
    )
    try:
        yield sessions
    finally:
        await engine.dispose()


@pytest.fixture(params=list(PLANS))
def plan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(tasks_router, "ROLE_DRIVEN_BELOW", PLANS[request.param])
    return request.param


async def _page(
    sessions: async_sessionmaker, user: Principal = VICTOR, **params: object
) -> TaskPage:
    kwargs: dict[str, object] = {
        "kind": None,
        "business_key": None,
        "name": None,
        "include_taken": False,
        "limit": 50,
        "offset": 0,
        "after": None,
        "count": True,
    }
    kwargs.update(params)
    async with sessions() as session:
        return await inbox(user, session, **kwargs)  # type: ignore[arg-type]


def _ids(page: TaskPage) -> list[str]:
    return [item.task_id for item in page.items]


async def test_keyset_pages_walk_the_inbox_as_offset_pages_do(any_sessions, plan):
    expected = sorted(VISIBLE, key=lambda t: (t.created_at, t.task_id))
    expected_ids = [t.task_id for t in expected]
    assert _ids(await _page(any_sessions)) == expected_ids

    keyset: list[list[str]] = []
    after = None
    while True:
        page = await _page(any_sessions, limit=3, after=after)
        if not page.items:
            break
        assert page.total == len(VISIBLE)  # the count is of the whole inbox, not the rest
        keyset.append(_ids(page))
        after = page.items[-1].task_id
    by_offset = [
        _ids(await _page(any_sessions, limit=3, offset=offset))
        for offset in range(0, len(VISIBLE), 3)
    ]
    assert keyset == by_offset
    assert [i for chunk in keyset for i in chunk] == expected_ids
    # after a task in the middle of a tie of created_at: the rest of the tie, then the later ones
    tail = await _page(any_sessions, after="sales_order-Q15.t1")
    assert _ids(tail) == expected_ids[expected_ids.index("sales_order-Q15.t1") + 1 :]
    # after the last one: nothing; include_taken pages the taken task in its place
    assert _ids(await _page(any_sessions, after=expected_ids[-1])) == []
    taken = await _page(any_sessions, include_taken=True, after="sales_order-Q16.t1", limit=2)
    assert _ids(taken) == ["sales_order-Q17.t1", TAKEN]


async def test_count_false_leaves_total_null_and_the_page_as_it_was(any_sessions, plan):
    counted = await _page(any_sessions, limit=4)
    uncounted = await _page(any_sessions, limit=4, count=False)
    assert (counted.total, uncounted.total) == (len(VISIBLE), None)
    assert _ids(uncounted) == _ids(counted)
    deeper = await _page(any_sessions, limit=4, count=False, after=counted.items[-1].task_id)
    assert deeper.total is None
    assert _ids(deeper) == _ids(await _page(any_sessions, limit=4, offset=4))


async def test_both_plans_find_the_same_inbox_for_every_filter(any_sessions, monkeypatch):
    queries = [
        {},
        {"include_taken": True},
        {"business_key": "Q13"},
        {"kind": "acknowledge"},
        {"limit": 2, "offset": 3},
    ]
    users = [
        VICTOR,
        Principal(
            username="diana", display_name="D", email="d@x.example", roles=["sales-director"]
        ),
        Principal(username="nobody", display_name="N", email="n@x.example", roles=[]),
    ]
    answers: dict[str, list[tuple[int | None, list[str]]]] = {}
    for name, below in PLANS.items():
        monkeypatch.setattr(tasks_router, "ROLE_DRIVEN_BELOW", below)
        answers[name] = [
            ((p := await _page(any_sessions, user, **q)).total, _ids(p))
            for user in users
            for q in queries
        ]
    assert answers["walk_open_tasks"] == answers["from_candidates"]
    assert answers["walk_open_tasks"][5 + 0] == (
        1,
        ["sales_order-Q30.t1"],  # diana: the sales-director's pooled task; Q13 is victor's
    )


async def test_few_candidate_rows_are_told_from_many_by_the_threshold(any_sessions, monkeypatch):
    # victor: a candidate row per vice-president task (open or closed, his own requests too),
    # and one per open task assigned to him
    vp_rows = 1 + sum("vice-president" in t.candidate_roles for t in [*VISIBLE, *HIDDEN])
    async with any_sessions() as session:
        monkeypatch.setattr(tasks_router, "ROLE_DRIVEN_BELOW", vp_rows)
        assert await tasks_router._few_candidates(session, VICTOR) is True
        monkeypatch.setattr(tasks_router, "ROLE_DRIVEN_BELOW", vp_rows - 1)
        assert await tasks_router._few_candidates(session, VICTOR) is False


async def test_paging_by_offset_and_after_at_once_or_after_an_unseen_task_is_422(any_sessions):
    with pytest.raises(HTTPException) as err:
        await _page(any_sessions, offset=3, after="sales_order-Q10.t1")
    assert err.value.status_code == 422
    assert err.value.detail[0]["loc"] == ["query", "offset"]
    for after, user in (
        ("sales_order-NOPE.t1", VICTOR),
        # a requester sees only her own tasks: another's id answers as if it did not exist
        (
            "sales_order-Q10.t1",
            Principal(username="bob", display_name="B", email="b@x.example", roles=["requester"]),
        ),
    ):
        with pytest.raises(HTTPException) as err:
            await _page(any_sessions, user, after=after)
        assert err.value.status_code == 422
        assert err.value.detail[0]["loc"] == ["query", "after"]
        assert after in err.value.detail[0]["msg"]


async def test_inbox_over_http_pages_by_after_without_the_count(api: Api, sessions):
    await ActivityEnvironment().run(
        RecordActivities(sessions).project, ProjectionBatch(tasks=[*VISIBLE, *HIDDEN])
    )
    first = await api.get("/tasks", "victor", params={"limit": 4, "count": "false"})
    assert first.status_code == 200, first.text
    assert first.json()["total"] is None
    ids = [t["task_id"] for t in first.json()["items"]]
    rest = await api.get("/tasks", "victor", params={"limit": 50, "after": ids[-1]})
    assert rest.status_code == 200, rest.text
    assert rest.json()["total"] == len(VISIBLE)
    assert len(ids) + len(rest.json()["items"]) == len(VISIBLE)
    both = await api.get("/tasks", "victor", params={"offset": 1, "after": ids[-1]})
    assert both.status_code == 422
    assert both.json()["detail"][0]["loc"] == ["query", "offset"]
    unknown = await api.get("/tasks", "victor", params={"after": "sales_order-NOPE.t1"})
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["query", "after"]
