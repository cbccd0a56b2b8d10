"""The baseline: a thin raw-SDK workflow with the shape of a sales order, and its worker.

`BaselineOrderWorkflow` runs, per segment, as many no-op activities as the real sales order
schedules there, local where the sales order's are local, in the same batches and order
(counted from a real history by bench.run), and between segments waits (with
a timer, as the sales order's task deadlines do) for one decision update or one payment signal.
Updates answer once the workflow waits again or has ended, as the sales order's `decide` does.
`TrivialWorkflow` only answers a trivial update: the raw round trip for the decision latency.

`python -m bench.baseline --address HOST:PORT --task-queue Q` runs a worker for both.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from datetime import timedelta
from functools import partial

from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

WAIT_TIMEOUT = timedelta(days=7)


class Batch(BaseModel):
    """Activities scheduled together (they run concurrently); local ones run in the workflow
    task, without a round trip through the server."""

    size: int
    local: bool = False


class Shape(BaseModel):
    """Per segment, the activity batches in order; a decision update or payment signal
    separates two segments."""

    segments: list[list[Batch]]


class Step(BaseModel):
    n: int


@activity.defn(name="bench_noop")
async def noop(step: Step) -> Step:
    return step


@workflow.defn
class BaselineOrderWorkflow:
    @workflow.init
    def __init__(self, shape: Shape) -> None:
        self.events = 0  # decisions and payments received
        self.waiting_for = -1  # the event index the main loop waits for
        self.done = False

    @workflow.run
    async def run(self, shape: Shape) -> str:
        last = len(shape.segments) - 1
        for i, batches in enumerate(shape.segments):
            for batch in batches:
                run = workflow.execute_local_activity if batch.local else workflow.execute_activity
                await asyncio.gather(
                    *(
                        run(noop, Step(n=n), start_to_close_timeout=timedelta(seconds=30))
                        for n in range(batch.size)
                    )
                )
            if i < last:
                self.waiting_for = i
                try:
                    await workflow.wait_condition(partial(self._past, i), timeout=WAIT_TIMEOUT)
                except TimeoutError:
                    self.done = True
                    return "timed out"
        self.done = True
        await workflow.wait_condition(workflow.all_handlers_finished)
        return "closed"

    def _past(self, i: int) -> bool:
        return self.events > i

    def _settled(self) -> bool:
        return self.done or self.waiting_for == self.events

    @workflow.update
    async def settle(self) -> str:
        await workflow.wait_condition(self._settled)
        return "closed" if self.done else "waiting"

    @workflow.update
    async def decide(self, step: Step) -> str:
        self.events += 1
        await workflow.wait_condition(self._settled)
        return "closed" if self.done else "waiting"

    @workflow.update
    async def pay(self, step: Step) -> str:
        """Like procflow's `pay` update: answers once the payment is taken in."""
        self.events += 1
        return "paid"


@workflow.defn
class TrivialWorkflow:
    def __init__(self) -> None:
        self.stop = False

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.stop)

    @workflow.update
    def ping(self, step: Step) -> Step:
        return step

    @workflow.signal
    def finish(self) -> None:
        self.stop = True


def build_baseline_worker(client: Client, task_queue: str) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[BaselineOrderWorkflow, TrivialWorkflow],
        activities=[noop],
    )


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    args = parser.parse_args()
    client = await Client.connect(args.address, data_converter=pydantic_data_converter)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with build_baseline_worker(client, args.task_queue):
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
