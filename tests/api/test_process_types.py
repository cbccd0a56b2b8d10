"""The registry drives the gateway: GET /process-types describes every registered type, and a
type registered here (a tiny review process defined in this module) is listed, run by the
worker and has its tasks dispatched to its own workflow, without touching any other file."""

from __future__ import annotations

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
    from workflows import registry
    from workflows.human_task import DecideInput
    from workflows.kernel import DecideResult, TaskView
    from workflows.policy import PolicyModel
    from workflows.registry import ProcessEvent, ProcessType
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


class TinyPolicy(PolicyModel):
    review_days: int = 3


class TinyComment(BaseModel):
    text: str


@workflow.defn(name=TINY)
class TinyReviewWorkflow:
    """One review task; the process ends with the reviewer's outcome."""

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
    description="A single review task, registered by a test.",
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
    policy_model=TinyPolicy,
    events={
        "comment": ProcessEvent(
            name="comment", model=TinyComment, update="comment", description="a remark"
        )
    },
)


@pytest.fixture
def tiny() -> Iterator[ProcessType]:
    """The tiny review process, registered for the test only."""
    registry.register(TINY_TYPE)
    try:
        yield TINY_TYPE
    finally:
        registry.unregister(TINY)


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
    assert TINY not in _by_name((await api.get("/process-types", "alice")).json())
    registry.register(TINY_TYPE)
    try:
        listed = _by_name((await api.get("/process-types", "alice")).json())
        one = (await api.get(f"/process-types/{TINY}", "alice")).json()
    finally:
        registry.unregister(TINY)
    assert listed[TINY] == one
    assert one["title"] == "Tiny review"
    assert one["stages"] == ["review", REVIEWED] and one["terminal_stages"] == [REVIEWED]
    assert one["start_schema"] == TinyStart.model_json_schema()
    assert one["events"] == [
        {
            "name": "comment",
            "description": "a remark",
            "roles": [],
            "body_schema": TinyComment.model_json_schema(),
        }
    ]
    assert one["cancellable"] is False and one["cancel_roles"] == []
    assert one["has_policy"] is True and one["policy_version"] == 0  # nothing published yet
    assert (await api.get(f"/process-types/{TINY}", "alice")).status_code == 404


@pytest_asyncio.fixture
async def tiny_worker(
    tiny: ProcessType,
    client: Client,
    task_queue: str,
    sessions: async_sessionmaker,
    mail_sink: MailSink,
) -> AsyncIterator[object]:
    """The real worker, built after the tiny type was registered."""
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
    tiny_worker, client: Client, task_queue: str
):
    assert {TINY, "sales_order"} <= set(tiny_worker.reconciler.process_types)
    assert REVIEWED in tiny_worker.reconciler.final_stages
    handle = await client.start_workflow(
        TinyReviewWorkflow.run,
        TinyInput(key="w1", requester="alice"),
        id=f"{TINY}-w1-{task_queue}",
        task_queue=task_queue,
    )
    decided = await handle.execute_update(
        TinyReviewWorkflow.decide,
        DecideInput(task_id="t1", outcome="approved", actor={"username": "victor"}),
    )
    assert decided.stage == REVIEWED
    assert await handle.result() == "approved"


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
async def tiny_api(tiny_worker, app) -> AsyncIterator[Api]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Api(http)


async def test_a_task_of_another_process_type_is_decided_by_that_types_workflow(
    tiny_api: Api, client: Client, task_queue: str, sessions: async_sessionmaker
):
    wid, task_id = await _tiny_task(client, task_queue, sessions, "d1")
    inbox = (await tiny_api.get("/tasks", "victor")).json()
    assert task_id in [t["task_id"] for t in inbox["items"]]
    r = await tiny_api.post(f"/tasks/{task_id}/decision", "victor", json={"outcome": "approved"})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == REVIEWED  # not a sales order stage: it decodes all the same
    assert r.json()["task"]["decided_by"] == "victor"
    assert await client.get_workflow_handle(wid).result() == "approved"


async def test_a_task_action_the_types_workflow_lacks_is_409_naming_it(
    tiny_api: Api, client: Client, task_queue: str, sessions: async_sessionmaker
):
    wid, task_id = await _tiny_task(client, task_queue, sessions, "c1")
    r = await tiny_api.post(f"/tasks/{task_id}/claim", "victor")
    assert r.status_code == 409, r.text
    assert TINY in r.json()["detail"] and "claim" in r.json()["detail"]
    history = await client.get_workflow_handle(wid).fetch_history()
    assert not [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
