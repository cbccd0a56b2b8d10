"""procflow against the engine's own limit: `python -m bench.run [--quick]` (or `make bench`).

For each tree it measures (`--tree LABEL=PATH`, repeatable; by default this checkout), it
starts its own pieces in a temporary directory, on free loopback ports: a Temporal dev server
(SQLite file with the WAL pragmas of scripts.run_stack, headless), a SQLite records database
migrated and seeded by that tree's scripts, the SMTP sink, that tree's worker
(`python worker.py`, a subprocess: its RSS is read from /proc) and API (uvicorn, a subprocess,
driven over real HTTP), and a baseline worker (`python -m bench.baseline`, a subprocess). Then
it measures, side by side in one run, and writes bench/results/latest.json. See
bench/README.md.

    python -m bench.run --tree before=/tmp/before --tree after=/tmp/after

measures two trees (e.g. git worktrees of two commits) one after the other in the same run,
each with a stack of its own; PROCFLOW_BENCH_TREES="before=/tmp/before after=/tmp/after" does
the same for `make bench`.

Phase 8 (`--phases observe`) starts two more stacks of the last tree, metrics and tracing off
and on (spans to scripts/otlp_sink.py, a subprocess; /metrics scraped), and drives both with the
order mix in interleaved rounds: the overhead of observability, target < 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import MetaData, Table, insert, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from bench.baseline import BaselineOrderWorkflow, Batch, Shape, Step, TrivialWorkflow
from bench.profile import CpuMeter, LoadMeter, Profiler, cpu_s
from core.db import make_engine
from scripts.mailsink import MailSink
from scripts.run_stack import (
    StackConfig,
    StackError,
    ensure_search_attributes,
    find_temporal_binary,
    temporal_command,
)
from scripts.seed import DEMO_PASSWORD

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"
USERS = 10  # concurrent simulated users / deciders
STARTERS = 32  # phase 5: client starts in flight at once
WINDOW = 100  # phase 5: at most this many started instances not yet waiting on approval
STALL_S = 180  # phase 5 gives up when no instance reached its approval for this long
QUEUE = "procflow-bench"  # the procflow worker's task queue
TERMINAL = {"closed", "rejected", "cancelled", "failed"}
TREES_ENV = "PROCFLOW_BENCH_TREES"  # "label=path label=path": the trees `make bench` measures
CODED_COMPLAINT = "bench.coded_complaint"  # phase 7's coded side, a process module of the tree
CHAIN_STAGES = 50  # phase 7: task stages of the generated document published
PUBLISHES = 5  # phase 7: documents published (and as many validated), each a new one
POLL_S = 0.05  # phase 7: how often a simulated user looks for the next step in the read model


@dataclass(frozen=True)
class Sizes:
    orders: int  # 1. end-to-end orders (and baseline orders)
    decisions: int  # 2. decisions measured
    raw_updates: int  # 2. raw update round trips
    inbox_tasks: int  # 3. synthetic open tasks in the read model
    inbox_requests: int  # 3. GET /tasks measured per variant
    waiting: int  # 5. instances waiting on approvals
    wal_orders: int  # 4. baseline orders per server and round (two rounds)
    scale_orders: int  # 6. baseline orders per worker count (0: skipped)
    complaints: int  # 7. complaints per side (blueprint, coded), in rounds
    complaint_rounds: int  # 7. rounds, each a batch of both sides (alternating which first)
    blueprint_waiting: int  # 7. blueprint complaints waiting on their first task
    observe_orders: int  # 8. orders per side (metrics and tracing off, on), in rounds
    observe_rounds: int  # 8. rounds, each a batch of both sides (alternating which first)


QUICK = Sizes(30, 30, 200, 5_000, 100, 300, 20, 0, 30, 3, 300, 40, 2)
FULL = Sizes(150, 100, 1_000, 100_000, 300, 10_000, 60, 200, 200, 5, 2_000, 400, 4)
INSERT_CHUNK = 5_000  # phase 3: rows per executemany
# --phases: 1 e2e, 2 decision, 5 memory, 3 inbox, 4 + 6 (engine: WAL, scale-out; needs e2e),
# 7 blueprint (the interpreter against the coded complaint, waiting blueprints, publishing),
# 8 observe (metrics and tracing off against on, two stacks of the last tree side by side)
PHASES = ("e2e", "decision", "memory", "inbox", "engine", "blueprint", "observe")
PER_SIDE = frozenset(PHASES) - {"observe"}  # the phases run on each tree's own stack


# ------------------------------------------------------------------------------ helpers
def say(phase: str, line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {phase:<9}| {line}", flush=True)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict[str, Any]:
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    cli = subprocess.run(
        [find_temporal_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "temporalio": version("temporalio"),
        "server": cli,
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


async def gather_limited(
    items: Iterable[Any], fn: Callable[[Any], Awaitable[Any]], concurrency: int, phase: str
) -> list[Any]:
    """Run fn over items with `concurrency` workers pulling from one queue; print progress."""
    queue: asyncio.Queue = asyncio.Queue()
    items = list(items)
    for i, item in enumerate(items):
        queue.put_nowait((i, item))
    results: list[Any] = [None] * len(items)
    done = 0

    async def user() -> None:
        nonlocal done
        while not queue.empty():
            i, item = queue.get_nowait()
            results[i] = await fn(item)
            done += 1

    async def ticker() -> None:
        while True:
            await asyncio.sleep(10)
            say(phase, f"{done}/{len(items)} done")

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(user() for _ in range(concurrency)))
    finally:
        tick.cancel()
    return results


# ------------------------------------------------------------------------------ trees
# Run inside a tree (cwd and PYTHONPATH = its root): what the harness needs to know of its code.
PROBE = """
import json
from temporalio import workflow
from core.settings import Settings
from workflows.sales_order import SalesOrderWorkflow, sales_order_workflow_id
print(json.dumps({
    "workflow": workflow._Definition.must_from_class(SalesOrderWorkflow).name,
    "workflow_id": sales_order_workflow_id("{}"),
    "worker_max_cached_workflows": Settings.model_fields["worker_max_cached_workflows"].default,
}))
"""


@dataclass(frozen=True)
class Tree:
    """A checkout whose worker, API, migrations and seeds one side of the run uses."""

    label: str
    root: Path
    commit: str
    subject: str
    dirty: bool
    workflow: str  # the sales order's workflow type in this tree
    workflow_id: str  # its workflow-ID template, "{}" for the order number
    cache_default: int  # the production default of worker_max_cached_workflows there

    def wid(self, order_no: str) -> str:
        return self.workflow_id.format(order_no)

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.root)}

    def info(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "commit": self.commit,
            "subject": self.subject,
            "dirty": self.dirty,
            "workflow": self.workflow,
            "worker_max_cached_workflows": self.cache_default,
        }


def git(root: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=False, timeout=30
    )
    return out.stdout.strip()


def load_tree(label: str, root: Path) -> Tree:
    root = root.resolve()
    if not (root / "worker.py").is_file():
        raise SystemExit(f"--tree {label}={root}: no worker.py there")
    probe = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=root,
        env={**_environ(), "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise SystemExit(f"--tree {label}={root}: its code does not load:\n{probe.stderr[-2000:]}")
    facts = json.loads(probe.stdout.strip().splitlines()[-1])
    return Tree(
        label=label,
        root=root,
        commit=git(root, "rev-parse", "HEAD") or "unknown",
        subject=git(root, "log", "-1", "--format=%s")[:120],
        dirty=bool(git(root, "status", "--porcelain", "--untracked-files=no")),
        workflow=facts["workflow"],
        workflow_id=facts["workflow_id"],
        cache_default=facts["worker_max_cached_workflows"],
    )


def parse_trees(specs: list[str]) -> list[tuple[str, Path]]:
    trees = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--tree {spec!r}: expected LABEL=PATH")
        trees.append((label, Path(path)))
    if len({label for label, _ in trees}) != len(trees):
        raise SystemExit("--tree: every label once")
    return trees


# ------------------------------------------------------------------------------ processes
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def check(self) -> None:
        if (code := self.popen.poll()) is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise StackError(f"{self.name} exited with {code}; its log ends:\n{tail}")


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PROCFLOW_")}


def spawn(
    name: str, cmd: list[str], tmp: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Proc:
    log = tmp / f"{name}.log"
    popen = subprocess.Popen(
        cmd,
        cwd=cwd,
        # the caller's PROCFLOW_* settings stay out: each piece gets exactly the ones given
        env={**_environ(), "PYTHONUNBUFFERED": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Proc(name, popen, log)


def run_once(name: str, cmd: list[str], tmp: Path, env: dict[str, str], cwd: Path) -> None:
    proc = spawn(name, cmd, tmp, env, cwd)
    if proc.popen.wait(300) != 0:
        raise StackError(f"{name} failed: {proc.log.read_text(errors='replace')[-2000:]}")


async def start_server(name: str, tmp: Path, *, tuned: bool) -> tuple[Proc, str]:
    """A headless dev server on a SQLite file; `tuned` keeps run_stack's WAL pragmas."""
    config = StackConfig(
        host=HOST, temporal_port=free_port(), ui_port=free_port(), data_dir=tmp / name
    )
    config.data_dir.mkdir(parents=True)
    cmd = temporal_command(config, find_temporal_binary()) + ["--headless"]
    if not tuned:  # drop every "--sqlite-pragma X" pair: SQLite's defaults (rollback journal)
        while "--sqlite-pragma" in cmd:
            i = cmd.index("--sqlite-pragma")
            del cmd[i : i + 2]
    proc = spawn(name, cmd, tmp)
    deadline = time.monotonic() + 60
    while True:
        proc.check()
        try:
            await asyncio.wait_for(ensure_search_attributes(config.temporal_address), 10)
            return proc, config.temporal_address
        except StackError:
            raise
        except Exception:
            if time.monotonic() > deadline:
                raise StackError(f"{name} not ready after 60 s") from None
            await asyncio.sleep(0.3)


