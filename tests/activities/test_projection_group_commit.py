"""Group commit of the `project` activity: on SQLite the projections that arrive while one is
being written go out together in one transaction (one writer, no lock polling under a burst);
a failing batch fails alone; PostgreSQL writes each batch in its own transaction."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, func, select
from temporalio.testing import ActivityEnvironment

import activities.records as records_module
from activities.models import AuditRecord, ProjectionBatch
from activities.records import RecordActivities
from core.db import AuditEntry, TaskRow
from tests.support import task_snapshot

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
N = 40


def _batch(i: int) -> ProjectionBatch:
    wid = f"review-R{i}"
    return ProjectionBatch(
        tasks=[
            task_snapshot(
                wid,
                process_type="review",
                business_key=f"R{i}",
                name="review",
                candidate_roles=["reviewer"],
                created_at=T0,
            )
        ],
        audit=[
            AuditRecord(
                event_key=f"{wid}:opened",
                workflow_id=wid,
                at=T0,
                actor="alice",
                action="opened",
            )
        ],
    )


def _commits(sessions) -> list[int]:
    """Counts the transactions committed on the sessions' engine."""
    count = [0]
    engine = sessions.kw["bind"].sync_engine

    @event.listens_for(engine, "commit")
    def _commit(_conn) -> None:
        count[0] += 1

    return count


async def _rows(sessions) -> tuple[int, int]:
    async with sessions() as session:
        tasks = await session.scalar(select(func.count()).select_from(TaskRow))
        audit = await session.scalar(select(func.count()).select_from(AuditEntry))
    return tasks or 0, audit or 0


async def test_a_burst_of_projections_is_written_in_few_transactions_on_sqlite(sessions):
    records = RecordActivities(sessions)
    env = ActivityEnvironment()
    commits = _commits(sessions)
    await asyncio.gather(*(env.run(records.project, _batch(i)) for i in range(N)))
    assert await _rows(sessions) == (N, N)
    if sessions.kw["bind"].dialect.name == "sqlite":
        # the first goes alone; the others queued meanwhile ride in a handful of groups
        assert 1 <= commits[0] <= N // 4, commits[0]
        assert records.writer.transactions == commits[0]
    else:  # PostgreSQL takes concurrent writers: one transaction per batch, as before
        assert commits[0] == N
        assert records.writer.transactions == 0


async def test_a_failing_batch_fails_alone_and_the_rest_of_its_group_is_written(
    sessions, monkeypatch
):
    real = records_module._apply_batch

    async def apply(session, batch: ProjectionBatch, trace=None) -> None:
        if batch.tasks[0].workflow_id == "review-R7":
            raise RuntimeError("this batch cannot be written")
        await real(session, batch, trace)

    monkeypatch.setattr(records_module, "_apply_batch", apply)
    records = RecordActivities(sessions)
    env = ActivityEnvironment()
    results = await asyncio.gather(
        *(env.run(records.project, _batch(i)) for i in range(N)), return_exceptions=True
    )
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [7]
    assert "cannot be written" in str(results[7])
    assert await _rows(sessions) == (N - 1, N - 1)
    async with sessions() as session:
        assert await session.get(TaskRow, "review-R7.t1") is None


@pytest.mark.parametrize("any_db_url", ["sqlite"], indirect=True)
async def test_a_caller_that_gives_up_leaves_its_batch_to_be_written(sessions):
    """An activity timed out (cancelled) while its batch waited: it is written anyway (applying
    it again on the retry is a no-op), and the writer goes on with the next ones."""
    records = RecordActivities(sessions)
    first = asyncio.create_task(records.project(_batch(1)))
    waiting = asyncio.create_task(records.project(_batch(2)))
    await asyncio.sleep(0)  # both queued: the first is being written, the second waits
    waiting.cancel()
    await first
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await records.project(_batch(3))
    await records.project(_batch(2))  # the retry
    assert await _rows(sessions) == (3, 3)
