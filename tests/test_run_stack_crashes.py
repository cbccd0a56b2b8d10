"""scripts/run_stack.py as a supervisor, run for real as a subprocess on free ports and a data
directory of its own: one stack per data directory, children that die with the supervisor,
leftovers of a killed stack stopped at the next start, crashed parts restarted, and a part that
keeps crashing stops the stack with a clear message."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from scripts.run_stack import PID_FILE, ChildRecord, StackConfig, read_pid_file, write_pid_file
from scripts.seed import DEMO_PASSWORD
from tests.support import free_config

ROOT = Path(__file__).resolve().parents[1]
LONG_RUNNING = ("mail", "temporal", "worker", "api")


def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (nobody may reap the children of a dead
    supervisor at once: they count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Supervisor:
    """`python -m scripts.run_stack` on the given ports, its output in a log file."""

    def __init__(self, config: StackConfig, log: Path) -> None:
        self.config = config
        self.log = log
        self.data_dir = config.data_dir.resolve()
        args = [
            "--temporal-port", str(config.temporal_port),
            "--ui-port", str(config.ui_port),
            "--api-port", str(config.api_port),
            "--smtp-port", str(config.smtp_port),
            "--data-dir", str(config.data_dir),
        ]  # fmt: skip
        # the stack's own settings only: none of the PROCFLOW_* this test run may carry
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROCFLOW_")}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scripts.run_stack", *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.seen: dict[int, ChildRecord] = {}  # every child it listed, for the teardown

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 90) -> None:
        def said() -> bool:
            if text in self.output():
                return True
            assert self.proc.poll() is None, f"the supervisor exited:\n{self.output()[-4000:]}"
            return False

        until(said, timeout_s, f"the supervisor says {text!r}")

    def up(self) -> dict[str, int]:
        """Wait until the stack is up; the pid of each long-running child."""
        self.wait_for("procflow is up:")
        children = self.children()
        assert sorted(children) == sorted(LONG_RUNNING), children
        return children

    def children(self) -> dict[str, int]:
        records = read_pid_file(self.data_dir / PID_FILE)
        self.seen.update({record.pid: record for record in records})
        return {record.name: record.pid for record in records}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.config.api_port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for record in self.seen.values():  # a failed test must not leave servers behind
            if record.still_running():
                os.kill(record.pid, signal.SIGKILL)


@pytest.fixture
def supervisors(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(name: str, data_dir: Path, config: StackConfig | None = None) -> Supervisor:
        supervisor = Supervisor(config or free_config(data_dir), tmp_path / f"{name}.log")
        started.append(supervisor)
        return supervisor

    try:
        yield start
    finally:
        for supervisor in reversed(started):
            supervisor.stop()


@pytest.mark.timeout(150)
def test_a_second_stack_on_the_same_data_dir_is_refused_naming_the_first_one(
    tmp_path: Path, supervisors: Callable[..., Supervisor]
) -> None:
    data = tmp_path / "data"
    first = supervisors("first", data)
    children = first.up()

    second = supervisors("second", data)  # other ports, the same data directory
    assert second.proc.wait(60) == 1
    out = second.output()
    assert (
        f"error: data directory {data.resolve()} is in use by another procflow stack "
        f"(supervisor pid {first.pid}): stop it (kill {first.pid}), or choose another --data-dir"
    ) in out
    assert "starting" not in out  # no second dev server, worker or sink on the same files
    assert not accepts(second.config.api_port) and not accepts(second.config.temporal_port)
    assert first.children() == children
    assert all(alive(pid) for pid in children.values())
    assert (data / "stack.lock").read_text() == f"{first.pid}\n"

    other = supervisors("other", tmp_path / "other")  # another data directory works
    other.up()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=lambda s: s.name)
def test_the_children_die_with_the_supervisor_and_the_next_start_succeeds(
    tmp_path: Path, supervisors: Callable[..., Supervisor], sig: signal.Signals
) -> None:
    data = tmp_path / "data"
    first = supervisors("first", data)
    children = first.up()

    first.proc.send_signal(sig)
    code = first.proc.wait(60)
    until(
        lambda: not any(alive(pid) for pid in children.values()),
        60,
        f"every child of the supervisor ends: {children}",
    )
    if sig == signal.SIGHUP:  # the terminal closed: an orderly stop, as on Ctrl-C
        assert code == 0
        assert "SIGHUP: shutting down" in first.output()
        assert not (data / PID_FILE).exists()
    else:
        assert code == -signal.SIGKILL

    again = supervisors("again", data, first.config)  # the same ports and data directory
    assert set(again.up().values()).isdisjoint(children.values())
    assert "stopping leftovers" not in again.output()  # nothing was left to stop


@pytest.mark.timeout(120)
def test_the_lock_and_the_leftovers_of_a_killed_stack_do_not_block_the_next_start(
    tmp_path: Path, supervisors: Callable[..., Supervisor]
) -> None:
    """What a supervisor killed before its children were tied to it leaves: its pid in the lock
    file, and a pid file naming a mail sink still on the port, and a pid reused since."""
    data = tmp_path / "data"
    data.mkdir()
    config = free_config(data)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (data / "stack.lock").write_text(f"{dead.pid}\n")
    sink_cmd = [sys.executable, "-m", "scripts.mailsink", "--host", "127.0.0.1"]
    sink_cmd += ["--port", str(config.smtp_port), "--dir", str(data / "mail")]
    leftover = subprocess.Popen(sink_cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        until(lambda: accepts(config.smtp_port), 30, "the leftover sink listens")
        write_pid_file(
            data / PID_FILE,
            [
                ChildRecord("mail", leftover.pid, start_time(leftover.pid), sink_cmd),
                ChildRecord(
                    "worker",
                    unrelated.pid,
                    start_time(unrelated.pid),
                    [sys.executable, "worker.py"],
                ),
            ],
        )

        stack = supervisors("next", data, config)
        children = stack.up()
        assert leftover.wait(30) == 0  # SIGTERM: the sink stopped cleanly
        assert f"stopping leftovers of a previous stack: mail (pid {leftover.pid})" in (
            stack.output()
        )
        assert unrelated.poll() is None  # its pid was listed, its command line was not ours
        assert children["mail"] != leftover.pid
        assert (data / "stack.lock").read_text() == f"{stack.pid}\n"
    finally:
        for proc in (leftover, unrelated):
            proc.kill()
            proc.wait()


def _login(http: httpx.Client, username: str) -> dict[str, str]:
    response = http.post("/auth/token", data={"username": username, "password": DEMO_PASSWORD})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def _order_body(order_no: str) -> dict:
    """The walk-through's order, small enough to need no approval."""
    return {
        "order_no": order_no,
        "customer": {
            "id": "CUST-42",
            "company_name": "ACME Ltd",
            "contact_phone": "+40 21 123 4567",
            "email": "buyer@acme.example",
        },
        "lines": [{"sku": "SKU-MUG", "quantity": 2, "unit_price": 50}],
    }


