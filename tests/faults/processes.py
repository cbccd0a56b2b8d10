"""The parts of procflow as OS processes that the fault tests start, kill and restart:
the worker (`python worker.py`), the API (uvicorn) and a Temporal dev server of their own."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from temporalio.client import Client

from core.settings import Settings
from core.temporal import connect
from scripts.run_stack import StackConfig, temporal_command
from tests.support import binary, free_port

ROOT = Path(__file__).resolve().parents[2]


async def until(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, every_s: float = 0.1
) -> float:
    """Poll `check` until it holds; returns the seconds it took, fails after timeout_s."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(every_s)
    return time.monotonic() - start


class Proc:
    """One child process, its output appended to a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or handed back."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM, without waiting."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def exited(self, timeout_s: float) -> int:
        """Wait (without blocking the event loop) until the process ended; its exit code."""
        assert self.proc is not None
        proc = self.proc
        await until(lambda: _ended(proc), timeout_s, f"{self.name} exits", every_s=0.05)
        return proc.returncode

    def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL after 15 s."""
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def _ended(proc: subprocess.Popen) -> bool:
    return proc.poll() is not None


def procflow_env(**settings: str) -> dict[str, str]:
    """The environment of a worker or API process: ours, with PROCFLOW_<NAME> for each setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCFLOW_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"PROCFLOW_{name.upper()}": value for name, value in settings.items()})
    return env


def worker_process(env: dict[str, str], log: Path) -> Proc:
    return Proc("worker", [sys.executable, "worker.py"], env, log)


class ApiProcess(Proc):
    """The API as uvicorn serves it in production, on a port of its own."""

    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__("api", cmd, env, log)

    async def ready(self, timeout_s: float = 30) -> float:
        async def healthy() -> bool:
            assert self.alive(), f"the API exited:\n{self.output()[-3000:]}"
            try:
                async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
                    return (await http.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        return await until(healthy, timeout_s, "the API answers /healthz", every_s=0.2)


class DevServer(Proc):
    """`temporal server start-dev` on free ports with a SQLite file, the WAL pragmas and the
    search attributes: the command line of scripts/run_stack, headless."""

    def __init__(self, data_dir: Path, log: Path, port: int | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.db_file = data_dir / "temporal.db"
        config = StackConfig(temporal_port=self.port, ui_port=free_port(), data_dir=data_dir)
        cmd = temporal_command(config, binary("temporal"))
        cmd += ["--headless", "--http-port", str(free_port())]
        cmd += ["--metrics-port", str(free_port()), "--log-level", "warn"]
        super().__init__("temporal", cmd, procflow_env(), log)

    async def ready(self, timeout_s: float = 60) -> Client:
        """Wait until the frontend answers; a client connected to it."""
        clients: list[Client] = []

        async def answers() -> bool:
            assert self.alive(), f"the dev server exited:\n{self.output()[-3000:]}"
            try:
                settings = Settings(temporal_address=self.address)
                client = await asyncio.wait_for(connect(settings), 5)
                await client.count_workflows("ProcessType = 'sales_order'")
            except Exception:
                return False
            clients.append(client)
            return True

        await until(answers, timeout_s, f"the dev server answers on {self.address}", 0.25)
        return clients[0]
