"""scripts/run_stack.py: port check, the Temporal command line, child supervision, and a real
Temporal dev server restarted on the same database file."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import WorkflowExecutionStatus

from core.settings import Settings
from core.temporal import SEARCH_ATTRIBUTES, connect, indexed_value_type
from scripts import run_stack
from scripts.run_stack import Stack, StackConfig, StackError

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_config(data_dir: Path) -> StackConfig:
    return StackConfig(
        temporal_port=free_port(),
        ui_port=free_port(),
        api_port=free_port(),
        smtp_port=free_port(),
        data_dir=data_dir,
    )


def port_args(config: StackConfig) -> list[str]:
    return [
        "--temporal-port", str(config.temporal_port),
        "--ui-port", str(config.ui_port),
        "--api-port", str(config.api_port),
        "--smtp-port", str(config.smtp_port),
        "--data-dir", str(config.data_dir),
    ]  # fmt: skip


def test_busy_port_stops_the_stack_before_anything_starts(tmp_path: Path) -> None:
    config = free_config(tmp_path / "data")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", config.api_port))
        busy.listen()
        result = subprocess.run(
            [sys.executable, "-m", "scripts.run_stack", *port_args(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"port {config.api_port} (API)" in result.stdout
    assert "another procflow stack is running?" in result.stdout
    assert not config.data_dir.exists()


def test_the_same_port_twice_is_refused() -> None:
    config = StackConfig(api_port=9999, ui_port=9999)
    with pytest.raises(StackError, match="9999"):
        run_stack.check_ports(config)


def test_temporal_command_persists_in_wal_mode_and_registers_every_search_attribute(
    tmp_path: Path,
) -> None:
    config = StackConfig(temporal_port=7000, ui_port=7001, data_dir=tmp_path)
    cmd = run_stack.temporal_command(config, "/bin/temporal")

    assert cmd[:3] == ["/bin/temporal", "server", "start-dev"]

    def values(flag: str) -> list[str]:
        return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]

    assert values("--db-filename") == [str(tmp_path / "temporal.db")]
    assert values("--sqlite-pragma") == ["journal_mode=wal", "synchronous=normal"]
    assert values("--ip") == ["127.0.0.1"]
    assert values("--port") == ["7000"]
    assert values("--ui-port") == ["7001"]
    assert values("--search-attribute") == [f"{n}={t}" for n, t in SEARCH_ATTRIBUTES.items()]


def test_temporal_binary_comes_from_the_virtualenv() -> None:
    assert run_stack.find_temporal_binary() == str(Path(sys.executable).parent / "temporal")


def test_children_point_at_this_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROCFLOW_DATABASE_URL", raising=False)
    config = free_config(tmp_path)
    env = run_stack.child_env(config)
    settings = Settings(
        **{
            k.removeprefix("PROCFLOW_").lower(): v
            for k, v in env.items()
            if k.startswith("PROCFLOW_") and not k.startswith("PROCFLOW_STACK_")
        }
    )
    assert settings.temporal_address == f"127.0.0.1:{config.temporal_port}"
    assert settings.smtp_port == config.smtp_port
    assert settings.api_port == config.api_port
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path / 'procflow.db'}"


def test_an_explicit_database_url_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCFLOW_DATABASE_URL", "postgresql+asyncpg://u:p@db/procflow")
    env = run_stack.child_env(free_config(tmp_path))
    assert env["PROCFLOW_DATABASE_URL"] == "postgresql+asyncpg://u:p@db/procflow"


# A child that records SIGTERM in a file, then exits (or ignores it, to test the SIGKILL).
CHILD = """
import signal, sys, time
name, log, obey = sys.argv[1], sys.argv[2], sys.argv[3] == "obey"
def on_term(*_):
    open(log, "a").write(name + "\\n")
    if obey:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(log + "." + name + ".ready", "w").close()
while True:
    time.sleep(0.05)
"""


def test_children_stop_in_reverse_order_and_a_stubborn_one_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_stack, "STOP_GRACE_S", 1.0)
    log = tmp_path / "stopped.log"
    stack = Stack()
    children = [
        stack.start(name, [sys.executable, "-c", CHILD, name, str(log), mode])
        for name, mode in (("first", "obey"), ("stubborn", "ignore"), ("last", "obey"))
    ]
    ready = [Path(f"{log}.{name}.ready") for name in ("first", "stubborn", "last")]
    run_stack.wait_until(stack, "signal handlers", lambda: all(p.exists() for p in ready), 10)
    stack.stop()

    assert log.read_text().split() == ["last", "stubborn", "first"]
    assert [c.process.returncode for c in children] == [0, -9, 0]
    assert stack.children == []


def test_a_dead_child_is_reported_by_name() -> None:
    stack = Stack()
    stack.start("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(StackError, match="crasher exited unexpectedly with code 3"):
        run_stack.wait_until(stack, "nothing", lambda: False, 10)
    stack.stop()


def test_a_failing_one_shot_step_fails_the_stack() -> None:
    stack = Stack()
    with pytest.raises(StackError, match="migrate failed with exit code 2"):
        stack.run_once("migrate", [sys.executable, "-c", "raise SystemExit(2)"])
    assert stack.children == []


# --- the real dev server ---------------------------------------------------------------------


async def _start_parked_workflow(address: str, workflow_id: str) -> None:
    client = await connect(Settings(temporal_address=address))
    # No worker polls this queue: the execution stays Running, which is all we need.
    await client.start_workflow(
        "ParkedWorkflow", id=workflow_id, task_queue=f"parked-{uuid.uuid4()}"
    )


async def _registered_attributes_and_status(
    address: str, workflow_id: str
) -> tuple[dict[str, int], WorkflowExecutionStatus | None]:
    client = await connect(Settings(temporal_address=address))
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace="default")
    )
    description = await client.get_workflow_handle(workflow_id).describe()
    return dict(listed.custom_attributes), description.status


def test_restarting_on_the_same_database_resumes_data_and_adds_new_search_attributes(
    tmp_path: Path,
) -> None:
    """The dev server registers --search-attribute only when it creates its database; the stack
    adds attributes that appeared since (as after a code change), and keeps the executions."""
    config = free_config(tmp_path)
    workflow_id = f"parked-{uuid.uuid4()}"
    stack = Stack()
    try:
        # First run: an "older" version of the code that knew a single attribute.
        run_stack.start_temporal(stack, config, search_attributes={"ProcessType": "Keyword"})
        asyncio.run(_start_parked_workflow(config.temporal_address, workflow_id))
        stack.stop()

        # Second run: same database file, today's attributes.
        run_stack.start_temporal(stack, config)
        attributes, status = asyncio.run(
            _registered_attributes_and_status(config.temporal_address, workflow_id)
        )
        for name, kind in SEARCH_ATTRIBUTES.items():
            assert attributes.get(name) == indexed_value_type(kind), name
        assert status == WorkflowExecutionStatus.RUNNING

        # A name already registered with another type is refused, not silently kept.
        with pytest.raises(StackError, match="Amount is registered as INDEXED_VALUE_TYPE_DOUBLE"):
            asyncio.run(
                run_stack.ensure_search_attributes(config.temporal_address, {"Amount": "Keyword"})
            )
    finally:
        stack.stop()
    assert (tmp_path / "temporal.db").exists()
    assert IndexedValueType.Name(attributes["PendingRoles"]) == "INDEXED_VALUE_TYPE_KEYWORD_LIST"
