"""A loop that runs beside the worker (mail dispatcher, read-model reconciler).

Stopped by a flag, not by cancelling its task: on Python 3.11 `asyncio.wait_for` can swallow a
cancellation that arrives as its inner wait completes, and the task would then run on while the
caller waits for it (seen as a worker shutdown that never ended). A round still running after
the grace is cancelled, and the flag still ends the loop if that cancellation is lost.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class BackgroundLoop:
    """`start()` runs `run()` as a task; `halt()` sets the flag and waits for it to end."""

    task_name = "background-loop"

    def __init__(self) -> None:
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def alive(self) -> bool:
        """Started and its task has not ended (a loop that died of an error is not alive)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self.run(), name=self.task_name)

    async def run(self) -> None:  # pragma: no cover - every loop defines its own
        raise NotImplementedError

    def _woken_to_stop(self) -> None:
        """Hook: wake the loop from whatever it waits on, so that it sees the flag."""

    async def halt(self, grace_s: float = 15.0) -> None:
        """Set the flag, let the running round finish (at most `grace_s`), then return."""
        self._stopping.set()
        self._woken_to_stop()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=grace_s)
        if not done:
            log.warning("%s: round still running after %.0f s", self.task_name, grace_s)
            task.cancel()
            await asyncio.wait({task}, timeout=grace_s)
