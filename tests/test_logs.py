"""Logs (issue 14): text and JSON lines from core.logs.configure, the context each line carries
(activity, workflow, API request), no duplicate workflow lines on replay, and no password, token
or customer e-mail address in what a run through the API writes."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    import pytest
    import pytest_asyncio
    from sqlalchemy.ext.asyncio import async_sessionmaker
    from temporalio.client import Client
    from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
    from temporalio.worker import Worker

    from api.app import create_app
    from core import logs
    from core.settings import Settings
    from scripts.mailsink import MailSink
    from scripts.seed import DEMO_PASSWORD
    from tests.api.conftest import Api, _running, order_body
    from tests.support import seed_database
    from tests.workflows.conftest import start_time_skipping
    from workflows import registry

pytestmark = pytest.mark.timeout(120)

CUSTOMER_EMAIL = order_body()["customer"]["email"]
SMTP_SINK_LOGGERS = ("mail.log", "procflow.mailsink")  # aiosmtpd's and scripts/mailsink.py's


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() changes the root logger and a few library loggers: put them back."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    flags = (workflow.logger.workflow_info_on_message, activity.logger.activity_info_on_message)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        workflow.logger.workflow_info_on_message, activity.logger.activity_info_on_message = flags


class Lines(logging.Handler):
    """The lines a formatter makes of every record, as the root logger sees them."""

    def __init__(self, log_format: str = "json") -> None:
        super().__init__()
        self.setFormatter(logs.formatter(log_format))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def json(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def lines(restore_logging: None) -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


# --- formats -----------------------------------------------------------------------------------


def test_json_lines_have_the_keys_and_the_traceback(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
):
    logs.configure(Settings(log_format="json", log_level="DEBUG"))
    logs.configure(Settings(log_format="json", log_level="DEBUG"))  # idempotent
    assert sum(isinstance(h, logs._StderrHandler) for h in logging.getLogger().handlers) == 1
    log = logging.getLogger("procflow.test")
    log.debug("hello %s", "world", extra={"task_id": "wf-1.t2"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    with logs.request_context("req-1"):
        logs.set_user("alice")
        log.warning("in a request")
    logs.set_user("nobody")  # outside a request: nothing
    log.info("after")

    out = capsys.readouterr().err.splitlines()
    parsed = [json.loads(line) for line in out]
    assert len(parsed) == 4
    first, failed, in_request, after = parsed
    assert list(first) == ["ts", "level", "logger", "message", "task_id"]
    assert first["level"] == "DEBUG" and first["logger"] == "procflow.test"
    assert first["message"] == "hello world" and first["task_id"] == "wf-1.t2"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["ts"])
    assert failed["level"] == "ERROR"
    assert "ValueError: boom" in failed["exc_info"] and "Traceback" in failed["exc_info"]
    assert in_request["request_id"] == "req-1" and in_request["user"] == "alice"
    assert "user" not in after and "request_id" not in after


def test_text_lines_are_readable_with_the_context_at_the_end(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
):
    logs.configure(Settings(log_format="json"))
    logs.configure(Settings())  # the default: text, INFO; replaces the JSON handler
    assert sum(isinstance(h, logs._StderrHandler) for h in logging.getLogger().handlers) == 1
    log = logging.getLogger("procflow.test")
    log.debug("not written at INFO")
    with logs.request_context("req-2"):
        logs.set_user("bob")
        log.info("decided %s", "approved", extra={"task_id": "t-9"})
    out = capsys.readouterr().err.splitlines()
    assert len(out) == 1
    assert re.fullmatch(
        r"\S+ INFO procflow\.test: decided approved \[request_id=req-2 user=bob task_id=t-9\]",
        out[0],
    )


# --- activity and workflow context -------------------------------------------------------------


@activity.defn(name="log_test_step")
async def step_activity(n: int) -> int:
    activity.logger.info("activity step %s", n)
    logging.getLogger("procflow.test").info("plain logger in the activity")
    return n


async def test_an_activity_line_carries_the_workflow_and_activity(lines: Lines):
    logs.configure(Settings(log_format="json"), registry.process_type_of)  # as the worker does
    logging.getLogger().setLevel(logging.DEBUG)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        workflow_id="sales-order-T1",
        workflow_run_id="run-1",
        workflow_type="SalesOrderWorkflow",
        activity_type="log_test_step",
        task_queue="q1",
    )
    assert await env.run(step_activity, 3) == 3
    sdk, plain = [line for line in lines.json() if line["logger"] != "asyncio"]
    expected = {
        "workflow_id": "sales-order-T1",
        "run_id": "run-1",
        "workflow_type": "SalesOrderWorkflow",
        "process_type": "sales_order",  # the registered type that runs as this workflow
        "activity_type": "log_test_step",
        "task_queue": "q1",
    }
    for line in (sdk, plain):
        assert {k: line.get(k) for k in expected} == expected, line
    assert sdk["message"].startswith("activity step 3")


@workflow.defn(name="log_test_steps")
class StepsWorkflow:
    @workflow.run
    async def run(self) -> None:
        for n in range(1, 4):
            workflow.logger.info("workflow step %s", n)
            logging.getLogger("procflow.test.unsafe").info("plain step %s", n)
            await workflow.execute_activity(
                step_activity, n, start_to_close_timeout=timedelta(seconds=10)
            )
            await workflow.sleep(timedelta(seconds=5))


async def test_workflow_lines_carry_the_ids_and_are_not_written_again_on_replay(
    lines: Lines, restore_logging: None
):
    logs.configure(Settings(log_format="json"), registry.process_type_of)  # as the worker does
    logging.getLogger().setLevel(logging.DEBUG)
    env = await start_time_skipping()
    try:
        queue = f"log-test-{uuid.uuid4()}"
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[StepsWorkflow],
            activities=[step_activity],
            max_cached_workflows=0,  # every workflow task replays the history from the start
        ):
            handle = await env.client.start_workflow(
                StepsWorkflow.run, id=f"log-test-{uuid.uuid4()}", task_queue=queue
            )
            await handle.result()
    finally:
        await env.shutdown()
    parsed = lines.json()
    steps = [line for line in parsed if line["message"].startswith("workflow step")]
    assert [line["message"] for line in steps] == [f"workflow step {n}" for n in (1, 2, 3)]
    for line in steps:
        assert line["workflow_id"] == handle.id
        assert line["run_id"] == handle.result_run_id
        assert line["workflow_type"] == "log_test_steps"
        assert line["task_queue"] == queue
    # the replays did happen: a plain logger in workflow code writes its lines again
    plain = [line["message"] for line in parsed if line["logger"] == "procflow.test.unsafe"]
    assert plain.count("plain step 1") > 1
    activity_lines = [line for line in parsed if line["message"].startswith("activity step")]
    assert len(activity_lines) == 3
    assert all(line["workflow_id"] == handle.id for line in activity_lines)


# --- the API: the acting user, and no secrets --------------------------------------------------


@pytest_asyncio.fixture
async def db_url(db_url: str) -> str:
    return await seed_database(db_url)


@pytest_asyncio.fixture
async def live_api(
    dev_env: WorkflowEnvironment,
    db_url: str,
    sessions: async_sessionmaker,
    mail_sink: MailSink,
    restore_logging: None,
) -> AsyncIterator[Api]:
    """The app (logging JSON at DEBUG) and the real worker against the dev server."""
    from activities.mail import SmtpSender
    from activities.payments import SandboxPaymentProvider
    from worker import build_worker

    client: Client = dev_env.client
    queue = f"log-test-{uuid.uuid4()}"
    settings = Settings(
        database_url=db_url,
        task_queue=queue,
        update_wait_s=20.0,
        log_format="json",
        log_level="DEBUG",
    )
    app = create_app(settings, temporal_client=client)
    worker = build_worker(
        client,
        task_queue=queue,
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )
    async with worker:
        async for api in _running(app):
            yield api


@dataclasses.dataclass
class Run:
    """What a few requests through the app wrote (JSON lines, the test's SMTP sink left out)."""

    lines: list[dict]
    text: str
    tokens: list[str]
    workflow_id: str
    decided: dict[str, str]  # the decision's response headers


async def run_requests(api: Api, capsys: pytest.CaptureFixture[str]) -> Run:
    """Two failing sign-ins, two good ones, an order started, a refused and a good decision."""
    capsys.readouterr()
    wrong = await api.http.post("/auth/token", data={"username": "vera", "password": "wrong"})
    assert wrong.status_code == 401
    unknown = await api.http.post(
        "/auth/token", data={"username": "nobody", "password": DEMO_PASSWORD}
    )
    assert unknown.status_code == 401
    started = await api.post("/orders", "alice", json=order_body(600_000))
    assert started.status_code == 201, started.text
    task_id = started.json()["pending_tasks"][0]["task_id"]
    refused = await api.post(f"/tasks/{task_id}/decision", "alice", json={"outcome": "approved"})
    assert refused.status_code == 403, refused.text
    decided = await api.post(
        f"/tasks/{task_id}/decision", "victor", json={"outcome": "approved", "comment": "ok"}
    )
    assert decided.status_code == 200, decided.text
    await asyncio.sleep(1)  # the worker's lines after the decision (projection, mail)
    written = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    # the loopback SMTP sink of the test is not procflow: it stands for the mail server
    lines = [line for line in written if line["logger"] not in SMTP_SINK_LOGGERS]
    assert lines, "nothing was logged"
    return Run(
        lines=lines,
        text="\n".join(json.dumps(line, ensure_ascii=False) for line in lines),
        tokens=list(api.tokens.values()),
        workflow_id=started.json()["workflow_id"],
        decided=dict(decided.headers),
    )


async def test_api_lines_name_the_user_and_carry_no_password_or_token(
    live_api: Api, capsys: pytest.CaptureFixture[str]
):
    run = await run_requests(live_api, capsys)
    access = [line for line in run.lines if line["logger"] == "procflow.api.access"]
    decision = [line for line in access if line["message"].startswith("POST /tasks/")]
    assert decision[-1]["user"] == "victor", decision
    assert decision[-1]["message"].split()[2] == "200"
    assert decision[-1]["request_id"] == run.decided["x-request-id"]
    signins = [line for line in access if line["message"].startswith("POST /auth/token")]
    assert len(signins) == 4 and not any("user" in line for line in signins)
    # what the refusal wrote names the user too
    assert any(line.get("user") == "alice" and "refused" in line["message"] for line in run.lines)
    # the worker's lines carry the workflow
    assert any(line.get("workflow_id") == run.workflow_id for line in run.lines)

    assert len(run.tokens) == 2
    for token in run.tokens:
        assert token not in run.text
    # "demo" as a word: the demo password (not a part of another word)
    assert not re.search(rf"\b{re.escape(DEMO_PASSWORD)}\b", run.text), [
        line for line in run.text.splitlines() if DEMO_PASSWORD in line
    ]


async def test_api_run_logs_no_email_address(live_api: Api, capsys: pytest.CaptureFixture[str]):
    run = await run_requests(live_api, capsys)
    addresses = [CUSTOMER_EMAIL, "alice@example.com", "vera@example.com", "victor@example.com"]
    leaked = [line for line in run.text.splitlines() if any(a in line for a in addresses)]
    assert not leaked, leaked


def test_formats_render_records_without_a_configured_root(restore_logging: None):
    """formatter() used on its own (as the tests here do) renders the same keys."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("json"))
    log = logging.getLogger("procflow.test.alone")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("x")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    line = json.loads(stream.getvalue())
    assert (line["level"], line["logger"], line["message"]) == (
        "WARNING",
        "procflow.test.alone",
        "x",
    )


# --- the dev stack's supervisor ----------------------------------------------------------------


def test_run_stack_writes_json_lines_in_json_mode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from scripts import run_stack

    monkeypatch.setattr(run_stack, "_json_output", True)
    run_stack.say("worker", '{"ts": "t", "level": "INFO", "logger": "a", "message": "m"}\n')
    run_stack.say("temporal", "a plain line\n")
    child, plain = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert child == {"process": "worker", "ts": "t", "level": "INFO", "logger": "a", "message": "m"}
    assert (plain["process"], plain["logger"], plain["message"]) == (
        "temporal",
        "temporal",
        "a plain line",
    )
    monkeypatch.setattr(run_stack, "_json_output", False)
    run_stack.say("stack", "text again")
    assert capsys.readouterr().out == "stack    | text again\n"


def test_run_stack_hands_the_log_settings_to_its_children(monkeypatch: pytest.MonkeyPatch):
    from scripts import run_stack

    monkeypatch.setenv("PROCFLOW_LOG_FORMAT", "json")
    monkeypatch.setenv("PROCFLOW_LOG_LEVEL", "DEBUG")
    env, settings = run_stack.log_settings()
    assert env == {"PROCFLOW_LOG_FORMAT": "json", "PROCFLOW_LOG_LEVEL": "DEBUG"}
    assert settings is not None and settings.log_format == "json"
