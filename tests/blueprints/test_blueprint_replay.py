"""Every recorded history of a seed blueprint's scenario replays against today's interpreter.

A change of the interpreter that running instances depend on must keep these passing (guard
it with `workflow.patched()`). The histories are the scenarios of `blueprints/*.scenarios.yml`
that let no time pass, recorded on the dev server (tests/blueprints/test_scenarios.py):

    PROCFLOW_RECORD_HISTORIES=tests/histories .venv/bin/python -m pytest -q \
        tests/blueprints/test_scenarios.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.blueprints.conftest import SEEDS
from workflows.blueprint import check
from workflows.blueprint.interpreter import BlueprintWorkflow

HISTORY_DIR = Path(__file__).parents[1] / "histories"
HISTORIES = sorted(HISTORY_DIR.glob("blueprint__*.json"))


def _history(path: Path) -> WorkflowHistory:
    document = json.loads(path.read_text())
    # the workflow id matters: task ids and idempotency keys are derived from it
    return WorkflowHistory.from_json(document["workflow_id"], document["history"])


def test_every_seed_blueprint_has_a_recorded_history() -> None:
    processes = [
        check.load_yaml(seed.read_text())["process"] for seed in sorted(SEEDS.glob("*.yaml"))
    ]
    recorded = {path.name.split("__")[1] for path in HISTORIES}
    missing = [process for process in processes if process not in recorded]
    assert not missing, f"no recorded history of {missing} in {HISTORY_DIR}"


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_recorded_blueprint_history_replays(path: Path) -> None:
    replayer = Replayer(workflows=[BlueprintWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(_history(path), raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure!r}"
