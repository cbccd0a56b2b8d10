"""The interpreter runs the seed blueprints on the time-skipping server (fake activities)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from temporalio.client import WorkflowUpdateFailedError

from tests.blueprints.conftest import seed_type
from workflows.blueprint.interpreter import BlueprintStatus
from workflows.human_task import Actor

pytestmark = pytest.mark.asyncio(loop_scope="session")

SUPPORT = Actor(username="sam", roles=["support"])
LEAD = Actor(username="lena", roles=["support-lead"])
MANAGER = Actor(username="max", roles=["service-manager"])
COMPLAINT = seed_type("complaint")


def ticket(**kw) -> dict:
    return {
        "ticket_no": f"T-{uuid.uuid4().hex[:8].upper()}",
        "company_name": "ACME Ltd",
        "customer_email": "buyer@acme.example",
        "channel": "web",
        "summary": "The mug arrived broken.",
        **kw,
    }


async def test_complaint_runs_from_receipt_to_closed(bp) -> None:
    handle = await bp.start(COMPLAINT, ticket())
    status = await bp.status(handle)
    assert status.stage == "acknowledge"
    assert [t.name for t in status.pending_tasks] == ["Acknowledge the complaint"]
    await bp.decide(handle, SUPPORT, "acknowledged")
    await bp.decide(handle, SUPPORT, "recorded", category="service", severity="low")
    await bp.decide(handle, SUPPORT, "resolved", resolution="Sent a new mug.")
    status = await bp.status(handle)
    assert status.stage == "feedback"
    assert status.open_steps == ["feedback_received"]
    await handle.execute_update("feedback_received", {"score": "5"})
    result = await bp.result(handle)
    assert result.stage == "closed" and result.outcome == "closed"
    assert result.fields["score"] == 5 and result.fields["severity"] == "low"
    assert bp.fakes.called() == [
        "notify_customer:complaint_acknowledged",
        "notify_customer:complaint_status",
    ]
    keys = [req.idempotency_key for _, req in bp.fakes.calls]
    assert keys == [
        f"{handle.id}:acknowledge:1:notify_customer",
        f"{handle.id}:notify:1:notify_customer",
    ], keys
    stages = [s.stage for s in (await handle.query("status", result_type=BlueprintStatus)).stages]
    assert stages == ["acknowledge", "record", "resolve", "notify", "feedback", "closed"]


async def test_a_decision_with_a_field_the_form_refuses_is_refused(bp) -> None:
    handle = await bp.start(COMPLAINT, ticket())
    await bp.decide(handle, SUPPORT, "acknowledged")
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await bp.decide(handle, SUPPORT, "recorded", category="weather", severity="low")
    assert "category" in str(err.value.cause)
    status = await bp.status(handle)
    assert status.stage == "record" and len(status.pending_tasks) == 1


async def test_feedback_times_out_after_fourteen_days(bp) -> None:
    handle = await bp.start(COMPLAINT, ticket())
    await bp.decide(handle, SUPPORT, "acknowledged")
    await bp.decide(handle, SUPPORT, "recorded", category="service", severity="low")
    await bp.decide(handle, SUPPORT, "resolved", resolution="Fixed.")
    await bp.env.sleep(timedelta(days=15))
    result = await bp.result(handle)
    assert result.outcome == "closed" and "score" not in result.fields
