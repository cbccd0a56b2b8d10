"""Blueprint instances on the real time-skipping server: the interpreter with fake activities
(the read model's `project`, and the catalog's calls, which keep what they were asked)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.blueprint_calls import CallRequest
from activities.models import Notification, NotificationResult, ProjectionBatch
from tests.workflows.conftest import start_time_skipping
from workflows.blueprint import check, types
from workflows.blueprint.interpreter import BlueprintResult, BlueprintStatus, BlueprintWorkflow
from workflows.human_task import Actor, DecideInput
from workflows.kernel import DecideResult
from workflows.registry import ProcessType

SEEDS = Path(__file__).resolve().parents[2] / "blueprints"


def seed_type(name: str) -> ProcessType:
    return types.from_document(check.load_yaml((SEEDS / f"{name}.yaml").read_text()))


@pytest_asyncio.fixture(scope="session")
async def bp_env():
    env = await start_time_skipping()
    try:
        yield env
    finally:
        await env.shutdown()


@dataclass
class CallFakes:
    batches: list[ProjectionBatch] = field(default_factory=list)
    calls: list[tuple[str, CallRequest]] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)  # activity names that fail for good

    def activities(self) -> list:
        f = self

        @activity.defn(name="project")
        async def project(batch: ProjectionBatch) -> None:
            f.batches.append(batch)

        @activity.defn(name="notify")
        async def notify(n: Notification) -> NotificationResult:
            return NotificationResult(recipients=n.to_emails, sent=True)

        def call(name: str, result: dict[str, Any]):
            @activity.defn(name=f"blueprint.{name}")
            async def run(req: CallRequest) -> dict[str, Any]:
                f.calls.append((name, req))
                if name in f.failing:
                    raise ApplicationError(f"{name} is down", type="Down", non_retryable=True)
                return result

            return run

        return [
            project,
            notify,
            call("notify_customer", {"recipients": 1}),
            call("notify_role", {"recipients": 2}),
            call("record_note", {"note_id": "n-1"}),
        ]

    @property
    def mails(self) -> list[Notification]:
        return [m for b in self.batches for m in b.mails]

    def called(self) -> list[str]:
        return [f"{name}:{req.params.get('template', '')}" for name, req in self.calls]


@dataclass
class BlueprintHarness:
    client: Client
    env: WorkflowEnvironment
    task_queue: str
    fakes: CallFakes
    started: list[WorkflowHandle] = field(default_factory=list)

    async def start(self, ptype: ProcessType, body: dict[str, Any], requester: str = "rita"):
        details = ptype.start_model.model_validate(body)
        handle = await self.client.start_workflow(
            ptype.workflow_type(),
            ptype.build_input(details, requester),
            id=ptype.workflow_id(ptype.business_key(details)),
            task_queue=self.task_queue,
        )
        self.started.append(handle)
        return handle

    async def result(self, handle: WorkflowHandle) -> BlueprintResult:
        return BlueprintResult.model_validate(await handle.result())

    async def status(self, handle: WorkflowHandle) -> BlueprintStatus:
        return await handle.execute_update("settle", result_type=BlueprintStatus)

    async def decide(
        self,
        handle: WorkflowHandle,
        actor: Actor,
        outcome: str,
        *,
        task: str | None = None,
        comment: str = "",
        **fields: str,
    ) -> DecideResult:
        """Decide the open task named `task` (or the only one)."""
        status = await self.status(handle)
        tasks = [t for t in status.pending_tasks if task is None or t.name == task]
        assert len(tasks) == 1, [t.name for t in status.pending_tasks]
        return await handle.execute_update(
            "decide",
            DecideInput(
                task_id=tasks[0].task_id,
                outcome=outcome,
                comment=comment,
                fields=fields,
                actor=actor,
            ),
            result_type=DecideResult,
        )

    async def terminate_leftovers(self) -> None:
        for handle in self.started:
            desc = await handle.describe()
            if desc.status == WorkflowExecutionStatus.RUNNING:
                await handle.terminate("test ended")


@pytest_asyncio.fixture
async def bp(bp_env: WorkflowEnvironment):
    fakes = CallFakes()
    task_queue = f"bp-{uuid.uuid4()}"
    async with Worker(
        bp_env.client,
        task_queue=task_queue,
        workflows=[BlueprintWorkflow],
        activities=fakes.activities(),
    ):
        harness = BlueprintHarness(bp_env.client, bp_env, task_queue, fakes)
        try:
            yield harness
        finally:
            await harness.terminate_leftovers()