# ------------------------------------------------------------------------------ API driver
@dataclass
class Api:
    http: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)

    async def headers(self, user: str) -> dict[str, str]:
        if user not in self.tokens:
            r = await self.http.post(
                "/auth/token", data={"username": user, "password": DEMO_PASSWORD}
            )
            r.raise_for_status()
            self.tokens[user] = r.json()["access_token"]
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    async def call(self, method: str, url: str, user: str, **kw) -> dict:
        r = await self.http.request(method, url, headers=await self.headers(user), **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {url} as {user}: {r.status_code} {r.text[:300]}")
        return r.json()


def order_body(order_no: str, amount: int, variant: str = "standard") -> dict:
    return {
        "order_no": order_no,
        "customer": {
            "id": "CUST-BENCH",
            "company_name": "Bench Ltd",
            "contact_phone": "+49 30 1234567",
            "email": "buyer@bench.example",
        },
        "lines": [{"sku": "SKU-PRINTER", "quantity": "1", "unit_price": str(amount)}],
        "variant": variant,
    }


# kind -> (amount, variant, approvals)
KINDS = {
    "one_approval": (600_000, "standard", 1),
    "two_approvals": (1_200_000, "standard", 2),
    "prepaid": (600_000, "prepaid_warehouse", 0),
}
APPROVERS = ["victor", "diana"]


def order_mix(n: int) -> list[str]:
    """Half one approval, a quarter two, a quarter prepaid, interleaved."""
    pattern = ["one_approval", "two_approvals", "one_approval", "prepaid"]
    return [pattern[i % 4] for i in range(n)]


@dataclass
class Latencies:
    decisions: list[float] = field(default_factory=list)  # decision that opens the next step
    final: list[float] = field(default_factory=list)  # decision that runs the order to close


async def procflow_order(side: Side, order_no: str, kind: str, lat: Latencies) -> None:
    api = side.api
    amount, variant, approvals = KINDS[kind]
    await api.call("POST", "/orders", "alice", json=order_body(order_no, amount, variant))
    wid = side.tree.wid(order_no)
    stage = ""
    for level in range(approvals):
        t0 = time.perf_counter()
        res = await api.call(
            "POST",
            f"/tasks/{wid}.t{level + 1}/decision",
            APPROVERS[level],
            json={"outcome": "approved"},
        )
        (lat.final if level == approvals - 1 else lat.decisions).append(
            (time.perf_counter() - t0) * 1000
        )
        stage = res["stage"]
    if variant != "standard":
        await api.call(
            "POST",
            f"/orders/{order_no}/payments",
            "fiona",
            json={"event_id": f"pay-{order_no}", "amount": str(amount)},
        )
    while stage not in TERMINAL:
        await asyncio.sleep(0.1)
        stage = (await api.call("GET", f"/orders/{order_no}", "alice"))["stage"]
    if stage != "closed":
        raise RuntimeError(f"order {order_no} ended {stage}")


BASELINE_MID_DECISIONS: list[float] = []  # baseline decisions that open the next level


async def baseline_order(client: Client, queue: str, wid: str, kind: str, shape: Shape) -> None:
    handle = await client.start_workflow(BaselineOrderWorkflow.run, shape, id=wid, task_queue=queue)
    await handle.execute_update(BaselineOrderWorkflow.settle)
    approvals = KINDS[kind][2]
    for level in range(approvals):
        t0 = time.perf_counter()
        await handle.execute_update(BaselineOrderWorkflow.decide, Step(n=1))
        if level < approvals - 1:
            BASELINE_MID_DECISIONS.append((time.perf_counter() - t0) * 1000)
    if KINDS[kind][2] == 0:
        await handle.execute_update(BaselineOrderWorkflow.pay, Step(n=1))
    if await handle.result() != "closed":
        raise RuntimeError(f"baseline {wid} did not close")


async def run_baseline(
    client: Client, queue: str, shapes: dict[str, Shape], n: int, phase: str
) -> float:
    run = uuid.uuid4().hex[:6]
    mix = list(enumerate(order_mix(n)))
    t0 = time.perf_counter()
    await gather_limited(
        mix,
        lambda x: baseline_order(client, queue, f"base-{run}-{x[0]}", x[1], shapes[x[1]]),
        USERS,
        phase,
    )
    rate = n / (time.perf_counter() - t0)
    say(phase, f"{n} baseline orders closed: {rate:.2f} orders/s")
    return rate


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(sql), params)).scalar() or 0)


async def outbox_drained(
    engine: AsyncEngine, timeout_s: float = 120, phase: str = "decision"
) -> None:
    """Wait until the worker's mail dispatcher has sent every queued mail."""
    deadline = time.monotonic() + timeout_s
    pending = 0
    while time.monotonic() < deadline:
        pending = await scalar(
            engine, "SELECT count(*) FROM notification_outbox WHERE status = 'pending'"
        )
        if not pending:
            return
        await asyncio.sleep(0.2)
    say(phase, f"outbox still holds {pending} mails after {timeout_s:.0f} s")


# ------------------------------------------------------------------------------ histories
@dataclass
class HistoryShape:
    activities: Counter  # per type; local ones as "type (local)"
    segments: list[list[Batch]]  # activity batches per segment
    timers: int
    updates: Counter


LOCAL_ACTIVITY_MARKER = "core_local_activity"  # the marker the SDK records per local activity


def _local_activity_type(e) -> str:
    data = e.marker_recorded_event_attributes.details["data"].payloads[0].data
    return json.loads(data).get("activity_type", "?")


def _compact(segments: list[list[Batch]]) -> list[list[str]]:
    """ "R2" for two remote activities scheduled together, "L1" for one local activity."""
    return [[f"{'L' if b.local else 'R'}{b.size}" for b in seg] for seg in segments]


async def history_shape(client: Client, wid: str) -> HistoryShape:
    """Activities per kind, per segment (split by decide and pay updates, payment signals)."""
    history = await client.get_workflow_handle(wid).fetch_history()
    acts: Counter = Counter()
    updates: Counter = Counter()
    segments: list[list[Batch]] = [[]]
    batch_of = None  # the workflow task that scheduled the last remote activity
    timers = 0
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = e.activity_task_scheduled_event_attributes
            acts[attrs.activity_type.name] += 1
            last = segments[-1][-1] if segments[-1] else None
            if last and not last.local and attrs.workflow_task_completed_event_id == batch_of:
                last.size += 1
            else:
                segments[-1].append(Batch(size=1))
            batch_of = attrs.workflow_task_completed_event_id
        elif (
            e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
            and e.marker_recorded_event_attributes.marker_name == LOCAL_ACTIVITY_MARKER
        ):
            acts[f"{_local_activity_type(e)} (local)"] += 1
            segments[-1].append(Batch(size=1, local=True))  # procflow awaits each in turn
            batch_of = None
        elif e.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
            timers += 1
        elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            name = e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
            updates[name] += 1
            if name in ("decide", "pay"):  # a decision, or a payment reported by update
                segments.append([])
        elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            updates["signal:" + e.workflow_execution_signaled_event_attributes.signal_name] += 1
            segments.append([])
    return HistoryShape(acts, segments, timers, updates)


# ------------------------------------------------------------------------------ one side
@dataclass
class Side:
    """One tree's stack, up for its phases."""

    tree: Tree
    tmp: Path
    server: Proc
    address: str
    worker: Proc
    base_worker: Proc
    api_proc: Proc
    base_cmd: list[str]
    client: Client
    engine: AsyncEngine
    api: Api
    procs: list[Proc]

    @property
    def pids(self) -> dict[str, int]:
        return {
            "temporal": self.server.popen.pid,
            "worker": self.worker.popen.pid,
            "baseline_worker": self.base_worker.popen.pid,
            "api": self.api_proc.popen.pid,
            "bench_process": os.getpid(),  # the simulated users and the mail sink
        }


