"""The complaint blueprint end to end, through HTTP only, on the real worker and the dev server:
published at start-up from blueprints/complaint.yaml, listed by /process-types, started, decided
through the inbox, sent its feedback event, searched, cancelled, projected into the read model,
and mailed to the customer over SMTP; a running v1 keeps its rules while v2 is published and a
new instance takes v2."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client

from core.db import ProcessInstance, StageVisit
from scripts.mailsink import MailSink
from tests.api.conftest import Api
from tests.support import eventually
from workflows.blueprint import check

pytestmark = pytest.mark.timeout(240)

START = "/processes/complaint"
SEED = Path(__file__).resolve().parents[2] / "blueprints" / "complaint.yaml"


def _ticket_no() -> str:
    return f"T-{uuid.uuid4().hex[:10].upper()}"


def _body(ticket_no: str, **extra: object) -> dict:
    return {
        "ticket_no": ticket_no,
        "company_name": "ACME Ltd",
        "customer_email": f"buyer-{ticket_no.lower()}@acme.example",
        "channel": "web",
        "summary": "The mugs arrived broken.",
        **extra,
    }


async def _task(api: Api, user: str, ticket_no: str) -> dict:
    """The one open task of the ticket in the user's inbox."""

    async def found() -> dict | None:
        r = await api.get("/tasks", user, params={"business_key": ticket_no})
        assert r.status_code == 200, r.text
        items = [t for t in r.json()["items"] if t["status"] == "open"]
        return items[0] if len(items) == 1 else None

    return await eventually(found, f"an open task of {ticket_no} in {user}'s inbox")


async def _decide(api: Api, user: str, task_id: str, outcome: str, **body: object):
    return await api.post(f"/tasks/{task_id}/decision", user, json={"outcome": outcome, **body})


async def test_the_complaint_is_listed_with_its_input_schema_stages_and_roles(api: Api):
    r = await api.get("/process-types/complaint", "alice")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["title"] == "Customer complaint"
    schema = got["start_schema"]
    assert set(schema["required"]) == {
        "ticket_no",
        "company_name",
        "customer_email",
        "channel",
        "summary",
    }
    assert schema["properties"]["channel"]["enum"] == ["email", "phone", "web", "crm"]
    assert {"acknowledge", "resolve", "closed", "declined"} <= set(got["stages"])
    assert {"support", "service-manager"} <= set(got["roles"])
    assert [e["name"] for e in got["events"]] == ["feedback_received"]


async def test_a_bad_start_body_is_422_naming_the_field_and_starts_nothing(
    api: Api, client: Client, sessions: async_sessionmaker
):
    ticket_no = _ticket_no()
    for change, loc in (
        ({"channel": "fax"}, ["body", "channel"]),
        ({"customer_email": "nobody"}, ["body", "customer_email"]),
        ({"requester": "mike"}, ["body", "requester"]),
    ):
        r = await api.post(START, "alice", json=_body(ticket_no) | change)
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["detail"]] == [loc], r.text
    r = await api.post(START, "alice", json={"ticket_no": ticket_no})
    assert r.status_code == 422
    assert {tuple(e["loc"]) for e in r.json()["detail"]} >= {("body", "summary")}
    async with sessions() as s:
        assert (
            await s.scalar(select(ProcessInstance).where(ProcessInstance.business_key == ticket_no))
            is None
        )