@pytest.mark.timeout(240)
def test_each_part_killed_once_is_restarted_and_the_stack_serves_again(
    tmp_path: Path, supervisors: Callable[..., Supervisor]
) -> None:
    stack = supervisors("stack", tmp_path / "data")
    stack.up()
    config = stack.config

    def api_healthy() -> bool:
        try:
            return httpx.get(stack.url("/healthz"), timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    polling = "worker polling task queue procflow"
    ready: dict[str, Callable[[], bool]] = {
        "mail": lambda: accepts(config.smtp_port),
        "temporal": lambda: accepts(config.temporal_port) and accepts(config.ui_port),
        "worker": lambda: stack.output().count(polling) >= polls + 1,
        "api": api_healthy,
    }
    for name in LONG_RUNNING:
        old = stack.children()[name]
        polls = stack.output().count(polling)
        os.kill(old, signal.SIGKILL)
        stack.wait_for(f"{name} (pid {old}) was killed by SIGKILL; restarting it in 1 s")
        stack.wait_for(f"restarted {name} (pid ")
        new = stack.children()[name]
        assert new != old and alive(new)
        until(ready[name], 60, f"the restarted {name} serves")
    assert stack.proc.poll() is None

    # instances carry on: an order placed now runs to its end on the restarted parts
    with httpx.Client(base_url=stack.url(""), timeout=30) as http:
        alice = _login(http, "alice")
        placed = http.post("/orders", json=_order_body("9001"), headers=alice)
        assert placed.status_code == 201, placed.text

        def closed() -> bool:
            status = http.get("/orders/9001", headers=alice)
            assert status.status_code == 200, status.text
            return status.json()["stage"] == "closed"

        until(closed, 90, "order 9001 closes")
    # and the restarted sink got the customer's mail
    until(lambda: any((stack.data_dir / "mail").glob("*.eml")), 60, "mail in the sink's folder")
    assert stack.proc.poll() is None


@pytest.mark.timeout(150)
def test_a_part_that_keeps_crashing_makes_the_supervisor_give_up_and_stop_everything(
    tmp_path: Path, supervisors: Callable[..., Supervisor]
) -> None:
    stack = supervisors("stack", tmp_path / "data")
    children = stack.up()
    # from now on the sink cannot start again: where its folder was, there is a file
    mail = stack.data_dir / "mail"
    shutil.rmtree(mail)
    mail.write_text("not a folder")
    os.kill(children["mail"], signal.SIGKILL)
    assert stack.proc.wait(120) == 1
    out = stack.output()
    assert re.search(
        r"error: mail \(pid \d+\) exited with code 1: it crashed 5 times within 60 s; "
        r"giving up; shutting down",
        out,
    ), out[-4000:]
    delays = re.findall(r"mail \(pid \d+\) [^;]+; restarting it in (\d+) s", out)
    assert delays == ["1", "2", "4", "8"]
    until(
        lambda: not any(alive(pid) for pid in children.values()),
        30,
        "the other parts stop with the supervisor",
    )
    assert not (stack.data_dir / PID_FILE).exists()