async def _api_ready(http: httpx.AsyncClient, proc: Proc, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.check()
        try:
            if (await http.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise StackError(f"the API is not up after {timeout_s:.0f} s")
        await asyncio.sleep(0.3)


@asynccontextmanager
async def side_stack(
    tree: Tree, tmp: Path, *, label: str | None = None, extra_env: dict[str, str] | None = None
) -> AsyncIterator[Side]:
    """The stack of one tree: server, records DB (its migrations and seeds), sink, its worker
    and API (uvicorn), the baseline worker; stopped on the way out. Its processes' logs go to
    `tmp/<label>` (default the tree's label); `extra_env` is given to the worker and the API
    last (phase 8: metrics and tracing off or on)."""
    label = label or tree.label
    tmp = tmp / label
    tmp.mkdir()
    procs: list[Proc] = []
    sink: MailSink | None = None
    engine: AsyncEngine | None = None
    try:
        server, address = await start_server("temporal", tmp, tuned=True)
        procs.append(server)
        say("setup", f"{label}: tuned dev server (WAL pragmas) on {address}, data in {tmp}")
        db_url = f"sqlite+aiosqlite:///{tmp / 'procflow.db'}"
        sink = MailSink(HOST, free_port(), tmp / "mail")
        sink.start()
        api_port = free_port()
        env = {
            **tree.env(),
            "PROCFLOW_TEMPORAL_ADDRESS": address,
            "PROCFLOW_DATABASE_URL": db_url,
            "PROCFLOW_SMTP_HOST": HOST,
            "PROCFLOW_SMTP_PORT": str(sink.port),
            "PROCFLOW_TASK_QUEUE": QUEUE,
            # the API's limits out of the way: the benchmark measures the process
            "PROCFLOW_UPDATE_WAIT_S": "60",
            "PROCFLOW_TEMPORAL_RPC_TIMEOUT_S": "30",
            "PROCFLOW_TEMPORAL_MAX_CONCURRENCY": "256",
            "PROCFLOW_API_RATE_LIMIT_PER_MINUTE": "1000000",
            "PROCFLOW_API_AUTH_RATE_LIMIT_PER_MINUTE": "1000000",
            "PROCFLOW_API_AUTH_ACCOUNT_RATE_LIMIT_PER_MINUTE": "1000000",
            # no PROCFLOW_WORKER_MAX_CACHED_WORKFLOWS: the worker keeps the production default
            # the SDK's metrics on a free port, not the default 9464: another stack on this
            # machine (phase 8's two, a `make run`, a test) may hold that one
            "PROCFLOW_WORKER_METRICS_ADDRESS": f"{HOST}:{free_port()}",
            # and its health endpoint (9465 by default) for the same reason
            "PROCFLOW_WORKER_HEALTH_ADDRESS": f"{HOST}:{free_port()}",
        }
        if has_coded_complaint(tree):  # phase 7's coded side, registered by worker and API
            env["PROCFLOW_PROCESS_MODULES"] = CODED_COMPLAINT
        env.update(extra_env or {})
        py = sys.executable
        run_once("migrate", [py, "-m", "scripts.migrate"], tmp, env, tree.root)
        run_once("seed", [py, "-m", "scripts.seed"], tmp, env, tree.root)
        engine = make_engine(db_url)
        worker = spawn("worker", [py, "worker.py"], tmp, env, tree.root)
        procs.append(worker)
        api_cmd = [py, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", HOST]
        api_cmd += ["--port", str(api_port), "--no-proxy-headers", "--no-access-log"]
        api_proc = spawn("api", api_cmd, tmp, env, tree.root)
        procs.append(api_proc)
        base_cmd = [py, "-m", "bench.baseline", "--address", address]
        base_worker = spawn("baseline", [*base_cmd, "--task-queue", "baseline-bench"], tmp)
        procs.append(base_worker)
        client = await Client.connect(address, data_converter=pydantic_data_converter)
        limits = httpx.Limits(max_connections=4 * USERS, max_keepalive_connections=4 * USERS)
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{api_port}", timeout=120, limits=limits
        ) as http:
            await _api_ready(http, api_proc)
            api = Api(http)
            for user in ("alice", "victor", "diana", "fiona"):
                await api.headers(user)
            say("setup", f"{label}: records DB, sink, worker.py, API (uvicorn), baseline up")
            yield Side(
                tree=tree,
                tmp=tmp,
                server=server,
                address=address,
                worker=worker,
                base_worker=base_worker,
                api_proc=api_proc,
                base_cmd=base_cmd,
                client=client,
                engine=engine,
                api=api,
                procs=procs,
            )
        for p in procs:
            p.check()
    finally:
        for p in reversed(procs):
            p.stop()
        if sink is not None:
            sink.stop()
        if engine is not None:
            await engine.dispose()


# ------------------------------------------------------------------------------ the run
async def bench(
    sizes: Sizes,
    quick: bool,
    trees: list[Tree],
    profile: Path | None = None,
    phases: frozenset[str] = frozenset(PHASES),
) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # stop cleanly
    results: dict[str, Any] = {"mode": "quick" if quick else "full", "sizes": sizes.__dict__}
    results["phases"] = [p for p in PHASES if p in phases]
    results["machine"] = machine()
    results["sides"] = {}
    say("setup", f"machine: {results['machine']}")
    tmp = Path(tempfile.mkdtemp(prefix="procflow-bench-"))
    ok = False  # on failure the directory stays, with every process's log
    try:
        for i, tree in enumerate(trees):
            say("setup", f"side {tree.label}: {tree.root} at {tree.commit[:10]} ({tree.subject})")
            side_results: dict[str, Any] = {"tree": tree.info()}
            results["sides"][tree.label] = side_results
            load = LoadMeter()
            load.start()
            if phases & PER_SIDE:
                async with side_stack(tree, tmp) as side:
                    prof = profile / tree.label if profile else None
                    await _measure(side_results, sizes, side, prof, load, phases)
                    # the engine-only phases, once, on the last stack (with phase 1's shapes)
                    if i == len(trees) - 1 and "engine" in phases and "e2e" in phases:
                        shared: dict[str, Any] = {"on_side": tree.label}
                        shapes = side_results["_shapes"]
                        await _wal(shared, sizes, side, shapes, load)
                        if sizes.scale_orders:
                            await _scale_out(shared, sizes, side, shapes, load)
                        results["engine_only"] = shared
            # 8. metrics and tracing off against on: two more stacks of the last tree, once
            # the tree's own stack is down (so its idle processes do not share the cores)
            if i == len(trees) - 1 and "observe" in phases:
                results["observe"] = await _observe(sizes, tree, tmp, load)
            side_results["load"] = load.stop()
            side_results.pop("_shapes", None)
            say("setup", f"side {tree.label} done; load {side_results['load']}")
        ok = True
    finally:
        if not ok:
            say("error", f"the logs of every process are in {tmp}")
    shutil.rmtree(tmp, ignore_errors=True)
    return results


async def _measure(
    results: dict[str, Any],
    sizes: Sizes,
    side: Side,
    profile: Path | None,
    load: LoadMeter,
    phases: frozenset[str] = frozenset(PHASES),
) -> None:
    run = uuid.uuid4().hex[:6]
    api, client, tree = side.api, side.client, side.tree
    pids = side.pids
    load.track(pids)
    base_queue = "baseline-bench"
    # ------------------------------------------------------------------ 1. end to end
    if "e2e" in phases:
        say("e2e", "warm-up: one order of each kind through the API")
        lat = Latencies()
        for kind in KINDS:
            await procflow_order(side, f"W{run}-{kind}", kind, lat)
        shapes = {kind: await history_shape(client, tree.wid(f"W{run}-{kind}")) for kind in KINDS}
        results["procflow_history"] = {
            k: {
                "activities": dict(s.activities),
                "activities_total": sum(s.activities.values()),
                "segments": _compact(s.segments),
                "timers": s.timers,
                "updates_and_signals": dict(s.updates),
            }
            for k, s in shapes.items()
        }
        for k, s in shapes.items():
            say("e2e", f"{k}: {sum(s.activities.values())} activities {dict(s.activities)}")
            segments = _compact(s.segments)
            say("e2e", f"{k}: segments {segments}, {s.timers} timers, {dict(s.updates)}")
        base_shapes = {k: Shape(segments=s.segments) for k, s in shapes.items()}
        results["_shapes"] = base_shapes
        await run_baseline(client, base_queue, base_shapes, 3, "baseline")  # warm-up

        lat = Latencies()
        mix = list(enumerate(order_mix(sizes.orders)))
        say("e2e", f"{sizes.orders} orders through the API (HTTP) by {USERS} concurrent users")
        meter = CpuMeter({k: pids[k] for k in ("temporal", "worker", "api", "bench_process")})
        profiler = Profiler(profile) if profile else None
        if profiler:
            profiler.start("worker", pids["worker"])
            profiler.start("api", pids["api"])
        meter.start()
        t0 = time.perf_counter()
        await gather_limited(
            mix, lambda x: procflow_order(side, f"E{run}-{x[0]}", x[1], lat), USERS, "e2e"
        )
        e2e = sizes.orders / (time.perf_counter() - t0)
        cpu_e2e = meter.stop()
        if profiler:
            results["profile"] = profiler.stop()
            say("e2e", f"py-spy samples of the e2e phase in {profile}")
        say("e2e", f"{sizes.orders} orders closed: {e2e:.2f} orders/s")
        say("baseline", f"{sizes.orders} raw-SDK orders of the same shape, same server")
        BASELINE_MID_DECISIONS.clear()
        meter = CpuMeter({k: pids[k] for k in ("temporal", "baseline_worker", "bench_process")})
        meter.start()
        base = await run_baseline(client, base_queue, base_shapes, sizes.orders, "baseline")
        cpu_base = meter.stop()
        per_order = lambda cpu: {k: round(1000 * v / sizes.orders, 1) for k, v in cpu.items()}  # noqa: E731
        results["cpu_ms_per_order"] = {
            "procflow": per_order(cpu_e2e),
            "baseline": per_order(cpu_base),
        }
        say("e2e", f"CPU ms per order: {results['cpu_ms_per_order']}")
        results.update(
            e2e_orders_per_s=e2e,
            baseline_orders_per_s=base,
            e2e_ratio=e2e / base,
            e2e_final_decision_p50_ms=pct(lat.final, 50),
            e2e_mid_decision_p50_ms=pct(lat.decisions, 50),
            baseline_mid_decision_p50_ms=pct(BASELINE_MID_DECISIONS, 50),
        )

    # ------------------------------------------------------------------ 2. decision latency
    if "decision" in phases:
        n = sizes.decisions
        say("decision", f"opening {2 * n} two-approval orders (1,200,000) through the API")
        nos = [f"D{run}-{i}" for i in range(2 * n)]
        await gather_limited(
            nos,
            lambda no: api.call("POST", "/orders", "alice", json=order_body(no, 1_200_000)),
            USERS,
            "decision",
        )
        await outbox_drained(side.engine)  # their mails are out: the decisions meet a quiet system
        victor = {"username": "victor", "roles": ["vice-president"]}

        async def decide(item: tuple[int, str]) -> float:
            i, no = item
            wid = tree.wid(no)
            t0 = time.perf_counter()
            if i % 2 == 0:  # through the API
                res = await api.call(
                    "POST", f"/tasks/{wid}.t1/decision", "victor", json={"outcome": "approved"}
                )
            else:  # the same update straight to the workflow: the API's share is the difference
                res = await client.get_workflow_handle(wid).execute_update(
                    "decide",
                    {"task_id": f"{wid}.t1", "outcome": "approved", "actor": victor},
                    result_type=dict,
                )
            assert res["stage"] == "approval", res["stage"]  # the sales director's level is open
            return (time.perf_counter() - t0) * 1000

        say("decision", f"{n} decisions through the API and {n} direct, {USERS} concurrent")
        both = await gather_limited(list(enumerate(nos)), decide, USERS, "decision")
        decisions, direct = both[0::2], both[1::2]
        results["decision_direct_p50_ms"] = pct(direct, 50)
        say("decision", f"raw execute_update: {sizes.raw_updates} round trips, {USERS} concurrent")
        handles = [
            await client.start_workflow(
                TrivialWorkflow.run, id=f"trivial-{run}-{i}", task_queue=base_queue
            )
            for i in range(USERS)
        ]
        for h in handles:  # warm-up
            await h.execute_update(TrivialWorkflow.ping, Step(n=0))

        async def ping(i: int) -> float:
            t0 = time.perf_counter()
            await handles[i % USERS].execute_update(TrivialWorkflow.ping, Step(n=i))
            return (time.perf_counter() - t0) * 1000

        raw = await gather_limited(range(sizes.raw_updates), ping, USERS, "decision")
        for h in handles:
            await h.signal(TrivialWorkflow.finish)
        results.update(
            decision_p50_ms=pct(decisions, 50),
            decision_p99_ms=pct(decisions, 99),
            raw_update_p50_ms=pct(raw, 50),
            raw_update_p99_ms=pct(raw, 99),
        )
        results["decision_p50_ratio"] = results["decision_p50_ms"] / results["raw_update_p50_ms"]
        say(
            "decision",
            f"decision p50 {results['decision_p50_ms']:.0f} ms, p99 "
            f"{results['decision_p99_ms']:.0f} ms; "
            f"raw update p50 {results['raw_update_p50_ms']:.1f} ms; "
            f"the decide update without the API p50 {results['decision_direct_p50_ms']:.0f} ms",
        )

    if "memory" in phases:
        await _memory(results, sizes, side, run)
    if "inbox" in phases:
        await _inbox(results, sizes, side, run)
    if "blueprint" in phases:
        await _blueprint(results, sizes, side, run, profile / "blueprint" if profile else None)


class Stalled(Exception):
    """Phase 5 made no progress for STALL_S seconds."""


async def _memory(results: dict[str, Any], sizes: Sizes, side: Side, run: str) -> None:
    """5. Worker RSS with M sales orders waiting on their approval, the cache at its default."""
    client, tree = side.client, side.tree
    prefix = f"M{run}-"

    async def start(key: str) -> None:
        body = {**order_body(key, 600_000), "requester": "bob"}
        await client.start_workflow(tree.workflow, body, id=tree.wid(key), task_queue=QUEUE)

    results.update(
        await _waiting(
            side, sizes.waiting, prefix, start, "memory", "orders of 600,000 with the client"
        )
    )


async def _waiting(
    side: Side,
    m: int,
    prefix: str,
    start: Callable[[str], Awaitable[None]],
    phase: str,
    what: str,
) -> dict[str, Any]:
    """M instances started by `start(<prefix><i>)` (the business key), until each waits on an
    open task in the read model; the worker's RSS before, at its peak while they started and
    with all of them waiting (the cache at its default)."""
    worker, tree = side.worker, side.tree
    worker.check()
    rss_before = rss_mb(worker.popen.pid)
    say(
        phase,
        f"worker RSS {rss_before:.0f} MB (cache: {tree.cache_default} instances, the "
        f"default); starting {m} {what}, {STARTERS} at once",
    )

    async def waiting_now() -> int:
        return await scalar(
            side.engine,
            "SELECT count(*) FROM tasks WHERE status = 'open' AND business_key LIKE :p",
            p=f"{prefix}%",
        )

    waiting = 0
    progress = time.monotonic()  # when `waiting` last grew
    peak = rss_before
    stop = asyncio.Event()
    figures: dict[str, Any] = {}

    async def watch() -> None:  # the read model's count of waiting instances, and peak RSS
        nonlocal waiting, peak, progress
        while not stop.is_set():
            now = await waiting_now()
            if now > waiting:
                waiting, progress = now, time.monotonic()
            peak = max(peak, rss_mb(worker.popen.pid))
            await asyncio.sleep(0.5)

    def stalled() -> None:
        worker.check()
        if time.monotonic() - progress > STALL_S:
            raise Stalled(f"{waiting} of {m} waiting, none more for {STALL_S} s")

    async def bounded(i: int) -> None:
        # Bounded: at most WINDOW started instances not yet waiting. With 300 at once the
        # kernel's local `project` activities queue for SQLite's writer past their timeout,
        # are retried, exhaust the connection pool, and no instance gets through.
        while i - waiting >= WINDOW:
            stalled()
            await asyncio.sleep(0.1)
        await start(f"{prefix}{i}")

    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    started_s = float("nan")
    try:
        await gather_limited(range(m), bounded, STARTERS, phase)
        started_s = time.perf_counter() - t0
        say(phase, f"{m} started in {started_s:.0f} s; {waiting} waiting so far")
        while waiting < m:
            stalled()
            await asyncio.sleep(0.5)
    except Stalled as err:  # recorded, and the run goes on with the other phases
        figures["waiting_stalled"] = str(err)
        say(phase, f"STALLED: {err}; the worker's log says why")
    finally:
        stop.set()
        await watcher
    all_waiting_s = time.perf_counter() - t0
    await asyncio.sleep(2)
    rss_after = rss_mb(worker.popen.pid)
    figures.update(
        worker_rss_idle_mb=rss_before,
        worker_rss_mb=rss_after,
        worker_rss_peak_mb=max(peak, rss_after),
        worker_rss_kb_per_instance=(rss_after - rss_before) * 1024 / max(1, waiting),
        waiting_instances=waiting,
        waiting_started_s=started_s,
        waiting_all_s=all_waiting_s,
        waiting_start_per_s=waiting / all_waiting_s,
        worker_max_cached_workflows=tree.cache_default,
        # the cache holds the most recently used instances, up to its bound
        worker_cached_instances=min(tree.cache_default, waiting),
    )
    say(
        phase,
        f"worker RSS {rss_after:.0f} MB (peak {figures['worker_rss_peak_mb']:.0f}) with "
        f"{waiting} waiting, at most {figures['worker_cached_instances']} of them cached; all "
        f"waiting after {all_waiting_s:.0f} s ({figures['waiting_start_per_s']:.1f}/s)",
    )
    return figures


async def _bulk_tasks(engine: AsyncEngine, run: str, k: int) -> float:
    """K open vice-president tasks straight into the read model (executemany in chunks)."""
    async with engine.connect() as conn:
        md = MetaData()
        tasks, candidates = await conn.run_sync(
            lambda c: (
                Table("tasks", md, autoload_with=c),
                Table("task_candidates", md, autoload_with=c),
            )
        )
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    for lo in range(0, k, INSERT_CHUNK):
        rows = [
            {
                "task_id": f"bench-{run}-{i}.t1",
                "workflow_id": f"bench-{run}-{i}",
                "process_type": "sales_order",
                "business_key": f"X{run}-{i}",
                "name": "vice-president approval",
                "kind": "approval",
                "candidate_roles": ["vice-president"],
                "assignee": None,
                "requester": "bob",
                "outcomes": ["approved", "rejected"],
                "status": "open",
                "escalated": False,
                "created_at": now - timedelta(seconds=i),
                "revision": 1,
            }
            for i in range(lo, min(k, lo + INSERT_CHUNK))
        ]
        rows = [{c: v for c, v in r.items() if c in tasks.c} for r in rows]
        for attempt in range(6):  # the worker's writers may hold SQLite's lock past its timeout
            try:
                async with engine.begin() as conn:
                    await conn.execute(insert(tasks), rows)
                    await conn.execute(
                        insert(candidates),
                        [{"task_id": r["task_id"], "role": "vice-president"} for r in rows],
                    )
                break
            except OperationalError as err:
                if "locked" not in str(err) or attempt == 5:
                    raise
                say("inbox", f"chunk at {lo}: database locked, again in {2**attempt} s")
                await asyncio.sleep(2**attempt)
    # no ANALYZE: procflow never runs it, so its SQLite plans are made without statistics
    return time.perf_counter() - t0


async def _inbox(results: dict[str, Any], sizes: Sizes, side: Side, run: str) -> None:
    """3. GET /tasks with K synthetic open tasks plus the waiting ones of phase 5."""
    api, k = side.api, sizes.inbox_tasks
    await outbox_drained(side.engine, 120)  # phase 5's mails out, as far as they go
    say("inbox", f"inserting {k} open vice-president tasks into the read model")
    insert_s = await _bulk_tasks(side.engine, run, k)
    page = await api.call("GET", "/tasks", "victor", params={"limit": 50})
    total = page["total"]
    say("inbox", f"inserted in {insert_s:.1f} s; victor's inbox holds {total} open tasks")
    results.update(inbox_insert_s=insert_s, inbox_open_tasks=total)

    async def measure(key: str, label: str, user: str, params: dict[str, Any]) -> None:
        async def one(_: int) -> float:
            t0 = time.perf_counter()
            await api.call("GET", "/tasks", user, params=params)
            return (time.perf_counter() - t0) * 1000

        await one(0)  # warm-up
        lat = await gather_limited(range(sizes.inbox_requests), one, 1, "inbox")
        results[f"{key}_p50_ms"], results[f"{key}_p95_ms"] = pct(lat, 50), pct(lat, 95)
        say("inbox", f"{label}: p50 {pct(lat, 50):.1f} ms, p95 {pct(lat, 95):.1f} ms")

    # the first page as every client asks for it, with its exact total
    await measure("inbox", "GET /tasks?limit=50 (with total)", "victor", {"limit": 50})
    # the same page without the count, where the tree knows `count=false`
    no_count = await api.call("GET", "/tasks", "victor", params={"limit": 1, "count": "false"})
    results["inbox_count_optional"] = no_count["total"] is None
    if results["inbox_count_optional"]:
        await measure(
            "inbox_nocount", "first page, count=false", "victor", {"limit": 50, "count": "false"}
        )
    # a page deep in the list: by offset, and by keyset where the tree has `after`
    mid = total // 2
    await measure("inbox_offset", f"offset={mid}", "victor", {"limit": 50, "offset": mid})
    before_mid = await api.call("GET", "/tasks", "victor", params={"limit": 1, "offset": mid - 1})
    cursor = before_mid["items"][0]["task_id"]
    probe = await api.call("GET", "/tasks", "victor", params={"limit": 1, "after": cursor})
    offset_page = await api.call("GET", "/tasks", "victor", params={"limit": 1, "offset": mid})
    results["inbox_keyset"] = probe["items"] == offset_page["items"] and mid > 1
    if results["inbox_keyset"]:
        await measure(
            "inbox_keyset",
            f"after=<the {mid}th task> (keyset)",
            "victor",
            {"limit": 50, "after": cursor, "count": "false"},
        )
    # a role with few tasks among many: diana's sales-director tasks of phase 2
    diana = await api.call("GET", "/tasks", "diana", params={"limit": 50})
    results["inbox_minority_open_tasks"] = diana["total"]
    await measure(
        "inbox_minority", f"diana, {diana['total']} of her role's", "diana", {"limit": 50}
    )


async def _wal(
    results: dict[str, Any], sizes: Sizes, side: Side, shapes: dict[str, Shape], load: LoadMeter
) -> None:
    """4. The baseline workload on a second dev server without the pragmas, next to the tuned."""
    server, address = await start_server("temporal-default", side.tmp, tuned=False)
    side.procs.append(server)
    plain_queue = "baseline-plain"
    plain_worker = spawn(
        "baseline-plain",
        [sys.executable, "-m", "bench.baseline", "--address", address, "--task-queue",
         plain_queue],
        side.tmp,
    )  # fmt: skip
    side.procs.append(plain_worker)
    load.track({"temporal_default": server.popen.pid, "baseline_plain": plain_worker.popen.pid})
    plain = await Client.connect(address, data_converter=pydantic_data_converter)
    say("wal", f"second dev server (SQLite defaults) on {address}")
    await run_baseline(plain, plain_queue, shapes, 3, "wal")  # warm-up
    n = sizes.wal_orders
    rates: dict[str, list[float]] = {"tuned": [], "default": []}
    for _ in range(2):  # alternate, so drift on a noisy machine hits both
        rates["default"].append(await run_baseline(plain, plain_queue, shapes, n, "wal default"))
        rates["tuned"].append(
            await run_baseline(side.client, "baseline-bench", shapes, n, "wal tuned")
        )
    tuned, default = max(rates["tuned"]), max(rates["default"])
    results.update(
        wal_tuned_orders_per_s=tuned,
        wal_default_orders_per_s=default,
        wal_speedup=tuned / default,
    )
    for p in (side.procs.pop(), side.procs.pop()):  # the plain server and its worker
        p.stop()


async def _scale_out(
    results: dict[str, Any], sizes: Sizes, side: Side, shapes: dict[str, Shape], load: LoadMeter
) -> None:
    """6. The baseline workload with one worker process, then two, on the same server."""
    n, queue = sizes.scale_orders, "baseline-bench"
    one = await run_baseline(side.client, queue, shapes, n, "scale 1")
    second = spawn("baseline-2", [*side.base_cmd, "--task-queue", queue], side.tmp)
    side.procs.append(second)
    load.track({"baseline_2": second.popen.pid})
    await asyncio.sleep(2)
    two = await run_baseline(side.client, queue, shapes, n, "scale 2")
    results.update(
        scale_one_worker_orders_per_s=one,
        scale_two_workers_orders_per_s=two,
        scale_out_ratio=two / one,
    )


# ------------------------------------------------------------------------------ 7. blueprints
BLUEPRINT_TYPE = "complaint"  # blueprints/complaint.yaml, published by the API at start-up
CODED_TYPE = "coded_complaint"  # bench/coded_complaint.py, the same shape coded on the kernel
SIDES_7 = {"blueprint": BLUEPRINT_TYPE, "coded": CODED_TYPE}
# the path driven: stan (support) decides the three tasks as each opens, then the feedback
COMPLAINT_PATH: tuple[tuple[int, str, dict[str, str]], ...] = (
    (1, "acknowledged", {}),
    (2, "recorded", {"category": "service", "severity": "low"}),
    (3, "resolved", {"resolution": "Sent a new set of mugs."}),
)
COMPLAINT_FEEDBACK = {"score": 5, "remarks": "Quick and friendly."}
OPEN_TASK = "SELECT count(*) FROM tasks WHERE task_id = :t AND status = 'open'"
IN_STAGE = "SELECT count(*) FROM process_instances WHERE workflow_id = :w AND stage = :s"


def has_coded_complaint(tree: Tree) -> bool:
    """Whether the tree has phase 7's coded side (its worker and API import it)."""
    return (tree.root / "bench" / "coded_complaint.py").is_file()


def complaint_body(ticket_no: str) -> dict[str, str]:
    return {
        "ticket_no": ticket_no,
        "company_name": "Bench Ltd",
        "customer_email": f"{ticket_no.lower()}@bench.example",
        "channel": "web",
        "summary": "The mugs arrived broken; two of six are usable.",
    }


def chain_document(process: str, stages: int, variant: int) -> dict[str, Any]:
    """A blueprint of `stages` task stages in a chain (then an end); `variant` makes the
    content, hence the version, new."""
    chain: dict[str, Any] = {
        f"s{i}": {
            "title": f"Step {i}",
            "do": [
                {
                    "task": f"t{i}",
                    "title": f"Step {i} of chain {variant}",
                    "roles": ["support"],
                    "outcomes": ["done"],
                }
            ],
            "then": f"s{i + 1}" if i < stages else "done",
        }
        for i in range(1, stages + 1)
    }
    chain["done"] = {"end": {"outcome": "done"}}
    return {
        "process": process,
        "dsl": 1,
        "title": f"Bench chain {variant}",
        "description": f"{stages} task stages in a chain, generated by bench.run.",
        "owner_role": "service-manager",
        "business_key": "ticket_no",
        "input": {
            "ticket_no": {"type": "string", "required": True, "pattern": "^[A-Z0-9-]{3,40}$"}
        },
        "start": "s1",
        "stages": chain,
    }


async def until_read_model(
    engine: AsyncEngine, sql: str, what: str, timeout_s: float = 120, **params: Any
) -> None:
    """Poll the read model (never the workflow: a query would cost the worker) until `sql`
    counts a row."""
    deadline = time.monotonic() + timeout_s
    while not await scalar(engine, sql, **params):
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(POLL_S)


async def complaint(side: Side, process: str, ticket_no: str) -> float:
    """One complaint through the API, started by alice: stan decides each task once the read
    model shows it open, the feedback event goes once the instance waits for it; ms from the
    start until the read model has it closed."""
    api, engine = side.api, side.engine
    t0 = time.perf_counter()
    started = await api.call(
        "POST", f"/processes/{process}", "alice", json=complaint_body(ticket_no)
    )
    wid = started["workflow_id"]
    for n, outcome, fields in COMPLAINT_PATH:
        task_id = f"{wid}.t{n}"
        await until_read_model(engine, OPEN_TASK, f"task {task_id} open", t=task_id)
        await api.call(
            "POST",
            f"/tasks/{task_id}/decision",
            "stan",
            json={"outcome": outcome, "fields": fields},
        )
    await until_read_model(engine, IN_STAGE, f"{wid} waits for feedback", w=wid, s="feedback")
    await api.call(
        "POST",
        f"/processes/{process}/{ticket_no}/events/feedback_received",
        "alice",
        json=COMPLAINT_FEEDBACK,
    )
    await until_read_model(engine, IN_STAGE, f"{wid} closed", w=wid, s="closed")
    return (time.perf_counter() - t0) * 1000


async def _complaint_batch(side: Side, kind: str, keys: list[str]) -> dict[str, Any]:
    """The complaints of one side, USERS at once: their end-to-end times, and the CPU each
    process used per complaint, their mails' delivery included (the outbox drained)."""
    pids = side.pids
    meter = CpuMeter({k: pids[k] for k in ("temporal", "worker", "api", "bench_process")})
    meter.start()
    t0 = time.perf_counter()
    lat = await gather_limited(
        keys, lambda key: complaint(side, SIDES_7[kind], key), USERS, "blueprint"
    )
    wall = time.perf_counter() - t0
    await outbox_drained(side.engine, phase="blueprint")  # the worker's dispatcher sends them
    cpu = meter.stop()
    n = len(keys)
    return {
        "instances": n,
        "wall_s": round(wall, 2),
        "e2e_p50_ms": pct(lat, 50),
        "e2e_p95_ms": pct(lat, 95),
        "cpu_ms_per_instance": {k: round(1000 * v / n, 1) for k, v in cpu.items()},
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def _blueprint(
    results: dict[str, Any], sizes: Sizes, side: Side, run: str, profile: Path | None
) -> None:
    """7. The complaint blueprint on the interpreter against the coded complaint, through the
    same API on the same stack, in alternating rounds; then waiting blueprint instances and
    the worker's RSS; then publishing and validating a 50-stage document."""
    api, tag = side.api, run.upper()
    missing = [] if has_coded_complaint(side.tree) else [CODED_COMPLAINT]
    if not missing:  # a tree before blueprints has no /process-types either
        types = {t["name"] for t in await api.call("GET", "/process-types", "alice")}
        missing = sorted(set(SIDES_7.values()) - types)
    if missing:
        why = f"the tree lacks {', '.join(missing)}"
        results["blueprint_skipped"] = why
        say("blueprint", f"skipped: {why}")
        return
    say("blueprint", "warm-up: one complaint on each side")
    shapes: dict[str, Any] = {}
    for kind, process in SIDES_7.items():
        key = f"W{tag}-{kind[0].upper()}"
        await complaint(side, process, key)
        wid = f"{process}-{key}"  # both types' workflow ids: `<type>-<business key>`
        shape = await history_shape(side.client, wid)
        history = await side.client.get_workflow_handle(wid).fetch_history()
        shapes[kind] = {
            "activities": dict(shape.activities),
            "segments": _compact(shape.segments),
            "timers": shape.timers,
            "updates_and_signals": dict(shape.updates),
            "history_events": len(history.events),
        }
        say("blueprint", f"{kind}: {shapes[kind]}")
    results["blueprint_history"] = shapes
    await outbox_drained(side.engine, phase="blueprint")
    per_round = max(1, sizes.complaints // sizes.complaint_rounds)
    say(
        "blueprint",
        f"{sizes.complaint_rounds} rounds of {per_round} complaints per side, {USERS} "
        "concurrent users, alternating which side goes first",
    )
    rounds: list[dict[str, Any]] = []
    for r in range(sizes.complaint_rounds):
        order = ("blueprint", "coded") if r % 2 == 0 else ("coded", "blueprint")
        entry: dict[str, Any] = {"round": r + 1, "order": list(order)}
        for kind in order:
            keys = [f"{kind[0].upper()}{tag}-{r}-{i}" for i in range(per_round)]
            entry[kind] = await _complaint_batch(side, kind, keys)
        bp, coded = entry["blueprint"], entry["coded"]
        bp_cpu, coded_cpu = bp["cpu_ms_per_instance"], coded["cpu_ms_per_instance"]
        entry.update(
            e2e_ratio=bp["e2e_p50_ms"] / coded["e2e_p50_ms"],
            wall_ratio=bp["wall_s"] / coded["wall_s"],
            worker_cpu_ratio=bp_cpu["worker"] / coded_cpu["worker"],
            stack_cpu_ratio=sum(bp_cpu[k] for k in ("temporal", "worker", "api"))
            / sum(coded_cpu[k] for k in ("temporal", "worker", "api")),
        )
        say(
            "blueprint",
            f"round {r + 1}: e2e p50 {bp['e2e_p50_ms']:.0f} / {coded['e2e_p50_ms']:.0f} ms "
            f"({entry['e2e_ratio']:.2f}), worker CPU {bp_cpu['worker']:.0f} / "
            f"{coded_cpu['worker']:.0f} ms per complaint ({entry['worker_cpu_ratio']:.2f})",
        )
        rounds.append(entry)
    e2e = _spread([r["e2e_ratio"] for r in rounds])
    cpu = _spread([r["worker_cpu_ratio"] for r in rounds])
    per_kind = {
        kind: {
            proc: statistics.median(r[kind]["cpu_ms_per_instance"][proc] for r in rounds)
            for proc in rounds[0][kind]["cpu_ms_per_instance"]
        }
        for kind in SIDES_7
    }
    results.update(
        blueprint_complaints=per_round * len(rounds),
        blueprint_rounds=rounds,
        blueprint_e2e_p50_ms=statistics.median(r["blueprint"]["e2e_p50_ms"] for r in rounds),
        coded_e2e_p50_ms=statistics.median(r["coded"]["e2e_p50_ms"] for r in rounds),
        blueprint_overhead_ratio=e2e["median"],
        blueprint_overhead_min=e2e["min"],
        blueprint_overhead_max=e2e["max"],
        blueprint_wall_ratio=statistics.median(r["wall_ratio"] for r in rounds),
        blueprint_cpu_ms_per_instance=per_kind,
        blueprint_worker_cpu_ms=per_kind["blueprint"]["worker"],
        coded_worker_cpu_ms=per_kind["coded"]["worker"],
        blueprint_cpu_ratio=cpu["median"],
        blueprint_cpu_ratio_min=cpu["min"],
        blueprint_cpu_ratio_max=cpu["max"],
        blueprint_stack_cpu_ratio=statistics.median(r["stack_cpu_ratio"] for r in rounds),
    )
    say(
        "blueprint",
        f"blueprint / coded: e2e p50 {e2e['median']:.2f} ({e2e['min']:.2f}-{e2e['max']:.2f}), "
        f"worker CPU {cpu['median']:.2f} ({cpu['min']:.2f}-{cpu['max']:.2f}); CPU ms per "
        f"complaint {per_kind}",
    )
    if profile is not None:  # one more round, sampled by py-spy, not counted in the ratios
        profiles: dict[str, Any] = {}
        for kind in SIDES_7:
            profiler = Profiler(profile)
            profiler.start(f"worker-{kind}", side.pids["worker"])
            keys = [f"P{kind[0].upper()}{tag}-{i}" for i in range(per_round)]
            await _complaint_batch(side, kind, keys)
            profiles[kind] = profiler.stop()[f"worker-{kind}"]
        results["blueprint_profile"] = profiles
        say("blueprint", f"py-spy samples of a round per side in {profile}")

    async def start(key: str) -> None:
        await api.call("POST", f"/processes/{BLUEPRINT_TYPE}", "alice", json=complaint_body(key))

    waiting = await _waiting(
        side,
        sizes.blueprint_waiting,
        f"Q{tag}-",
        start,
        "blueprint",
        "complaint blueprints through the API",
    )
    results.update({f"blueprint_{k}": v for k, v in waiting.items()})
    await _publish(results, side, tag)


async def _publish(results: dict[str, Any], side: Side, tag: str) -> None:
    """7. A generated document of CHAIN_STAGES task stages published by an admin (each time a
    new one, so a new version, checked and diffed against the current), then as many
    validated (the dry run): the time of each request."""
    api, process = side.api, f"bench_chain_{tag.lower()}"
    await api.headers("ada")  # signed in before: a sign-in's password hash is not publishing
    await outbox_drained(side.engine, phase="blueprint")  # the waiting ones' mails: quiet

    async def timed(url: str, document: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        answer = await api.call("POST", url, "ada", json=document)
        return (time.perf_counter() - t0) * 1000, answer

    published: list[float] = []
    for i in range(PUBLISHES):
        ms, answer = await timed(
            f"/definitions/{process}", chain_document(process, CHAIN_STAGES, i)
        )
        if not answer["created"]:
            raise RuntimeError(f"publish {i} of {process} created no version: {answer}")
        published.append(ms)
    validated: list[float] = []
    for i in range(PUBLISHES, 2 * PUBLISHES):
        ms, answer = await timed(
            f"/definitions/{process}/validate", chain_document(process, CHAIN_STAGES, i)
        )
        if not answer["valid"]:
            raise RuntimeError(f"the {CHAIN_STAGES}-stage document is invalid: {answer}")
        validated.append(ms)
    size = len(json.dumps(chain_document(process, CHAIN_STAGES, 0)))
    results.update(
        blueprint_publish_stages=CHAIN_STAGES,
        blueprint_publish_document_bytes=size,
        blueprint_publish_ms=[round(v, 1) for v in published],
        blueprint_publish_p50_ms=statistics.median(published),
        blueprint_publish_max_ms=max(published),
        blueprint_validate_ms=[round(v, 1) for v in validated],
        blueprint_validate_p50_ms=statistics.median(validated),
        blueprint_validate_max_ms=max(validated),
    )
    say(
        "blueprint",
        f"{CHAIN_STAGES}-stage document ({size:,} bytes of JSON): publish p50 "
        f"{results['blueprint_publish_p50_ms']:.0f} ms (max {max(published):.0f}), validate "
        f"p50 {results['blueprint_validate_p50_ms']:.0f} ms (max {max(validated):.0f})",
    )


# ------------------------------------------------------------------------------ 8. observe
OBSERVE_TARGET = "< 10 %"  # issue 14: the overhead of metrics and tracing on the order mix
OBSERVE_TARGET_PCT = 10.0
OBSERVE_SIDES = ("off", "on")
OBSERVE_CPU = ("temporal", "worker", "api", "bench_process")  # procflow's side of the CPU
SCRAPE_S = 5.0  # how often the on side's /metrics are scraped, as Prometheus would
# after a batch: the outbox drained, then this long (the BatchSpanProcessor exports every 5 s)
# before the CPU meter stops, on both sides, so the on side's last exports count as its own
SETTLE_S = 6.0
SPAN_SERVICES = ("procflow-api", "procflow-worker")  # configure_tracing's service names


def observe_env(on: bool, worker_metrics_port: int = 0, sink_port: int = 0) -> dict[str, str]:
    """The worker's and API's environment of phase 8's off or on stack."""
    if not on:
        return {
            "PROCFLOW_METRICS_ENABLED": "false",
            "PROCFLOW_WORKER_METRICS_ADDRESS": "",  # the worker serves no SDK metrics
            "PROCFLOW_TRACING_ENABLED": "false",
        }
    return {
        "PROCFLOW_METRICS_ENABLED": "true",
        "PROCFLOW_WORKER_METRICS_ADDRESS": f"{HOST}:{worker_metrics_port}",
        "PROCFLOW_TRACING_ENABLED": "true",
        "PROCFLOW_OTLP_ENDPOINT": f"http://{HOST}:{sink_port}/v1/traces",
    }


class Scraper:
    """GET every target every SCRAPE_S seconds while started (as Prometheus would): counts
    the scrapes per target; `stop` raises if one was not a 200."""

    def __init__(self, targets: dict[str, str], interval_s: float = SCRAPE_S) -> None:
        self.targets = targets
        self.interval_s = interval_s
        self.counts: Counter[str] = Counter({name: 0 for name in targets})
        self.bytes: dict[str, int] = {}  # the size of each target's last scrape
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Scraper:
        self._http = httpx.AsyncClient(timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._stop.set()
            await self._task
        if self._http is not None:
            await self._http.aclose()

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self.errors:
            raise RuntimeError(f"scrapes failed: {self.errors[:5]}")

    async def _run(self) -> None:
        assert self._http is not None
        while True:
            for name, url in self.targets.items():
                try:
                    r = await self._http.get(url)
                except httpx.HTTPError as err:
                    self.errors.append(f"{name} {url}: {err!r}")
                    continue
                if r.status_code != 200:
                    self.errors.append(f"{name} {url}: {r.status_code} {r.text[:200]}")
                    continue
                self.counts[name] += 1
                self.bytes[name] = len(r.content)
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
                return
            except TimeoutError:
                pass


async def _sink_counts(url: str, timeout_s: float = 0) -> dict[str, Any]:
    """The OTLP sink's counts (GET /counts); with timeout_s, waits that long for it to be up."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            try:
                r = await http.get(url)
                r.raise_for_status()
                return r.json()
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)


async def _observe_batch(
    side: Side, mix: list[str], prefix: str, lat: Latencies, scraper: Scraper | None
) -> dict[str, Any]:
    """One side's orders of a round, USERS at once: their wall-clock time, and the CPU of its
    processes until its outbox is drained and SETTLE_S more (the scraper runs meanwhile)."""
    pids = side.pids
    meter = CpuMeter({k: pids[k] for k in OBSERVE_CPU})
    if scraper is not None:
        scraper.start()
    meter.start()
    t0 = time.perf_counter()
    await gather_limited(
        list(enumerate(mix)),
        lambda x: procflow_order(side, f"{prefix}{x[0]}", x[1], lat),
        USERS,
        "observe",
    )
    wall = time.perf_counter() - t0
    await outbox_drained(side.engine, phase="observe")
    await asyncio.sleep(SETTLE_S)
    cpu = meter.stop()
    if scraper is not None:
        await scraper.stop()
    n = len(mix)
    return {
        "orders": n,
        "wall_s": round(wall, 2),
        "orders_per_s": n / wall,
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_ms_per_order": round(1000 * sum(cpu.values()) / n, 1),
    }


def observe_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Phase 8's figures from its rounds (each with an "off" and an "on" batch): orders/s
    over all of a side's orders and driven seconds, CPU ms per order by process, and the
    overheads of the on side, in percent."""
    figures: dict[str, Any] = {"rate": {}, "cpu": {}}
    for side in OBSERVE_SIDES:
        orders = sum(r[side]["orders"] for r in rounds)
        wall = sum(r[side]["wall_s"] for r in rounds)
        procs = rounds[0][side]["cpu_s"]
        per_order = {k: 1000 * sum(r[side]["cpu_s"][k] for r in rounds) / orders for k in procs}
        per_order["total"] = sum(per_order.values())
        figures["rate"][side] = orders / wall
        figures["cpu"][side] = {k: round(v, 1) for k, v in per_order.items()}
    off, on = figures["rate"]["off"], figures["rate"]["on"]
    cpu_off, cpu_on = figures["cpu"]["off"]["total"], figures["cpu"]["on"]["total"]
    per_round = [100 * (1 - r["on"]["orders_per_s"] / r["off"]["orders_per_s"]) for r in rounds]
    return {
        "off_orders_per_s": off,
        "on_orders_per_s": on,
        "overhead_pct": 100 * (1 - on / off),
        "cpu_ms_per_order": figures["cpu"],
        "cpu_overhead_pct": 100 * (cpu_on / cpu_off - 1),
        "round_overhead_pct": [round(v, 1) for v in per_round],
        "round_overhead_min_pct": min(per_round),
        "round_overhead_max_pct": max(per_round),
    }


async def _observe(sizes: Sizes, tree: Tree, tmp: Path, load: LoadMeter) -> dict[str, Any]:
    """8. The overhead of metrics and tracing: two stacks of the tree up at once, one with
    both off, one with the API's /metrics, the worker's SDK metrics and tracing on (spans to
    an OTLP sink, a subprocess; both /metrics scraped every SCRAPE_S s), driven with the
    phase-1 order mix in interleaved rounds, alternating which side goes first."""
    run = uuid.uuid4().hex[:6]
    per_round = max(1, sizes.observe_orders // sizes.observe_rounds)
    sink_dir = tmp / "observe-sink"
    sink_dir.mkdir()
    sink_port, worker_metrics_port = free_port(), free_port()
    sink_cmd = [sys.executable, "-m", "scripts.otlp_sink", "--host", HOST, "--port", str(sink_port)]
    sink = spawn("otlp-sink", [*sink_cmd, "--out", str(sink_dir / "counts.json")], sink_dir)
    counts_url = f"http://{HOST}:{sink_port}/counts"
    envs = {
        "off": observe_env(False),
        "on": observe_env(True, worker_metrics_port, sink_port),
    }
    results: dict[str, Any] = {
        "on_side": tree.label,
        "target": OBSERVE_TARGET,
        "orders_per_side": per_round * sizes.observe_rounds,
        "rounds_count": sizes.observe_rounds,
        "env": envs,
    }
    try:
        await _sink_counts(counts_url, timeout_s=30)
        sink.check()
        say("observe", f"OTLP sink on {HOST}:{sink_port}; starting the off and the on stacks")
        load.track({"bench_process": os.getpid(), "otlp_sink": sink.popen.pid})
        async with AsyncExitStack() as stack:
            sides: dict[str, Side] = {}
            for name in OBSERVE_SIDES:
                side = await stack.enter_async_context(
                    side_stack(tree, tmp, label=f"observe-{name}", extra_env=envs[name])
                )
                sides[name] = side
                load.track({f"observe_{name}_{k}": v for k, v in side.pids.items()})
            targets = {
                "api": str(sides["on"].api.http.base_url.join("/metrics")),
                "worker": f"http://{HOST}:{worker_metrics_port}/metrics",
            }
            scraper = await stack.enter_async_context(Scraper(targets))
            say("observe", "warm-up: one order of each kind on each side")
            for side in sides.values():
                warm = Latencies()
                for kind in KINDS:
                    await procflow_order(side, f"OW{run}-{kind}", kind, warm)
                await outbox_drained(side.engine, phase="observe")
            scraper.start()  # every target answers once before the rounds
            await scraper.stop()
            say(
                "observe",
                f"{sizes.observe_rounds} rounds of {per_round} orders per side, {USERS} "
                f"concurrent users, alternating which side goes first; scraping {targets}",
            )
            lat = {name: Latencies() for name in OBSERVE_SIDES}
            rounds: list[dict[str, Any]] = []
            sink_cpu0 = cpu_s(sink.popen.pid)
            for r in range(sizes.observe_rounds):
                order = OBSERVE_SIDES if r % 2 == 0 else OBSERVE_SIDES[::-1]
                entry: dict[str, Any] = {"round": r + 1, "order": list(order)}
                for name in order:
                    mix = order_mix(per_round)
                    entry[name] = await _observe_batch(
                        sides[name],
                        mix,
                        f"O{name[1].upper()}{run}-{r}-",
                        lat[name],
                        scraper if name == "on" else None,
                    )
                off, on = entry["off"], entry["on"]
                entry["overhead_pct"] = 100 * (1 - on["orders_per_s"] / off["orders_per_s"])
                say(
                    "observe",
                    f"round {r + 1} ({order[0]} first): off {off['orders_per_s']:.2f} / on "
                    f"{on['orders_per_s']:.2f} orders/s ({entry['overhead_pct']:+.1f} %), CPU "
                    f"{off['cpu_ms_per_order']:.0f} / {on['cpu_ms_per_order']:.0f} ms per order",
                )
                rounds.append(entry)
            sink_cpu = cpu_s(sink.popen.pid) - sink_cpu0
            for p in [sink, *(p for side in sides.values() for p in side.procs)]:
                p.check()
            spans_in_rounds = (await _sink_counts(counts_url))["total"]
        # the stacks are down (their span processors flushed what they held): the final count
        spans = await _sink_counts(counts_url)
    finally:
        sink.stop()
    summary = observe_summary(rounds)
    on_orders = sum(r["on"]["orders"] for r in rounds)
    results.update(summary)
    results.update(
        rounds=rounds,
        decision_p50_ms={name: pct(lat[name].decisions, 50) for name in OBSERVE_SIDES},
        final_decision_p50_ms={name: pct(lat[name].final, 50) for name in OBSERVE_SIDES},
        spans={
            "total": spans["total"],
            "by_service": spans["by_service"],
            "by_name": spans["by_name"],
            "export_requests": spans["requests"],
            "export_bytes": spans["bytes"],
            "rejected": spans["rejected"],
            "by_end_of_rounds": spans_in_rounds,
        },
        scrapes=dict(scraper.counts),
        scrape_bytes=scraper.bytes,
        # the collector's CPU, not procflow's: not in cpu_ms_per_order["on"]
        sink_cpu_ms_per_on_order=round(1000 * sink_cpu / on_orders, 1),
        met=summary["overhead_pct"] < OBSERVE_TARGET_PCT,
    )
    say(
        "observe",
        f"off {summary['off_orders_per_s']:.2f} / on {summary['on_orders_per_s']:.2f} orders/s: "
        f"overhead {summary['overhead_pct']:+.1f} % (rounds "
        f"{summary['round_overhead_min_pct']:+.1f} to {summary['round_overhead_max_pct']:+.1f} "
        f"%), CPU {summary['cpu_ms_per_order']['off']['total']:.0f} / "
        f"{summary['cpu_ms_per_order']['on']['total']:.0f} ms per order "
        f"({summary['cpu_overhead_pct']:+.1f} %), target {OBSERVE_TARGET}; decision p50 "
        f"{results['decision_p50_ms']['off']:.0f} / {results['decision_p50_ms']['on']:.0f} ms; "
        f"{spans['total']} spans {spans['by_service']}, sink CPU "
        f"{results['sink_cpu_ms_per_on_order']:.1f} ms per on order; scrapes "
        f"{dict(scraper.counts)}",
    )
    missing = [s for s in SPAN_SERVICES if not spans["by_service"].get(s)]
    if not spans["total"] or missing:
        raise RuntimeError(
            f"observe: no spans from {', '.join(missing) or 'anyone'} reached the OTLP sink "
            f"({spans}); the on stack's logs are in {tmp / 'observe-on'}"
        )
    return results


# ------------------------------------------------------------------------------ report
# label, key, unit, target (with "<=" or ">=")
ROWS: list[tuple[str, str, str, str]] = [
    ("1 end to end (procflow, HTTP API)", "e2e_orders_per_s", "orders/s", ""),
    ("1 baseline (raw SDK, same shape)", "baseline_orders_per_s", "orders/s", ""),
    ("1 ratio procflow / baseline", "e2e_ratio", "x", ">= 0.8"),
    ("2 decision p50 (POST -> response)", "decision_p50_ms", "ms", ""),
    ("2 decision p99", "decision_p99_ms", "ms", ""),
    ("2 raw execute_update p50", "raw_update_p50_ms", "ms", ""),
    ("2 raw execute_update p99", "raw_update_p99_ms", "ms", ""),
    ("2 ratio decision / raw update p50", "decision_p50_ratio", "x", "<= 2"),
    ("2 decide update without the API p50", "decision_direct_p50_ms", "ms", ""),
    ("1 mid-chain decision p50, procflow", "e2e_mid_decision_p50_ms", "ms", ""),
    ("1 mid-chain decision p50, baseline", "baseline_mid_decision_p50_ms", "ms", ""),
    ("1 final decision p50 (runs to close)", "e2e_final_decision_p50_ms", "ms", ""),
    ("3 open tasks in victor's inbox", "inbox_open_tasks", "", ""),
    ("3 inbox first page p50 (with total)", "inbox_p50_ms", "ms", ""),
    ("3 inbox first page p95 (with total)", "inbox_p95_ms", "ms", "<= 50"),
    ("3 inbox first page p95, count=false", "inbox_nocount_p95_ms", "ms", "<= 50"),
    ("3 inbox page at offset K/2 p95", "inbox_offset_p95_ms", "ms", ""),
    ("3 inbox same page by keyset p95", "inbox_keyset_p95_ms", "ms", ""),
    ("3 inbox, a role with few tasks p95", "inbox_minority_p95_ms", "ms", ""),
    ("5 waiting instances", "waiting_instances", "", ""),
    ("5 worker cache bound (default)", "worker_max_cached_workflows", "", ""),
    ("5 started with the client in", "waiting_started_s", "s", ""),
    ("5 all waiting on approval after", "waiting_all_s", "s", ""),
    ("5 worker RSS idle (after phases 1-2)", "worker_rss_idle_mb", "MB", ""),
    ("5 worker RSS with them waiting", "worker_rss_mb", "MB", "<= 400"),
    ("5 worker RSS peak during the starts", "worker_rss_peak_mb", "MB", ""),
    ("7 complaint e2e p50, blueprint", "blueprint_e2e_p50_ms", "ms", ""),
    ("7 complaint e2e p50, coded", "coded_e2e_p50_ms", "ms", ""),
    ("7 ratio blueprint / coded e2e (median)", "blueprint_overhead_ratio", "x", "<= 1.10"),
    ("7   lowest round", "blueprint_overhead_min", "x", ""),
    ("7   highest round", "blueprint_overhead_max", "x", ""),
    ("7 worker CPU ms per complaint, blueprint", "blueprint_worker_cpu_ms", "ms", ""),
    ("7 worker CPU ms per complaint, coded", "coded_worker_cpu_ms", "ms", ""),
    ("7 ratio blueprint / coded worker CPU", "blueprint_cpu_ratio", "x", "<= 1.10"),
    ("7   lowest round", "blueprint_cpu_ratio_min", "x", ""),
    ("7   highest round", "blueprint_cpu_ratio_max", "x", ""),
    ("7 ratio server+worker+API CPU", "blueprint_stack_cpu_ratio", "x", ""),
    ("7 waiting blueprint complaints", "blueprint_waiting_instances", "", ""),
    ("7 all waiting on their first task after", "blueprint_waiting_all_s", "s", ""),
    ("7 worker RSS before them", "blueprint_worker_rss_idle_mb", "MB", ""),
    ("7 worker RSS with them waiting", "blueprint_worker_rss_mb", "MB", "<= 400"),
    ("7 worker RSS peak during the starts", "blueprint_worker_rss_peak_mb", "MB", ""),
    ("7 publish a 50-stage document p50", "blueprint_publish_p50_ms", "ms", "< 1000"),
    ("7 publish, slowest of 5", "blueprint_publish_max_ms", "ms", "< 1000"),
    ("7 validate a 50-stage document p50", "blueprint_validate_p50_ms", "ms", "< 1000"),
]
ENGINE_ROWS = [
    ("4 baseline on WAL pragmas", "wal_tuned_orders_per_s", "orders/s"),
    ("4 baseline on SQLite defaults", "wal_default_orders_per_s", "orders/s"),
    ("4 wal_speedup", "wal_speedup", "x"),
    ("6 baseline, 1 worker process", "scale_one_worker_orders_per_s", "orders/s"),
    ("6 baseline, 2 worker processes", "scale_two_workers_orders_per_s", "orders/s"),
    ("6 ratio 2 / 1 workers", "scale_out_ratio", "x"),
]
# phase 8: label, a function of results["observe"], unit, target
OBSERVE_ROWS: list[tuple[str, Callable[[dict[str, Any]], Any], str, str]] = [
    ("8 orders/s, metrics + tracing off", lambda o: o["off_orders_per_s"], "orders/s", ""),
    ("8 orders/s, metrics + tracing on", lambda o: o["on_orders_per_s"], "orders/s", ""),
    ("8 overhead in orders/s", lambda o: o["overhead_pct"], "%", OBSERVE_TARGET),
    ("8   lowest round", lambda o: o["round_overhead_min_pct"], "%", ""),
    ("8   highest round", lambda o: o["round_overhead_max_pct"], "%", ""),
    ("8 CPU ms per order, off", lambda o: o["cpu_ms_per_order"]["off"]["total"], "ms", ""),
    ("8 CPU ms per order, on", lambda o: o["cpu_ms_per_order"]["on"]["total"], "ms", ""),
    ("8 overhead in CPU per order", lambda o: o["cpu_overhead_pct"], "%", ""),
    ("8 worker CPU ms per order, off", lambda o: o["cpu_ms_per_order"]["off"]["worker"], "ms", ""),
    ("8 worker CPU ms per order, on", lambda o: o["cpu_ms_per_order"]["on"]["worker"], "ms", ""),
    ("8 API CPU ms per order, off", lambda o: o["cpu_ms_per_order"]["off"]["api"], "ms", ""),
    ("8 API CPU ms per order, on", lambda o: o["cpu_ms_per_order"]["on"]["api"], "ms", ""),
    ("8 mid decision p50, off", lambda o: o["decision_p50_ms"]["off"], "ms", ""),
    ("8 mid decision p50, on", lambda o: o["decision_p50_ms"]["on"], "ms", ""),
    ("8 spans received by the sink", lambda o: o["spans"]["total"], "", ""),
    ("8 sink CPU per on order (not counted)", lambda o: o["sink_cpu_ms_per_on_order"], "ms", ""),
    ("8 scrapes of the API's /metrics", lambda o: o["scrapes"].get("api"), "", ""),
    ("8 scrapes of the worker's /metrics", lambda o: o["scrapes"].get("worker"), "", ""),
]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def table(results: dict[str, Any]) -> str:
    sides = results["sides"]
    labels = list(sides)
    head = f"{'figure':<40} " + " ".join(f"{lb:>12}" for lb in labels) + "  unit      target"
    lines = [head, "-" * len(head)]
    for label, key, unit, target in ROWS:
        values = [sides[lb].get(key) for lb in labels]
        if all(v is None for v in values):
            continue
        cells = " ".join(f"{_fmt(v):>12}" for v in values)
        lines.append(f"{label:<40} {cells}  {unit:<9} {target}")
    if len(lines) == 2:  # no per-side figure (e.g. --phases observe): no per-side table
        lines.clear()
    else:
        lines.append("-" * len(head))
    for lb in labels:
        t, load = sides[lb]["tree"], sides[lb].get("load", {})
        lines.append(
            f"{lb}: {t['commit'][:10]}{' (dirty)' if t['dirty'] else ''} {t['subject'][:60]}; "
            f"loadavg {load.get('loadavg_mean', '-')} (max {load.get('loadavg_max', '-')}), "
            f"other processes {load.get('others_cores', '-')} cores"
        )
    engine = results.get("engine_only")
    if engine:
        lines.append(f"engine only (baseline workers, on the {engine['on_side']} side's stack):")
        for label, key, unit in ENGINE_ROWS:
            if key in engine:
                lines.append(f"{label:<40} {_fmt(engine[key]):>12}  {unit}")
    observe = results.get("observe")
    if observe:
        lines.append(
            f"observe (two stacks of the {observe['on_side']} tree, "
            f"{observe['orders_per_side']} orders per side in {observe['rounds_count']} rounds):"
        )
        for label, get, unit, target in OBSERVE_ROWS:
            lines.append(f"{label:<40} {_fmt(get(observe)):>12}  {unit:<9} {target}")
        by_service = ", ".join(f"{k} {v:,}" for k, v in observe["spans"]["by_service"].items())
        lines.append(f"  spans by service: {by_service}")
    m = results["machine"]
    lines.append(
        f"{m['cores']} cores, {m['memory_gb']} GB, {m['cpu']}; Python {m['python']}, "
        f"temporalio {m['temporalio']}; {m['server']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about 2 minutes")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument(
        "--tree",
        action="append",
        metavar="LABEL=PATH",
        help=f"a tree to measure (repeatable; default ${TREES_ENV}, else this checkout)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the worker and the API during phase 1; raw samples into DIR/<label>",
    )
    parser.add_argument(
        "--waiting", type=int, metavar="M", help="phase 5's waiting instances instead of the size's"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        metavar="LIST",
        help=f"comma-separated phases to run (default all: {','.join(PHASES)})",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="also write bench/results/<date>-<commit>-<mode>.json, which is committed",
    )
    args = parser.parse_args(argv)
    phases = frozenset(p.strip() for p in args.phases.split(",") if p.strip())
    if not phases or phases - set(PHASES):
        parser.error(f"--phases: choose from {','.join(PHASES)}, not {args.phases!r}")
    specs = args.tree or os.environ.get(TREES_ENV, "").split() or [f"current={ROOT}"]
    trees = [load_tree(label, path) for label, path in parse_trees(specs)]
    sizes = QUICK if args.quick else FULL
    if args.waiting is not None:
        sizes = replace(sizes, waiting=args.waiting)
    t0 = time.perf_counter()
    results = asyncio.run(bench(sizes, args.quick, trees, args.profile, phases))
    last = trees[-1]
    results["measured"] = {"commit": last.commit, "dirty": last.dirty, "side": last.label}
    results["duration_s"] = round(time.perf_counter() - t0, 1)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table(results))
    print(f"\n{results['mode']} run in {results['duration_s']} s; written to {args.out}")
    if args.keep:  # a run to quote: kept (committed) beside the others, named by its commit
        name = f"{results['finished_at'][:10]}-{last.commit[:10]}-{results['mode']}"
        if args.waiting is not None:
            name += f"-waiting{args.waiting}"
        if phases != set(PHASES):
            name += "-" + "-".join(p for p in PHASES if p in phases)
        if len(trees) > 1:
            name += "-vs-" + "-".join(t.commit[:7] for t in trees[:-1])
        kept = RESULTS / f"{name}.json"
        kept.write_text(args.out.read_text())
        print(f"kept as {kept.relative_to(ROOT)}: commit it with the README that quotes it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
