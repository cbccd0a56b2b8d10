"""Moving a waiting blueprint instance to a newer version: admin only, audited, and refused
inside a parallel stage, for an unmapped stage, or when the open task does not exist in the
target version (time-skipping server, fake activities)."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError

from tests.blueprints.conftest import SEEDS, seed_type
from workflows.blueprint import check
from workflows.blueprint.interpreter import BlueprintStatus, MigrateInput
from workflows.errors import CONFLICT, NOT_PERMITTED
from workflows.human_task import Actor

pytestmark = pytest.mark.asyncio(loop_scope="session")

SUPPORT = Actor(username="stan", roles=["support"])
ADMIN = Actor(username="ada", roles=["admin"])
COMPLAINT = seed_type("complaint")
ONBOARDING = seed_type("onboarding")


def _document(name: str) -> dict:
    return check.load_yaml((SEEDS / f"{name}.yaml").read_text())


def _version(document: dict) -> MigrateInput:
    version, text = check.canonical(document)
    return MigrateInput(version=version, document=text, actor=ADMIN, reason="new rules")


def ticket() -> dict:
    return {
        "ticket_no": f"T-{uuid.uuid4().hex[:8].upper()}",
        "company_name": "ACME Ltd",
        "customer_email": "buyer@acme.example",
        "channel": "web",
        "summary": "Broken.",
    }


async def _in_record(bp) -> WorkflowHandle:
    handle = await bp.start(COMPLAINT, ticket())
    await bp.decide(handle, SUPPORT, "acknowledged")
    assert (await bp.status(handle)).stage == "record"
    return handle


async def _refused(bp, handle: WorkflowHandle, inp: MigrateInput, error: str, text: str) -> None:
    before = await bp.status(handle)
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await handle.execute_update("migrate", inp, result_type=BlueprintStatus)
    assert err.value.cause.type == error, err.value.cause
    assert text in str(err.value.cause)
    after = await bp.status(handle)
    assert (after.version, after.stage, after.open_steps) == (
        before.version,
        before.stage,
        before.open_steps,
    )


async def test_a_waiting_complaint_moves_to_v2_and_follows_its_rules_from_then_on(bp) -> None:
    handle = await _in_record(bp)
    v2 = _document("complaint")
    # v2: a high-severity resolution no longer needs the manager's sign-off
    v2["stages"]["resolve"]["then"] = [
        {"when": {"step": "resolve", "outcome": "needs_rework"}, "go": "resolve"},
        {"otherwise": "notify"},
    ]
    moved = await handle.execute_update("migrate", _version(v2), result_type=BlueprintStatus)
    assert moved.version == _version(v2).version != COMPLAINT.version
    assert (moved.stage, moved.open_steps) == ("record", ["record"])
    await bp.decide(handle, SUPPORT, "recorded", category="product", severity="high")
    await bp.decide(handle, SUPPORT, "resolved", resolution="Replaced.")
    status = await bp.status(handle)
    assert status.stage == "feedback"  # v1 would have gone to manager_review
    audit = [a for b in bp.fakes.batches for a in b.audit if a.action == "migrated"]
    assert [(a.actor, a.details["to_version"]) for a in audit] == [("ada", moved.version)]
    instances = [b.instance for b in bp.fakes.batches if b.instance is not None]
    assert instances[-1].definition_version == moved.version


async def test_only_an_admin_may_move_an_instance(bp) -> None:
    handle = await _in_record(bp)
    v2 = _document("complaint")
    v2["title"] = "Customer complaint (v2)"
    inp = _version(v2).model_copy(update={"actor": SUPPORT})
    await _refused(bp, handle, inp, NOT_PERMITTED, "only an admin")


async def test_a_move_to_a_version_without_the_current_stage_is_refused(bp) -> None:
    handle = await _in_record(bp)
    v2 = _document("complaint")
    v2["stages"]["classify"] = v2["stages"].pop("record")
    v2["stages"]["acknowledge"]["then"] = "classify"
    await _refused(bp, handle, _version(v2), CONFLICT, "unmapped")


async def test_a_move_to_a_version_without_the_open_task_is_refused(bp) -> None:
    handle = await _in_record(bp)
    v2 = _document("complaint")
    stage = v2["stages"]["record"]
    stage["do"][0]["task"] = "classify"
    stage["then"][0]["when"]["step"] = "classify"
    await _refused(bp, handle, _version(v2), CONFLICT, "the open task 'record' does not exist")


async def test_a_move_to_the_version_it_runs_is_refused(bp) -> None:
    handle = await _in_record(bp)
    await _refused(bp, handle, _version(_document("complaint")), CONFLICT, "already")


async def test_a_move_inside_a_parallel_stage_is_refused(bp) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    handle = await bp.start(
        ONBOARDING,
        {
            "client_code": f"C-{uuid.uuid4().hex[:6].upper()}",
            "company_name": "Bloom",
            "contact_email": "ceo@bloom.example",
            "account_manager": "amy",
            "meeting_at": past,
        },
    )
    amy = Actor(username="amy", roles=[])
    await bp.decide(handle, amy, "held", business="Florist", industry="Retail")
    status = await bp.status(handle)
    assert status.stage == "assessment" and len(status.open_steps) == 2
    v2 = copy.deepcopy(_document("onboarding"))
    v2["title"] = "Customer onboarding (v2)"
    await _refused(bp, handle, _version(v2), CONFLICT, "parallel")
