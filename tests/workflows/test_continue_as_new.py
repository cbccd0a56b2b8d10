"""Bounded history: an instance continues as new when Temporal suggests it, carrying its tasks,
timers, money and pinned policy, so that thousands of actions on one task never reach
Temporal's history limit and nothing is lost.

Runs on its own dev server whose continue-as-new suggestion comes early (300 events instead
of Temporal's default of 4,096 or 4 MB), so that 5,000 actions make many runs."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.models import PolicyDocument
from tests.support import record_figure, start_dev_server, update_latest_run
from workflows.human_task import DecideInput, TaskActionInput
from workflows.policy import SalesOrderPolicy
from workflows.sales_order import PaymentEvent, SalesOrderWorkflow, Stage, sales_order_workflow_id

from .conftest import VP, Fakes, order

SUGGEST_AFTER = 300  # events
ROUNDS = int(os.environ.get("PROCFLOW_CAN_ROUNDS", "2500"))  # claim + release each


@pytest_asyncio.fixture(scope="module")
async def early_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server(
        "--dynamic-config-value", f"limit.historyCount.suggestContinueAsNew={SUGGEST_AFTER}"
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def _update(handle, update, arg):
    return await update_latest_run(handle, update, arg)


@pytest.mark.timeout(900)
async def test_five_thousand_actions_on_one_task_keep_history_bounded(early_env):
    fakes = Fakes()
    fakes.policy = PolicyDocument(
        process_type="sales_order",
        version=4,
        document=SalesOrderPolicy(max_actions_per_task=10_000).model_dump(mode="json"),
    )
    queue = f"tq-{uuid.uuid4()}"
    client = early_env.client
    inp = order(600_000)
    async with Worker(
        client, task_queue=queue, workflows=[SalesOrderWorkflow], activities=fakes.activities()
    ):
        start = await client.start_workflow(
            SalesOrderWorkflow.run, inp, id=sales_order_workflow_id(inp.order_no), task_queue=queue
        )
        handle = client.get_workflow_handle_for(SalesOrderWorkflow.run, start.id)  # latest run
        task = (await handle.execute_update(SalesOrderWorkflow.settle)).pending_tasks[0]
        await _update(
            handle, SalesOrderWorkflow.pay, PaymentEvent(event_id="E-1", amount=Decimal(1000))
        )
        for _ in range(ROUNDS):
            for action in (SalesOrderWorkflow.claim, SalesOrderWorkflow.release):
                view = await _update(
                    handle, action, TaskActionInput(task_id=task.task_id, actor=VP)
                )
        assert view.history_total == 2 * ROUNDS + 1 and len(view.history) <= 10
        status = await handle.query(SalesOrderWorkflow.status)
        # nothing lost across the runs: the task, its timers, the money, the pinned policy
        [carried] = status.pending_tasks
        assert carried.task_id == task.task_id and carried.due_at == task.due_at
        assert status.paid == Decimal(1000) and status.policy_version == 4
        assert status.stage == Stage.APPROVAL
        await _update(
            handle,
            SalesOrderWorkflow.decide,
            DecideInput(task_id=task.task_id, outcome="approved", actor=VP),
        )
        result = await handle.result()
    assert result.stage == Stage.CLOSED and result.paid == Decimal(600_000)
    assert list(fakes.charges.values()) == [Decimal("599000.00")]  # only what was still due
    runs = [wf async for wf in client.list_workflows(f"WorkflowId = '{start.id}'")]
    if os.environ.get("PROCFLOW_RECORD_HISTORIES"):  # the first run and the last, for replay
        out = Path(os.environ["PROCFLOW_RECORD_HISTORIES"])
        for name, wf in (("first_run", runs[-1]), ("last_run", runs[0])):
            history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
            document = {"workflow_id": wf.id, "history": json.loads(history.to_json())}
            (out / f"sales_order__continue_as_new__{name}.json").write_text(json.dumps(document))
    lengths = [wf.history_length for wf in runs]
    record_figure("continue-as-new: runs for 5,000 task actions", len(runs))
    record_figure("continue-as-new: longest run (events)", max(lengths))
    assert len(runs) >= 5
    assert max(lengths) < SUGGEST_AFTER + 100, lengths
    # every action is in the audit trail exactly once, and the task was opened once
    actions = fakes.audit_actions()
    assert actions.count("claim") == ROUNDS and actions.count("release") == ROUNDS
    assert actions.count("task_opened") == 1
