"""Integration fixtures: the worker as a separate OS process that tests may kill (dev server,
database and SMTP server come from tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import pytest_asyncio

from core.db import make_engine, make_session_factory
from scripts.seed import seed
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture
async def database(any_db_url):
    """The migrated database (SQLite and PostgreSQL in turn), seeded, with its session factory."""
    engine = make_engine(any_db_url)
    factory = make_session_factory(engine)
    await seed(factory)
    try:
        yield any_db_url, factory
    finally:
        await engine.dispose()


class WorkerProcess:
    """`python worker.py` as its own process, configured only through PROCFLOW_* variables."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def health_url(self) -> str:
        """Where its GET /healthz and /readyz answer (PROCFLOW_WORKER_HEALTH_ADDRESS)."""
        return f"http://{self.env['PROCFLOW_WORKER_HEALTH_ADDRESS']}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "worker.py"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
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
    env.update(
        {
            "PROCFLOW_TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
            "PROCFLOW_TASK_QUEUE": f"it-{uuid.uuid4()}",
            "PROCFLOW_DATABASE_URL": url,
            "PROCFLOW_SMTP_HOST": "127.0.0.1",
            "PROCFLOW_SMTP_PORT": str(mail_sink.port),
            # a mail the killed worker had claimed goes out after this lease, not a minute later
            "PROCFLOW_MAIL_LEASE_S": "3",
            # ports of its own: several workers run at once (pytest-xdist, make run)
            "PROCFLOW_WORKER_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
            "PROCFLOW_WORKER_METRICS_ADDRESS": "",
        }
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