async def test_a_complaint_runs_through_the_inbox_to_the_customer_and_its_feedback(
    live_api: Api, sessions: async_sessionmaker, mail_sink: MailSink
):
    api, ticket_no = live_api, _ticket_no()
    r = await api.post(START, "alice", json=_body(ticket_no))
    assert r.status_code == 201, r.text
    started = r.json()
    assert (started["stage"], started["requester"]) == ("acknowledge", "alice")
    assert started["workflow_id"] == f"complaint-{ticket_no}"
    again = await api.post(START, "alice", json=_body(ticket_no))
    assert again.status_code == 200, again.text  # the same start again

    task = await _task(api, "stan", ticket_no)
    r = await _decide(api, "stan", task["task_id"], "acknowledged")
    assert r.status_code == 200, r.text

    # the customer's acknowledgement goes out over SMTP
    address = _body(ticket_no)["customer_email"]

    async def acknowledged() -> list:
        return [m for m in mail_sink.messages if address in m["To"]]

    await eventually(acknowledged, "the acknowledgement mail to the customer")

    task = await _task(api, "stan", ticket_no)
    # a choice the form does not offer, a missing required field: 422, nothing changes
    r = await _decide(
        api, "stan", task["task_id"], "recorded", fields={"category": "weather", "severity": "low"}
    )
    assert r.status_code == 422, r.text
    assert "category" in r.text
    r = await _decide(api, "stan", task["task_id"], "recorded", fields={"category": "service"})
    assert r.status_code == 422, r.text
    assert "severity" in r.text
    r = await _decide(
        api, "alice", task["task_id"], "recorded", fields={"category": "service", "severity": "low"}
    )
    assert r.status_code in (403, 404), r.text  # the requester: not hers to decide
    r = await _decide(
        api, "stan", task["task_id"], "recorded", fields={"category": "service", "severity": "low"}
    )
    assert r.status_code == 200, r.text

    task = await _task(api, "stan", ticket_no)
    r = await _decide(
        api, "stan", task["task_id"], "resolved", fields={"resolution": "Sent new mugs."}
    )
    assert r.status_code == 200, r.text

    async def waiting_for_feedback() -> dict | None:
        status = (await api.get(f"{START}/{ticket_no}", "alice")).json()
        return status if status["stage"] == "feedback" else None

    status = await eventually(waiting_for_feedback, "the feedback stage")
    assert status["open_steps"] == ["feedback_received"]
    event = f"{START}/{ticket_no}/events/feedback_received"
    r = await api.post(event, "alice", json={"score": 9})
    assert r.status_code == 422, r.text
    r = await api.post(event, "alice", json={"score": 2, "remarks": "Slow."})
    assert r.status_code == 202, r.text
    r = await api.post(event, "alice", json={"score": 2, "remarks": "Slow."})
    assert r.status_code == 409, r.text  # nothing waits for it any more

    task = await _task(api, "marco", ticket_no)  # an unhappy customer: a call back
    r = await _decide(api, "marco", task["task_id"], "done")
    assert r.status_code == 422, r.text  # needs a comment
    r = await _decide(api, "marco", task["task_id"], "done", comment="Called back, all good.")
    assert r.status_code == 200, r.text

    async def closed() -> ProcessInstance | None:
        async with sessions() as s:
            row = await s.scalar(
                select(ProcessInstance).where(
                    ProcessInstance.process_type == "complaint",
                    ProcessInstance.business_key == ticket_no,
                )
            )
            return row if row is not None and row.status == "completed" else None

    row = await eventually(closed, "the read model's closed instance")
    assert (row.stage, row.definition_kind) == ("closed", "blueprint")
    assert row.definition_version == started["version"]
    async with sessions() as s:
        visits = (
            await s.scalars(
                select(StageVisit.stage)
                .where(StageVisit.workflow_id == started["workflow_id"])
                .order_by(StageVisit.seq)
            )
        ).all()
    assert visits == [
        "acknowledge",
        "record",
        "resolve",
        "notify",
        "feedback",
        "follow_up",
        "closed",
    ]

    # Temporal visibility: the type, the end stage and the requester, searchable like a sales
    # order's (eventually consistent)
    async def listed() -> dict | None:
        r = await api.get(
            "/processes", "marco", params={"process_type": "complaint", "stage": "closed"}
        )
        assert r.status_code == 200, r.text
        return next((h for h in r.json()["items"] if h["business_key"] == ticket_no), None)

    hit = await eventually(listed, "the closed complaint in Temporal visibility")
    assert (hit["workflow_id"], hit["requester"]) == (started["workflow_id"], "alice")
    assert hit["pending_roles"] == []


async def test_a_waiting_complaint_is_found_by_the_role_it_waits_for(live_api: Api):
    api, ticket_no = live_api, _ticket_no()
    r = await api.post(START, "alice", json=_body(ticket_no))
    assert r.status_code == 201, r.text

    async def listed() -> dict | None:
        r = await api.get("/processes", "stan", params={"pending_role": "support"})
        assert r.status_code == 200, r.text
        return next((h for h in r.json()["items"] if h["business_key"] == ticket_no), None)

    hit = await eventually(listed, "the waiting complaint under PendingRoles = support")
    assert (hit["process_type"], hit["stage"]) == ("complaint", "acknowledge")
    assert hit["pending_roles"] == ["support"]


