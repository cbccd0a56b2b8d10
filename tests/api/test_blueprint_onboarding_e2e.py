"""Customer onboarding (a seed blueprint) end to end through HTTP on the real worker and the
dev server: the meeting for the account manager the instance names (a user holding no role for
it), the parallel assessment, KPIs, a plan the client rejects (another planning round, counted
in stage_visits), the accepted plan's set-up tasks for the team members it names, onboarded."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from core.db import AuditEntry, ProcessInstance, StageVisit
from tests.api.conftest import Api
from tests.support import eventually

pytestmark = pytest.mark.timeout(240)

START = "/processes/customer_onboarding"


async def _open(api: Api, user: str, key: str, count: int = 1) -> list[dict]:
    async def found() -> list[dict] | None:
        r = await api.get("/tasks", user, params={"business_key": key})
        assert r.status_code == 200, r.text
        items = [t for t in r.json()["items"] if t["status"] == "open"]
        return items if len(items) == count else None

    return await eventually(found, f"{count} open task(s) of {key} for {user}")


async def _decide(api: Api, user: str, task: dict, outcome: str, **body: object) -> None:
    r = await api.post(
        f"/tasks/{task['task_id']}/decision", user, json={"outcome": outcome, **body}
    )
    assert r.status_code == 200, r.text


PLAN = {
    "weekly_plan": "Two posts a week.",
    "monthly_plan": "One campaign a month.",
    "yearly_plan": "Double the leads.",
    "content_owner": "sam",
    "ads_owner": "pete",
}


async def test_an_onboarding_runs_through_a_rejected_plan_to_the_named_team_members(
    live_api: Api, sessions: async_sessionmaker
):
    api, code = live_api, f"C-{uuid.uuid4().hex[:8].upper()}"
    body = {
        "client_code": code,
        "company_name": "Bloom Florists",
        "contact_email": f"ceo-{code.lower()}@bloom.example",
        "account_manager": "bob",
        "meeting_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
    }
    bad = await api.post(START, "alice", json=body | {"meeting_at": "next tuesday"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "meeting_at"]
    r = await api.post(START, "alice", json=body)
    assert r.status_code == 201, r.text

    # the meeting is for bob, who holds no role for it: the instance named him
    [meeting] = await _open(api, "bob", code)
    assert meeting["assignee"] == "bob"
    r = await api.post(f"/tasks/{meeting['task_id']}/decision", "bob", json={"outcome": "held"})
    assert r.status_code == 422, r.text  # held needs the business and the industry
    r = await api.post(
        f"/tasks/{meeting['task_id']}/decision", "stella", json={"outcome": "cancelled"}
    )
    assert r.status_code in (403, 404), r.text  # not hers
    await _decide(api, "bob", meeting, "held", fields={"business": "Flowers", "industry": "Retail"})

    # goals and assets in parallel, both for the strategist
    both = await _open(api, "stella", code, count=2)
    for task in both:
        field = "goals" if "goals" in task["name"] else "assets"
        await _decide(api, "stella", task, "assessed", fields={field: "Assessed."})
    [kpis] = await _open(api, "bob", code)
    await _decide(api, "bob", kpis, "agreed", fields={"kpis": "Leads +20 %."})

    for round_ in (1, 2):
        [plan] = await _open(api, "stella", code)
        await _decide(api, "stella", plan, "proposed", fields=PLAN)
        [review] = await _open(api, "bob", code)
        if round_ == 1:
            r = await api.post(
                f"/tasks/{review['task_id']}/decision", "bob", json={"outcome": "rejected"}
            )
            assert r.status_code == 422, r.text  # a rejection says why
            await _decide(
                api, "bob", review, "rejected", fields={"client_feedback": "Too little video."}
            )
        else:
            await _decide(api, "bob", review, "accepted")

    # the accepted plan's owners get their set-up tasks
    [content] = await _open(api, "sam", code)
    [ads] = await _open(api, "pete", code)
    assert (content["assignee"], ads["assignee"]) == ("sam", "pete")
    await _decide(api, "sam", content, "done")
    await _decide(api, "pete", ads, "done")

    async def onboarded() -> ProcessInstance | None:
        async with sessions() as s:
            row = await s.scalar(
                select(ProcessInstance).where(
                    ProcessInstance.process_type == "customer_onboarding",
                    ProcessInstance.business_key == code,
                )
            )
            return row if row is not None and row.status == "completed" else None

    row = await eventually(onboarded, "the onboarded instance")
    assert row.stage == "onboarded"
    async with sessions() as s:
        visits = (
            await s.scalars(
                select(StageVisit.stage)
                .where(StageVisit.workflow_id == row.workflow_id)
                .order_by(StageVisit.seq)
            )
        ).all()
        notes = (
            await s.scalars(
                select(AuditEntry.action).where(AuditEntry.workflow_id == row.workflow_id)
            )
        ).all()
    assert visits == [
        "meeting",
        "assessment",
        "kpis",
        "planning",
        "client_review",
        "planning",  # the second round: another visit
        "client_review",
        "kickoff",
        "onboarded",
    ]
    assert "note" in notes  # the record_note call of the kickoff
    status = (await api.get(f"{START}/{code}", "alice")).json()
    assert status["visits"]["planning"] == 2 and status["outcome"] == "onboarded"
