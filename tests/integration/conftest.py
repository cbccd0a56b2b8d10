"""Integration fixtures: the real Temporal dev server, a migrated SQLite database, a real SMTP
server on loopback and the worker as a separate OS process that tests may kill."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from core.db import make_engine, make_session_factory
from core.temporal import SEARCH_ATTRIBUTES
from scripts.mailsink import MailSink
from scripts.migrate import upgrade
from scripts.seed import seed

ROOT = Path(__file__).resolve().parents[2]


def binary(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_asyncio.fixture(scope="session")
async def dev_env():
    args = []
    for name, type_ in SEARCH_ATTRIBUTES.items():
        args += ["--search-attribute", f"{name}={type_}"]
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=binary("temporal"),
        dev_server_extra_args=args,
        ui=False,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest_asyncio.fixture
async def database(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/records.db"
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    await seed(factory)
    try:
        yield url, factory
    finally:
        await engine.dispose()


@pytest.fixture
def mail_sink():
    sink = MailSink("127.0.0.1", free_port())
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


class WorkerProcess:
    """`python worker.py` as its own process, configured only through PROCFLOW_* variables."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "worker.py"], cwd=ROOT, env=self.env,
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def worker_process(dev_env, database, mail_sink, tmp_path):
    url, _ = database
    env = dict(os.environ)
    env.update({
        "PROCFLOW_TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "PROCFLOW_TASK_QUEUE": f"it-{uuid.uuid4()}",
        "PROCFLOW_DATABASE_URL": url,
        "PROCFLOW_SMTP_HOST": "127.0.0.1",
        "PROCFLOW_SMTP_PORT": str(mail_sink.port),
    })
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
