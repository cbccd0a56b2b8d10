"""scripts/run_stack.py: port check, the Temporal command line, child supervision, and a real
Temporal dev server restarted on the same database file."""

from __future__ import annotations

import asyncio
import os
import re
import signal
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
from tests.support import free_config, started_commands

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    assert settings.worker_health_address == f"127.0.0.1:{config.worker_health_port}"


def test_make_run_serves_the_worker_health_on_9465_unless_told_otherwise(tmp_path: Path) -> None:
    assert run_stack.parse_args(["--data-dir", str(tmp_path)]).worker_health_port == 9465
    off = run_stack.parse_args(["--worker-health-port", "0", "--data-dir", str(tmp_path)])
    assert run_stack.child_env(off)["PROCFLOW_WORKER_HEALTH_ADDRESS"] == ""


def test_tracing_on_without_an_endpoint_gets_a_local_receiver_writing_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROCFLOW_OTLP_ENDPOINT", raising=False)
    monkeypatch.setenv("PROCFLOW_TRACING_ENABLED", "true")
    config = free_config(tmp_path)
    env = run_stack.child_env(config)
    assert env["PROCFLOW_OTLP_ENDPOINT"] == f"http://127.0.0.1:{config.traces_port}/v1/traces"
    started = started_commands(monkeypatch, config, env)
    assert list(started).index("traces") < list(started).index("worker")
    traces = started["traces"]
    assert traces[1:3] == ["-m", "scripts.otlp_sink"]
    assert traces[traces.index("--port") + 1] == str(config.traces_port)
    assert traces[traces.index("--jsonl") + 1] == str(tmp_path / "traces.jsonl")

    # an endpoint of the caller's is kept, and nothing of the stack's receives
    monkeypatch.setenv("PROCFLOW_OTLP_ENDPOINT", "http://collector:4318/v1/traces")
    assert run_stack.child_env(config)["PROCFLOW_OTLP_ENDPOINT"].startswith("http://collector")
    assert "traces" not in started_commands(monkeypatch, config, run_stack.child_env(config))
    # tracing off (the default): no receiver, no endpoint
    monkeypatch.delenv("PROCFLOW_OTLP_ENDPOINT")
    monkeypatch.delenv("PROCFLOW_TRACING_ENABLED")
    assert "PROCFLOW_OTLP_ENDPOINT" not in run_stack.child_env(config)


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


# --- supervision: restarts, the data directory's lock, leftovers ---------------------------

# Exits with code 3 the first `crashes` times it runs, then stays up (and says so in a file).
CRASH_THEN_RUN = """
import pathlib, sys, time
runs, crashes = pathlib.Path(sys.argv[1]), int(sys.argv[2])
n = int(runs.read_text()) if runs.exists() else 0
runs.write_text(str(n + 1))
if n < crashes:
    sys.exit(3)
pathlib.Path(sys.argv[1] + ".up").touch()
time.sleep(120)
"""


def test_restart_delays_double_up_to_the_cap() -> None:
    policy = run_stack.RestartPolicy(first_delay_s=1, max_delay_s=30)
    assert [policy.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert run_stack.RESTART_POLICY == run_stack.RestartPolicy(1.0, 30.0, 5, 60.0)


def test_a_crashed_child_is_restarted_after_a_growing_delay_and_carries_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, pid_file = tmp_path / "runs", tmp_path / "stack.pids"
    stack = Stack(pid_file=pid_file)
    first = stack.start("flaky", [sys.executable, "-c", CRASH_THEN_RUN, str(runs), "2"])
    policy = run_stack.RestartPolicy(first_delay_s=0.2, max_delay_s=5, max_crashes=5)
    try:
        run_stack.supervise(stack, policy, until=Path(f"{runs}.up").exists, poll_s=0.05)
        [child] = stack.children
        assert child.exited() is None and child.process.pid != first.process.pid
        assert runs.read_text() == "3"
        assert [r.pid for r in run_stack.read_pid_file(pid_file)] == [child.process.pid]
    finally:
        stack.stop()
    out = capsys.readouterr().out
    assert "exited with code 3; restarting it in 0.2 s (crash 1 of 5 allowed within 60 s)" in out
    assert "exited with code 3; restarting it in 0.4 s (crash 2 of 5 allowed within 60 s)" in out
    assert f"restarted flaky (pid {child.process.pid})" in out
    assert not pid_file.exists()


def test_a_child_that_keeps_crashing_makes_the_supervisor_give_up(tmp_path: Path) -> None:
    stack = Stack()
    stack.start("crasher", [sys.executable, "-c", CRASH_THEN_RUN, str(tmp_path / "runs"), "99"])
    policy = run_stack.RestartPolicy(first_delay_s=0.05, max_crashes=3, window_s=60)
    try:
        with pytest.raises(StackError) as raised:
            run_stack.supervise(stack, policy, poll_s=0.05)
    finally:
        stack.stop()
    assert re.fullmatch(
        r"crasher \(pid \d+\) exited with code 3: it crashed 3 times within 60 s; giving up",
        str(raised.value),
    )
    assert (tmp_path / "runs").read_text() == "3"


def test_a_second_lock_on_a_data_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first, second = run_stack.DataDirLock(tmp_path), run_stack.DataDirLock(tmp_path)
    first.acquire()
    try:
        assert (tmp_path / "stack.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(StackError) as raised:
            second.acquire()
        assert f"in use by another procflow stack (supervisor pid {os.getpid()})" in str(
            raised.value
        )
        assert "--data-dir" in str(raised.value)
    finally:
        first.release()
    second.acquire()  # released: free again, the file left in place is no obstacle
    second.release()


HOLD_PORT = """
import socket, sys, time
sock = socket.socket()
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
print("listening", flush=True)
time.sleep(120)
"""


def test_a_busy_port_names_the_process_that_holds_it(tmp_path: Path) -> None:
    config = free_config(tmp_path / "data")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_PORT, str(config.smtp_port)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"listening\n"
        with pytest.raises(StackError) as raised:
            run_stack.check_ports(config)
    finally:
        holder.kill()
        holder.wait()
    message = str(raised.value)
    assert f"port {config.smtp_port} (SMTP sink) on 127.0.0.1 is already in use by " in message
    assert f"pid {holder.pid} ({sys.executable} -c" in message
    assert f"Stop it (kill {holder.pid})" in message


def test_leftovers_are_stopped_only_when_pid_start_time_and_command_line_all_match(
    tmp_path: Path,
) -> None:
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    leftover, reused, restarted = (subprocess.Popen(sleep) for _ in range(3))
    try:
        pid_file = tmp_path / "stack.pids"

        def record(
            name: str, proc: subprocess.Popen, cmd: list[str], offset: int = 0
        ) -> run_stack.ChildRecord:
            started = run_stack.process_start_time(proc.pid)
            assert started is not None
            return run_stack.ChildRecord(name, proc.pid, started + offset, cmd)

        run_stack.write_pid_file(
            pid_file,
            [
                record("worker", leftover, sleep),
                # the pid now belongs to another program
                record("api", reused, [sys.executable, "worker.py"]),
                # the same command line, but not the process that was started
                record("mail", restarted, sleep, offset=-1),
            ],
        )
        stopped = run_stack.stop_leftovers(pid_file, grace_s=10)
        assert [child.pid for child in stopped] == [leftover.pid]
        assert leftover.wait(10) == -signal.SIGTERM
        assert reused.poll() is None and restarted.poll() is None
        assert not pid_file.exists()
    finally:
        for proc in (leftover, reused, restarted):
            proc.kill()
            proc.wait()