async def test_the_requester_cancels_a_complaint(live_api: Api):
    api, ticket_no = live_api, _ticket_no()
    r = await api.post(START, "alice", json=_body(ticket_no))
    assert r.status_code == 201, r.text
    r = await api.post(f"{START}/{ticket_no}/cancel", "bob", json={"reason": "not mine"})
    assert r.status_code in (403, 404), r.text
    r = await api.post(f"{START}/{ticket_no}/cancel", "alice", json={"reason": "duplicate"})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "cancelled"
    assert r.json()["pending_tasks"] == []


async def test_a_running_v1_keeps_its_rules_while_v2_is_published_and_new_ones_take_v2(
    live_api: Api,
):
    api = live_api
    old_no, new_no = _ticket_no(), _ticket_no()
    r = await api.post(START, "alice", json=_body(old_no))
    assert r.status_code == 201, r.text
    v1 = r.json()["version"]

    # v2: the acknowledgement is done by the support lead instead
    document = check.load_yaml(SEED.read_text())
    document["stages"]["acknowledge"]["do"][0]["roles"] = ["support-lead"]
    r = await api.post("/definitions/complaint", "ada", json=document)
    assert r.status_code == 201, r.text
    v2 = r.json()["version"]
    assert v2 != v1
    try:
        r = await api.post(START, "alice", json=_body(new_no))
        assert r.status_code == 201, r.text
        assert r.json()["version"] == v2
        [new_task] = r.json()["pending_tasks"]
        assert new_task["candidate_roles"] == ["support-lead"]

        old = (await api.get(f"{START}/{old_no}", "alice")).json()
        assert old["version"] == v1
        [old_task] = old["pending_tasks"]
        assert old_task["candidate_roles"] == ["support"]  # v1's rule
        r = await _decide(api, "stan", old_task["task_id"], "acknowledged")
        assert r.status_code == 200, r.text
        r = await _decide(api, "stan", new_task["task_id"], "acknowledged")
        assert r.status_code == 403, r.text  # v2 wants the lead
        r = await _decide(api, "lea", new_task["task_id"], "acknowledged")
        assert r.status_code == 200, r.text
    finally:  # the seed is current again for the other tests of this process
        seed = check.load_yaml(SEED.read_text())
        r = await api.post("/definitions/complaint", "ada", json=seed)
        assert r.status_code in (200, 201), r.text


async def test_an_admin_moves_a_waiting_complaint_to_the_current_version(live_api: Api):
    api, ticket_no = live_api, _ticket_no()
    r = await api.post(START, "alice", json=_body(ticket_no))
    assert r.status_code == 201, r.text
    v1 = r.json()["version"]
    url = f"{START}/{ticket_no}/migrate"
    r = await api.post(url, "ada", json={"version": "current"})
    assert r.status_code == 409, r.text  # it runs the current version already
    document = check.load_yaml(SEED.read_text())
    document["title"] = "Customer complaint (v2)"
    r = await api.post("/definitions/complaint", "ada", json=document)
    assert r.status_code == 201, r.text
    v2 = r.json()["version"]
    try:
        r = await api.post(url, "marco", json={"version": v2})
        assert r.status_code == 403, r.text  # admins only
        r = await api.post(url, "ada", json={"version": "sha256:" + "0" * 64})
        assert r.status_code == 404, r.text
        r = await api.post(url, "ada", json={"version": v2, "reason": "new title", "x": 1})
        assert r.status_code == 422, r.text  # unknown field
        r = await api.post(url, "ada", json={"version": v2, "reason": "new title"})
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["title"]) == (v2, "Customer complaint (v2)")
        assert v1 != v2
        r = await api.post("/processes/sales_order/X-1/migrate", "ada", json={})
        assert r.status_code == 409, r.text  # a coded process
    finally:
        seed = check.load_yaml(SEED.read_text())
        r = await api.post("/definitions/complaint", "ada", json=seed)
        assert r.status_code in (200, 201), r.text
