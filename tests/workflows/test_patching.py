"""A change that running instances depend on must be guarded by workflow.patched().

The claim/release/delegate/reassign handlers started to wait for the instance to settle
("task-action-settles"). An instance recorded before that change must still replay: with the
guard it does, and the same change without the guard breaks it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner
from temporalio.workflow import NondeterminismError

from workflows.runtime import PROJECTION_PER_WAIT
from workflows.sales_order import SalesOrderWorkflow

BEFORE = next((Path(__file__).parents[1] / "histories").glob("*before_task_action_settles.json"))


def _history() -> WorkflowHistory:
    document = json.loads(BEFORE.read_text())
    return WorkflowHistory.from_json(document["workflow_id"], document["history"])


def _replayer() -> Replayer:
    # unsandboxed, so that the test can take the guard away
    return Replayer(
        workflows=[SalesOrderWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )


async def test_guarded_change_replays_the_old_history():
    await _replayer().replay_workflow(_history())


async def test_the_same_change_unguarded_fails_replay(monkeypatch):
    real_patched = workflow.patched

    def unguarded(patch_id: str) -> bool:
        if patch_id == "task-action-settles":
            return True  # as if the new code ran unconditionally
        return real_patched(patch_id)

    monkeypatch.setattr(workflow, "patched", unguarded)
    with pytest.raises(NondeterminismError):
        await _replayer().replay_workflow(_history())


# one projection per wait ("projection-per-wait"): an instance recorded before it (a projection
# per stage change) replays with the guard, and the same change without it breaks the replay
BEFORE_PER_WAIT = (
    Path(__file__).parents[1]
    / "histories"
    / "sales_order__test_order_of_1200000_needs_vice_president_then_sales_director__0.json"
)


def _history_before_per_wait() -> WorkflowHistory:
    document = json.loads(BEFORE_PER_WAIT.read_text())
    return WorkflowHistory.from_json(document["workflow_id"], document["history"])


async def test_projection_per_wait_replays_an_instance_from_before_it():
    await _replayer().replay_workflow(_history_before_per_wait())


async def test_projection_per_wait_unguarded_fails_replay(monkeypatch):
    real_patched = workflow.patched

    def unguarded(patch_id: str) -> bool:
        if patch_id == PROJECTION_PER_WAIT:
            return True  # as if the new code ran unconditionally
        return real_patched(patch_id)

    monkeypatch.setattr(workflow, "patched", unguarded)
    with pytest.raises(NondeterminismError):
        await _replayer().replay_workflow(_history_before_per_wait())
