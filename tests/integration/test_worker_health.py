"""`python worker.py` serves its health on PROCFLOW_WORKER_HEALTH_ADDRESS (issue 14): ready once
it polls, and gone when SIGTERM has stopped it."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.integration.conftest import WorkerProcess

pytestmark = pytest.mark.timeout(120)


async def test_the_worker_process_answers_its_health_and_stops_on_sigterm(
    worker_process: WorkerProcess,
):
    async with httpx.AsyncClient(base_url=worker_process.health_url, timeout=10) as http:
        deadline = time.monotonic() + 60
        while True:
            assert worker_process.proc and worker_process.proc.poll() is None, (
                worker_process.log.read_text()[-2000:]
            )
            try:
                ready = await http.get("/readyz")
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the worker's /readyz is not 200 after 60 s"
            await asyncio.sleep(0.2)
        assert ready.json() == {
            "status": "ok",
            "worker": "ok",
            "mail_dispatcher": "ok",
            "reconciler": "ok",
            "temporal": "ok",
            "database": "ok",
        }
        live = await http.get("/healthz")
        assert live.status_code == 200 and live.json()["worker"] == "ok"
        worker_process.proc.terminate()
        assert await asyncio.to_thread(worker_process.proc.wait, 30) == 0
        with pytest.raises(httpx.ConnectError):
            await http.get("/healthz")
