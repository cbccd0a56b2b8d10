"""Every recorded history under tests/histories/ replays against today's workflow code.

A change that running instances depend on must keep these passing (guard it with
`workflow.patched()`). Record new histories with:

    PROCFLOW_RECORD_HISTORIES=tests/histories make test PYTEST_ARGS="tests/workflows -k <name>"

Recording runs the workflow tests on the dev server (real time): pick tests that wait for no
timer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.runtime import LOCAL_PROJECTION, PROJECTION_PER_WAIT
from workflows.sales_order import HARDENING, SalesOrderWorkflow

HISTORY_DIR = Path(__file__).parents[1] / "histories"
HISTORIES = sorted(HISTORY_DIR.glob("sales_order__*.json"))  # blueprints: tests/blueprints
MAIN_PATHS = (
    "1200000",
    "rejection",
    "prepaid",
    "special_change",
    "out_of_stock",
    "cancel",
    "k_of_n",
    "claim_release",
    "refused_refund",
    "overpayment",
    "one_provider_event",
    "continue_as_new__first_run",
    "continue_as_new__last_run",
)


def test_histories_are_recorded_for_the_main_paths():
    names = " ".join(p.name for p in HISTORIES)
    for path in MAIN_PATHS:
        assert path in names, f"no recorded history for {path}"


def _patches(path: Path) -> set[str]:
    document = json.loads(path.read_text())
    history = WorkflowHistory.from_json(document["workflow_id"], document["history"])
    return {
        json.loads(e.marker_recorded_event_attributes.details["patch-data"].payloads[0].data)["id"]
        for e in history.events
        if e.marker_recorded_event_attributes.marker_name == "core_patch"
    }


def test_histories_replay_both_sides_of_the_local_projection_patch():
    """Instances from before the change (one `project` and one `notify` activity per step) and
    after it (local projection with the mails in the outbox) must both replay."""
    patched = [p for p in HISTORIES if LOCAL_PROJECTION in _patches(p)]
    before = [p for p in HISTORIES if p.stem.endswith("before_local_projection")]
    assert len(patched) >= 8 and len(before) >= 8
    assert not any(LOCAL_PROJECTION in _patches(p) for p in before)


def test_histories_replay_both_sides_of_the_hardening_patch():
    """Instances from before the money/authority hardening and continue-as-new, and after."""
    patched = [p for p in HISTORIES if HARDENING in _patches(p)]
    before = [p for p in HISTORIES if p.stem.endswith("before_hardening")]
    assert len(patched) >= 10 and len(before) >= 10
    assert not any(HARDENING in _patches(p) for p in before)
    continued = [
        p for p in patched if "continue_as_new" in p.stem and PROJECTION_PER_WAIT not in _patches(p)
    ]
    assert len(continued) == 2  # a run that continues as new, and one that began from a carry


def test_histories_replay_both_sides_of_the_projection_per_wait_patch():
    """Instances from before one projection per wait (a projection and an upsert per stage
    change, a decision answered at the next wait) and after it (one per wait, a decision
    answered at the step it caused): every main path recorded on both sides."""
    patched = [p for p in HISTORIES if PROJECTION_PER_WAIT in _patches(p)]
    before = [p for p in HISTORIES if PROJECTION_PER_WAIT not in _patches(p)]
    assert len(patched) >= 20 and len(before) >= 40
    assert all(p.stem.endswith("__projection_per_wait") for p in patched)
    assert not any(p.stem.endswith("__projection_per_wait") for p in before)
    for path in MAIN_PATHS:
        for side in (patched, before):
            assert any(path in p.name for p in side), f"{path}: not recorded on both sides"
    # the same path on both sides: one projection per wait instead of one per stage change
    name = "sales_order__test_order_of_1200000_needs_vice_president_then_sales_director__0"
    old = _projections(HISTORY_DIR / f"{name}.json")
    new = _projections(HISTORY_DIR / f"{name}__projection_per_wait.json")
    assert (old, new) == (10, 4)


def _projections(path: Path) -> int:
    document = json.loads(path.read_text())
    history = WorkflowHistory.from_json(document["workflow_id"], document["history"])
    return sum(
        json.loads(e.marker_recorded_event_attributes.details["data"].payloads[0].data).get(
            "activity_type"
        )
        == "project"
        for e in history.events
        if e.marker_recorded_event_attributes.marker_name == "core_local_activity"
    )


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_recorded_history_replays(path: Path):
    document = json.loads(path.read_text())
    # the workflow id matters: task ids and idempotency keys are derived from it
    history = WorkflowHistory.from_json(document["workflow_id"], document["history"])
    replayer = Replayer(workflows=[SalesOrderWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)
