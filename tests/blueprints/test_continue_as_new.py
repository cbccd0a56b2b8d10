"""A blueprint instance continues as new when Temporal suggests it and keeps its pinned
version, its tasks and its fields: the next run's input carries the same version, never the
current one. Its own dev server suggests continue-as-new early (after 300 events)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tests.blueprints.conftest import SEEDS, CallFakes, seed_type
from tests.support import start_dev_server, update_latest_run
from workflows.blueprint import check, types
from workflows.blueprint.interpreter import BlueprintResult, BlueprintStatus, BlueprintWorkflow
from workflows.human_task import Actor, DecideInput, TaskActionInput

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

SUGGEST_AFTER = 300  # events
ROUNDS = 150  # claim + release each
SUPPORT = Actor(username="stan", roles=["support"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def early_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server(
        "--dynamic-config-value", f"limit.historyCount.suggestContinueAsNew={SUGGEST_AFTER}"
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def test_a_blueprint_instance_continues_as_new_on_its_pinned_version(early_env) -> None:
    v1 = seed_type("complaint")
    fakes, queue, client = CallFakes(), f"bp-{uuid.uuid4()}", early_env.client
    body = {
        "ticket_no": f"T-{uuid.uuid4().hex[:8].upper()}",
        "company_name": "ACME Ltd",
        "customer_email": "buyer@acme.example",
        "channel": "web",
        "summary": "Broken.",
    }
    details = v1.start_model.model_validate(body)
    async with Worker(
        client, task_queue=queue, workflows=[BlueprintWorkflow], activities=fakes.activities()
    ):
        start = await client.start_workflow(
            v1.workflow_type(),
            v1.build_input(details, "rita"),
            id=v1.workflow_id(details.ticket_no),
            task_queue=queue,
        )
        handle = client.get_workflow_handle(start.id)  # the latest run
        first = await update_latest_run(handle, "settle", None, BlueprintStatus)
        [task] = first.pending_tasks
        # a newer version is published meanwhile: the running instance never takes it
        v2 = check.load_yaml((SEEDS / "complaint.yaml").read_text())
        v2["title"] = "Customer complaint (v2)"
        assert types.from_document(v2).version != v1.version
        for _ in range(ROUNDS):
            for action in ("claim", "release"):
                arg = TaskActionInput(task_id=task.task_id, actor=SUPPORT)
                await update_latest_run(handle, action, arg)
        status = await update_latest_run(handle, "settle", None, BlueprintStatus)
        assert status.version == v1.version and status.title == "Customer complaint"
        [carried] = status.pending_tasks
        assert carried.task_id == task.task_id and carried.due_at == task.due_at
        assert carried.history_total == 2 * ROUNDS + 1
        assert status.fields == first.fields
        for outcome, fields in (
            ("acknowledged", {}),
            ("not_a_complaint", {}),
        ):
            settled = await update_latest_run(handle, "settle", None, BlueprintStatus)
            open_task = settled.pending_tasks[0]
            await update_latest_run(
                handle,
                "decide",
                DecideInput(
                    task_id=open_task.task_id,
                    outcome=outcome,
                    comment="a question, not a complaint",
                    fields=fields,
                    actor=SUPPORT,
                ),
            )
        result = BlueprintResult.model_validate(await handle.result())
    assert (result.stage, result.outcome) == ("declined", "declined")
    runs = [wf async for wf in client.list_workflows(f"WorkflowId = '{start.id}'")]
    assert len(runs) >= 3, len(runs)
    assert max(wf.history_length for wf in runs) < SUGGEST_AFTER + 100
    assert {wf.workflow_type for wf in runs} == {"complaint"}
    keys = [req.idempotency_key for _, req in fakes.calls]
    assert keys == [
        f"{start.id}:acknowledge:1:notify_customer",
        f"{start.id}:decline:1:notify_customer",
    ]
