"""The proof of issue 12 §3: a second coded process (tests/processes/review.py, a document
review on the kernel), registered here and nowhere else, runs on the real worker and is driven
only through HTTP: listed by /process-types, started, read, searched, cancelled and sent events
through /processes, its task decided through the inbox, and projected into the read model."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from core.db import ProcessInstance, SlaEvent, StageVisit, TaskRow
from scripts.mailsink import MailSink
from tests.api.conftest import Api
from tests.processes.review import (
    REVIEW,
    CommentAdded,
    ReviewStart,
    review_workflow_id,
)
from tests.support import eventually
from workflows import registry
from workflows.registry import ProcessType

pytestmark = pytest.mark.timeout(180)

START = "/processes/review"


@pytest.fixture
def review() -> Iterator[ProcessType]:
    """The review process type, registered for this test only."""
    registry.register(REVIEW)
    try:
        yield REVIEW
    finally:
        registry.unregister(REVIEW.name)


@pytest.fixture
def worker(review: ProcessType, worker: None) -> None:
    """The real worker of tests/api/conftest.py, built once the review type is registered (it
    runs the registry's workflows)."""
    return worker


def _doc_no() -> str:
    return f"DOC-{uuid.uuid4().hex[:10].upper()}"


def _body(doc_no: str, **extra: object) -> dict:
    return {"doc_no": doc_no, "title": "Supplier contract 2027", **extra}


async def _inbox(api: Api, user: str, doc_no: str) -> list[dict]:
    r = await api.get("/tasks", user, params={"business_key": doc_no})
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def _instance(sessions: async_sessionmaker, doc_no: str) -> ProcessInstance | None:
    async with sessions() as s:
        return await s.scalar(
            select(ProcessInstance).where(
                ProcessInstance.process_type == "review", ProcessInstance.business_key == doc_no
            )
        )


async def _visits(sessions: async_sessionmaker, doc_no: str) -> list[tuple]:
    async with sessions() as s:
        rows = await s.scalars(
            select(StageVisit)
            .where(StageVisit.workflow_id == review_workflow_id(doc_no))
            .order_by(StageVisit.seq)
        )
        return [(v.seq, v.stage, v.left_at is not None, v.outcome, v.by) for v in rows]


# ------------------------------------------------------------------------------ the type
async def test_the_review_is_listed_with_its_schemas_stages_roles_and_policy(
    api: Api, review: ProcessType
):
    listed = {t["name"]: t for t in (await api.get("/process-types", "alice")).json()}
    one = await api.get("/process-types/review", "alice")
    assert one.status_code == 200, one.text
    assert listed["review"] == one.json()
    got = one.json()
    assert got["title"] == "Document review"
    assert got["start_schema"] == ReviewStart.model_json_schema()
    assert set(got["start_schema"]["required"]) == {"doc_no", "title"}
    assert got["stages"] == ["submitted", "review", "approved", "rejected", "cancelled"]
    assert got["terminal_stages"] == ["approved", "rejected", "cancelled"]
    assert got["roles"] == ["requester", "manager"] and got["start_roles"] == []
    assert got["events"] == [
        {
            "name": "comment_added",
            "description": "a comment on the document, from the document system",
            "roles": [],
            "body_schema": CommentAdded.model_json_schema(),
        }
    ]
    assert got["cancellable"] is True and got["cancel_roles"] == []
    assert got["has_policy"] is True and got["policy_version"] == 0
    assert "sales_order" in listed  # beside the built-in type


# ------------------------------------------------------------------------------ start
@pytest.mark.parametrize(
    "change,loc",
    [
        pytest.param({"requester": "mike"}, ["body", "requester"], id="requester-in-body"),
        pytest.param({"doc_no": "has space"}, ["body", "doc_no"], id="bad-doc-no"),
        pytest.param({"title": ""}, ["body", "title"], id="empty-title"),
        pytest.param({"customer_id": 42}, ["body", "customer_id"], id="customer-id-not-text"),
    ],
)
async def test_a_bad_start_body_is_422_naming_the_field_and_starts_nothing(
    api: Api,
    review: ProcessType,
    client: Client,
    sessions: async_sessionmaker,
    change: dict,
    loc: list,
):
    doc_no = _doc_no()
    r = await api.post(START, "alice", json=_body(doc_no) | change)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [loc]
    with pytest.raises(RPCError) as err:
        await client.get_workflow_handle(review_workflow_id(doc_no)).describe()
    assert err.value.status == RPCStatusCode.NOT_FOUND
    assert await _instance(sessions, doc_no) is None


async def test_a_start_is_idempotent_by_doc_no_and_another_body_conflicts(
    live_api: Api, client: Client
):
    doc_no = _doc_no()
    first = await live_api.post(START, "alice", json=_body(doc_no))
    assert first.status_code == 201, first.text
    started = first.json()
    assert started["workflow_id"] == review_workflow_id(doc_no) == f"review-{doc_no}"
    assert (started["doc_no"], started["requester"], started["stage"]) == (
        doc_no,
        "alice",
        "review",
    )
    [task] = started["pending_tasks"]
    assert task["candidate_roles"] == ["manager"] and task["outcomes"] == ["approved", "rejected"]
    handle = client.get_workflow_handle(started["workflow_id"])
    before = len((await handle.fetch_history()).events)

    again = await live_api.post(START, "alice", json=_body(doc_no))
    assert again.status_code == 200, again.text
    assert again.json()["pending_tasks"][0]["task_id"] == task["task_id"]
    other = await live_api.post(START, "alice", json=_body(doc_no, title="Another document"))
    assert other.status_code == 409, other.text
    assert other.json() == {"detail": "this business key is already used by another instance"}
    by_bob = await live_api.post(START, "bob", json=_body(doc_no))
    assert by_bob.status_code == 409, by_bob.text
    assert len((await handle.fetch_history()).events) == before  # nothing written


# ------------------------------------------------------------------------------ the approved path
async def test_a_manager_claims_releases_and_approves_it_through_the_inbox(
    live_api: Api, sessions: async_sessionmaker
):
    api, doc_no, customer = live_api, _doc_no(), f"CUST-{uuid.uuid4().hex[:8]}"
    r = await api.post(START, "alice", json=_body(doc_no, customer_id=customer))
    assert r.status_code == 201, r.text
    url = f"{START}/{doc_no}"

    status = await api.get(url, "alice")
    assert status.status_code == 200, status.text
    assert status.json()["stage"] == "review" and status.json()["title"] == "Supplier contract 2027"
    assert (await api.get(url, "mike")).json() == status.json()
    hidden = await api.get(url, "bob")  # another requester's review is not revealed
    assert hidden.status_code == 404 and hidden.json() == {"detail": f"review {doc_no} not found"}

    # the inbox (read model): the manager's, nobody else's, never the requester's
    [task] = await _inbox(api, "mike", doc_no)
    assert (task["process_type"], task["requester"]) == ("review", "alice")
    assert await _inbox(api, "victor", doc_no) == []
    assert await _inbox(api, "alice", doc_no) == []
    task_url = f"/tasks/{task['task_id']}"

    refused = await api.post(f"{task_url}/decision", "alice", json={"outcome": "approved"})
    assert refused.status_code == 403, refused.text
    assert refused.json() == {
        "detail": "alice requested this process and may not decide its own task"
    }
    r = await api.post(f"{task_url}/claim", "victor")
    assert r.status_code == 403, r.text  # not a manager
    claimed = await api.post(f"{task_url}/claim", "mike")
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["assignee"] == "mike"
    assert (await _inbox(api, "mike", doc_no))[0]["assignee"] == "mike"
    released = await api.post(f"{task_url}/release", "mike")
    assert released.status_code == 200, released.text
    assert released.json()["assignee"] is None

    # the external event: validated, accepted once, then a duplicate, a changed one conflicts
    events = f"{url}/events/comment_added"
    for bad, loc in (({"comment_id": "c1"}, "text"), ({"comment_id": "c1", "text": ""}, "text")):
        r = await api.post(events, "mike", json=bad)
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["detail"]] == [["body", loc]]
    r = await api.post(events, "mike", json={"comment_id": "c1", "text": "ok", "actor": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "actor"]
    comment = {"comment_id": "c1", "text": "clause 4 checked"}
    accepted = await api.post(events, "mike", json=comment)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["duplicate"] is False
    assert accepted.json()["outcome"]["comments"] == {"c1": "clause 4 checked"}
    again = await api.post(events, "mike", json=comment)
    assert again.status_code == 202, again.text
    assert again.json()["duplicate"] is True
    changed = await api.post(events, "mike", json={"comment_id": "c1", "text": "other"})
    assert changed.status_code == 409, changed.text
    assert "c1" in changed.json()["detail"]

    # visibility is eventually consistent: search (every type) until it waits for a manager
    async def waiting() -> dict | None:
        params = {"pending_role": "manager", "customer_id": customer}
        page = await api.get("/processes", "mike", params=params)
        assert page.status_code == 200, page.text
        return next(iter(page.json()["items"]), None)

    hit = await eventually(waiting, "the review waiting for a manager in visibility")
    assert (hit["business_key"], hit["stage"], hit["status"]) == (doc_no, "review", "RUNNING")
    assert hit["pending_roles"] == ["manager"] and hit["customer_id"] == customer

    decided = await api.post(
        f"{task_url}/decision", "mike", json={"outcome": "approved", "comment": "fine"}
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["stage"] == "approved"
    assert decided.json()["task"]["decided_by"] == "mike"
    final = (await api.get(url, "alice")).json()
    assert (final["stage"], final["pending_tasks"], final["waiting_for"]) == ("approved", [], "")
    assert [(d["outcome"], d["actor"]) for d in final["decisions"]] == [("approved", "mike")]
    assert await _inbox(api, "mike", doc_no) == []
    r = await api.post(events, "mike", json={"comment_id": "c2", "text": "late"})
    assert r.status_code == 409, r.text  # the review has ended
    r = await api.post(f"{url}/cancel", "alice", json={"reason": "too late"})
    assert r.status_code == 409, r.text

    # and until the ended review shows up as such in a search of its type and stage
    async def found() -> dict | None:
        params = {"process_type": "review", "customer_id": customer, "stage": "approved"}
        page = await api.get("/processes", "mike", params=params)
        assert page.status_code == 200, page.text
        hits = [h for h in page.json()["items"] if h["status"] == "COMPLETED"]
        return hits[0] if hits else None

    hit = await eventually(found, "the approved review in visibility")
    assert (hit["business_key"], hit["workflow_id"]) == (doc_no, review_workflow_id(doc_no))
    assert (hit["process_type"], hit["requester"]) == ("review", "alice")
    mine = await api.get("/processes", "bob", params={"process_type": "review"})
    assert doc_no not in [h["business_key"] for h in mine.json()["items"]]

    # the read model: the instance, its stage visits and its task
    instance = await _instance(sessions, doc_no)
    assert instance is not None
    assert (instance.workflow_id, instance.stage, instance.status) == (
        review_workflow_id(doc_no),
        "approved",
        "completed",
    )
    assert instance.requester == "alice" and instance.closed_at is not None
    assert instance.policy_version == 0  # nothing published: the built-in defaults
    assert instance.summary == {"title": "Supplier contract 2027", "customer_id": customer}
    assert await _visits(sessions, doc_no) == [
        (1, "submitted", True, None, "system"),
        (2, "review", True, "approved", "mike"),
        (3, "approved", False, None, None),
    ]
    async with sessions() as s:
        row = await s.get(TaskRow, task["task_id"])
    assert row is not None
    assert (row.status, row.outcome, row.decided_by) == ("closed", "approved", "mike")


# ------------------------------------------------------------------------------ the cancelled path
async def test_the_requester_cancels_a_reminded_review_and_no_one_else_may(
    live_api: Api, sessions: async_sessionmaker, mail_sink: MailSink
):
    api, doc_no = live_api, _doc_no()
    # a policy whose reminder fires within a second (published through the policy endpoint)
    current = (await api.get("/policies/review", "alice")).json()
    assert current["version"] == 0
    document = current["document"]
    document["review_timers"]["remind_after"] = "PT1S"
    r = await api.post("/policies/review", "ada", json={"document": document})
    assert r.status_code == 201, r.text
    assert (await api.get("/process-types/review", "alice")).json()["policy_version"] == 1
    r = await api.post(START, "alice", json=_body(doc_no))
    assert r.status_code == 201, r.text
    assert r.json()["policy_version"] == 1
    [task] = r.json()["pending_tasks"]
    wid = review_workflow_id(doc_no)

    async def reminded() -> list[SlaEvent]:
        async with sessions() as s:
            rows = await s.scalars(select(SlaEvent).where(SlaEvent.workflow_id == wid))
            return [e for e in rows if e.kind == "reminded"]

    [event] = await eventually(reminded, "the reminder's SLA event")
    assert (event.task_id, event.sla) == (task["task_id"], "review")

    def reminder_mail() -> list:
        return [
            m
            for m in mail_sink.messages
            if m["Subject"] == "Reminder: review is waiting for you"
            and "mike@example.com" in m["To"]
        ]

    async def mailed() -> list:
        return reminder_mail()

    await eventually(mailed, "the reminder mail to the manager")

    url = f"{START}/{doc_no}/cancel"
    r = await api.post(url, "mike", json={"reason": "not mine to cancel"})
    assert r.status_code == 403, r.text
    assert r.json() == {"detail": "only the requester may cancel it"}
    r = await api.post(url, "bob", json={"reason": "not mine"})
    assert r.status_code == 404, r.text
    r = await api.post(url, "alice", json={})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "reason"]
    cancelled = await api.post(url, "alice", json={"reason": "withdrawn by legal"})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["stage"] == "cancelled"
    assert cancelled.json()["outcome_reason"] == "cancelled by the requester: withdrawn by legal"
    assert cancelled.json()["pending_tasks"] == []
    assert (await api.get(f"{START}/{doc_no}", "mike")).json()["stage"] == "cancelled"
    assert await _inbox(api, "mike", doc_no) == []
    again = await api.post(url, "alice", json={"reason": "twice"})
    assert again.status_code == 409, again.text

    instance = await _instance(sessions, doc_no)
    assert instance is not None
    assert (instance.stage, instance.status, instance.policy_version) == (
        "cancelled",
        "cancelled",
        1,
    )
    assert instance.closed_at is not None
    assert await _visits(sessions, doc_no) == [
        (1, "submitted", True, None, "system"),
        (2, "review", True, "cancelled", "alice"),
        (3, "cancelled", False, None, None),
    ]
    async with sessions() as s:
        row = await s.get(TaskRow, task["task_id"])
    assert row is not None and (row.status, row.outcome) == ("closed", "withdrawn")
