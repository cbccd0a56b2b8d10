"""The registry drives the gateway: GET /process-types describes every registered type, and a
type registered at run time (the document review of tests/processes/review.py) is listed, run by
the worker and has its tasks dispatched to its own workflow, without touching any other file. A
tiny workflow defined here, with no kernel under it, shows what a type lacking a task action
gets."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import httpx
    import pytest
    import pytest_asyncio
    from pydantic import BaseModel, ConfigDict
    from sqlalchemy.ext.asyncio import async_sessionmaker
    from temporalio.client import Client

    from activities.mail import SmtpSender
    from activities.payments import SandboxPaymentProvider
    from core.db import TaskCandidate, TaskRow
    from scripts.mailsink import MailSink
    from tests.api.conftest import Api
    from tests.processes.review import (
        REVIEW,
        STAGES,
        CommentAdded,
        ReviewInput,
        ReviewStart,
        ReviewWorkflow,
        review_workflow_id,
    )
    from workflows import registry
    from workflows.human_task import Actor, DecideInput
    from workflows.kernel import DecideResult, TaskView
    from workflows.registry import ProcessType
    from workflows.sales_order import TERMINAL_STAGES, OrderDetails, PaymentEvent

TINY = "tiny_review"
REVIEWED = "reviewed"


class TinyStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str


class TinyInput(TinyStart):
    requester: str


class TinyStatus(BaseModel):
    stage: str


@workflow.defn(name=TINY)
class TinyReviewWorkflow:
    """One review task and only `decide` (no kernel): the process ends with its outcome."""

    @workflow.init
    def __init__(self, inp: TinyInput) -> None:
        self._outcome: str | None = None

    @workflow.run
    async def run(self, inp: TinyInput) -> str:
        await workflow.wait_condition(lambda: self._outcome is not None)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._outcome or ""

    @workflow.update
    async def decide(self, inp: DecideInput) -> DecideResult:
        self._outcome = inp.outcome
        task = TaskView(
            task_id=inp.task_id,
            name="Review",
            kind="approval",
            candidate_roles=["vice-president"],
            assignee=None,
            outcomes=["approved", "rejected"],
            required_fields={},
            status="closed",
            outcome=inp.outcome,
            decided_by=inp.actor.username,
            comment=inp.comment,
            created_at=workflow.now(),
            due_at=None,
            deadline_at=None,
            escalated=False,
            history=[],
        )
        return DecideResult(task=task, stage=REVIEWED)


TINY_TYPE = ProcessType(
    name=TINY,
    title="Tiny review",
    description="A single review task without the kernel, registered by a test.",
    workflow=TinyReviewWorkflow,
    input_model=TinyInput,
    start_model=TinyStart,
    build_input=lambda body, requester: TinyInput(key=body.key, requester=requester),
    business_key=lambda body: body.key,
    workflow_id=lambda key: f"{TINY}-{key}",
    status_model=TinyStatus,
    stages=("review", REVIEWED),
    terminal_stages=frozenset({REVIEWED}),
    roles=("requester", "vice-president"),
)


@pytest.fixture
def registered() -> Iterator[None]:
    """The review and the tiny process, registered for the test only."""
    registry.register(REVIEW)
    registry.register(TINY_TYPE)
    try:
        yield
    finally:
        registry.unregister(TINY)
        registry.unregister(REVIEW.name)


def _by_name(body: list[dict]) -> dict[str, dict]:
    return {t["name"]: t for t in body}


async def test_the_sales_order_is_listed_with_its_start_schema_stages_and_events(api: Api):
    r = await api.get("/process-types", "alice")
    assert r.status_code == 200, r.text
    order = _by_name(r.json())["sales_order"]
    assert order["title"] == "Sales order"
    assert order["start_schema"] == OrderDetails.model_json_schema()
    assert {"order_no", "customer", "lines"} <= set(order["start_schema"]["properties"])
    assert "requester" not in order["start_schema"]["properties"]
    assert {"received", "approval", "closed"} <= set(order["stages"])
    assert set(order["terminal_stages"]) == {str(s) for s in TERMINAL_STAGES}
    assert "vice-president" in order["roles"]
    assert order["cancellable"] is True and order["cancel_roles"] == ["manager"]
    assert [e["name"] for e in order["events"]] == ["payment"]
    assert order["events"][0]["body_schema"] == PaymentEvent.model_json_schema()
    assert order["events"][0]["roles"] == ["finance"]
    assert order["has_policy"] is True and order["policy_version"] == 1  # seeded
    one = await api.get("/process-types/sales_order", "victor")
    assert one.status_code == 200, one.text
    assert one.json() == order


async def test_publishing_a_policy_moves_the_types_policy_version(api: Api):
    current = (await api.get("/policies/sales_order", "alice")).json()
    doc = current["document"] | {"loyalty_discount_pct": "6"}
    r = await api.post("/policies/sales_order", "ada", json={"document": doc})
    assert r.status_code == 201, r.text
    one = (await api.get("/process-types/sales_order", "alice")).json()
    assert one["policy_version"] == 2
    listed = _by_name((await api.get("/process-types", "alice")).json())
    assert listed["sales_order"]["policy_version"] == 2


async def test_an_unknown_process_type_is_404_naming_it(api: Api):
    r = await api.get("/process-types/no_such_process", "alice")
    assert r.status_code == 404, r.text
    assert "no_such_process" in r.json()["detail"]


@pytest.mark.parametrize("url", ["/process-types", "/process-types/sales_order"])
async def test_reading_process_types_needs_credentials(api: Api, url: str):
    r = await api.http.get(url)
    assert r.status_code == 401, r.text
    r = await api.http.get(url, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401, r.text


async def test_openapi_documents_the_process_types_responses(api: Api):
    spec = (await api.http.get("/openapi.json")).json()
    listed = spec["paths"]["/process-types"]["get"]["responses"]
    one = spec["paths"]["/process-types/{process_type}"]["get"]["responses"]
    ref = "#/components/schemas/ProcessTypeOut"
    assert listed["200"]["content"]["application/json"]["schema"]["items"]["$ref"] == ref
    assert one["200"]["content"]["application/json"]["schema"]["$ref"] == ref
    assert {"401", "404"} <= set(one)
    props = spec["components"]["schemas"]["ProcessTypeOut"]["properties"]
    assert {"start_schema", "stages", "roles", "events", "policy_version"} <= set(props)


async def test_a_type_registered_at_run_time_is_listed_and_gone_once_unregistered(api: Api):
    names = _by_name((await api.get("/process-types", "alice")).json())
    assert REVIEW.name not in names and TINY not in names
    registry.register(REVIEW)
    registry.register(TINY_TYPE)
    try:
        listed = _by_name((await api.get("/process-types", "alice")).json())
        one = (await api.get(f"/process-types/{REVIEW.name}", "alice")).json()
    finally:
        registry.unregister(TINY)
        registry.unregister(REVIEW.name)
    assert list(listed)[-2:] == [REVIEW.name, TINY]  # in the order of registration
    assert listed[REVIEW.name] == one
    assert one["title"] == "Document review"
    assert one["stages"] == list(STAGES)
    assert one["terminal_stages"] == ["approved", "rejected", "cancelled"]
    assert one["start_schema"] == ReviewStart.model_json_schema()
    assert [(e["name"], e["roles"]) for e in one["events"]] == [("comment_added", [])]
    assert one["events"][0]["body_schema"] == CommentAdded.model_json_schema()
    assert one["cancellable"] is True and one["cancel_roles"] == []
    assert one["has_policy"] is True and one["policy_version"] == 0  # nothing published yet
    tiny = listed[TINY]
    assert (tiny["events"], tiny["cancellable"], tiny["cancel_roles"]) == ([], False, [])
    assert (tiny["has_policy"], tiny["policy_version"]) == (False, None)
    for name in (REVIEW.name, TINY):
        assert (await api.get(f"/process-types/{name}", "alice")).status_code == 404


@pytest_asyncio.fixture
async def types_worker(
    registered: None,
    client: Client,
    task_queue: str,
    sessions: async_sessionmaker,
    mail_sink: MailSink,
) -> AsyncIterator[object]:
    """The real worker, built after the review and the tiny type were registered."""
    from worker import build_worker

    w = build_worker(
        client,
        task_queue=task_queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )
    async with w:
        yield w


async def test_the_worker_runs_and_reconciles_every_registered_type(
    types_worker, client: Client, task_queue: str
):
    assert {REVIEW.name, TINY, "sales_order"} <= set(types_worker.reconciler.process_types)
    assert {"approved", "cancelled", REVIEWED} <= types_worker.reconciler.final_stages
    doc_no = f"W-{uuid.uuid4().hex[:10].upper()}"
    handle, task = await _review_task(client, task_queue, doc_no)
    decided = await handle.execute_update(
        ReviewWorkflow.decide,
        DecideInput(
            task_id=task.task_id,
            outcome="approved",
            actor=Actor(username="mike", roles=["manager"]),
        ),
    )
    assert decided.stage == "approved"
    assert await handle.result() == "approved"


async def _review_task(client: Client, task_queue: str, doc_no: str):
    """A document review started straight on the worker, and its first task once settled."""
    handle = await client.start_workflow(
        ReviewWorkflow.run,
        ReviewInput(doc_no=doc_no, title="Handbook", requester="alice"),
        id=review_workflow_id(doc_no),
        task_queue=task_queue,
    )
    [task] = (await handle.execute_update(ReviewWorkflow.settle)).pending_tasks
    return handle, task


async def _tiny_task(
    client: Client, task_queue: str, sessions: async_sessionmaker, key: str
) -> tuple[str, str]:
    """A running tiny review and its open task in the read model (written as a kernel process
    would project it); returns the workflow id and the task id."""
    wid = f"{TINY}-{key}-{task_queue}"
    await client.start_workflow(
        TinyReviewWorkflow.run, TinyInput(key=key, requester="alice"), id=wid, task_queue=task_queue
    )
    task_id = f"{wid}.t1"
    async with sessions.begin() as session:
        session.add(
            TaskRow(
                task_id=task_id,
                workflow_id=wid,
                process_type=TINY,
                business_key=key,
                name="Review",
                kind="approval",
                candidate_roles=["vice-president"],
                requester="alice",
                outcomes=["approved", "rejected"],
                status="open",
                created_at=datetime.now(UTC),
            )
        )
        await session.flush()  # the candidate row refers to the task row
        session.add(TaskCandidate(task_id=task_id, role="vice-president"))
    return wid, task_id


@pytest_asyncio.fixture
async def types_api(types_worker, app) -> AsyncIterator[Api]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Api(http)


async def test_a_task_of_another_process_type_is_decided_by_that_types_workflow(
    types_api: Api, client: Client, task_queue: str
):
    doc_no = f"D-{uuid.uuid4().hex[:10].upper()}"
    handle, task = await _review_task(client, task_queue, doc_no)
    inbox = (await types_api.get("/tasks", "mike")).json()  # projected by the kernel
    [row] = [t for t in inbox["items"] if t["task_id"] == task.task_id]
    assert (row["process_type"], row["business_key"]) == (REVIEW.name, doc_no)
    r = await types_api.post(
        f"/tasks/{task.task_id}/decision", "mike", json={"outcome": "approved"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "approved"  # not a sales order stage: it decodes all the same
    assert r.json()["task"]["decided_by"] == "mike"
    assert await handle.result() == "approved"


async def test_a_task_action_the_types_workflow_lacks_is_409_naming_it(
    types_api: Api, client: Client, task_queue: str, sessions: async_sessionmaker
):
    wid, task_id = await _tiny_task(client, task_queue, sessions, "c1")
    r = await types_api.post(f"/tasks/{task_id}/claim", "victor")
    assert r.status_code == 409, r.text
    assert TINY in r.json()["detail"] and "claim" in r.json()["detail"]
    history = await client.get_workflow_handle(wid).fetch_history()
    assert not [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
