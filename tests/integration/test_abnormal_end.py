"""An instance that Temporal ends abnormally (terminated, timed out) leaves the inboxes and its
order says so: the read-model reconciler against the real dev server, worker, SMTP server and
database (SQLite and PostgreSQL), and its apply step on both databases."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import ActivityEnvironment

from activities.mail import SmtpSender
from activities.models import (
    AuditRecord,
    OrderLineRecord,
    OrderRecord,
    ProjectionBatch,
    StageChange,
    TaskSnapshot,
)
from activities.payments import SandboxPaymentProvider
from activities.reconcile import (
    FINAL_REVISION,
    AbnormalEnd,
    ReadModelReconciler,
    abnormal_ends_query,
    apply_abnormal_end,
)
from activities.records import RecordActivities
from api.routers.tasks import inbox
from api.schemas import Principal
from core.db import AuditEntry, Order, TaskCandidate, TaskRow
from core.settings import Settings
from tests.support import task_snapshot
from worker import ProcflowWorker, build_worker
from workflows.sales_order import (
    TERMINAL_STAGES,
    Customer,
    OrderLine,
    SalesOrderInput,
    SalesOrderWorkflow,
    Stage,
    sales_order_workflow_id,
)

VICTOR = Principal(
    username="victor", display_name="Victor", email="victor@example.com", roles=["vice-president"]
)
T0 = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)


# ------------------------------------------------------------------------------ helpers
async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.2)


def _input(no: str, sku: str, qty: int, unit_price: int | str) -> SalesOrderInput:
    return SalesOrderInput(
        order_no=no,
        customer=Customer(
            id="CUST-13",
            company_name="Umbrella",
            contact_phone="+40 21 555 0113",
            email="buyer@umbrella.example",
        ),
        lines=[OrderLine(sku=sku, quantity=Decimal(qty), unit_price=Decimal(unit_price))],
        requester="alice",
    )


def _worker(dev_env, sessions, mail_sink, reconciler: ReadModelReconciler) -> ProcflowWorker:
    return build_worker(
        dev_env.client,
        task_queue=f"ended-{uuid.uuid4()}",
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
        reconciler=reconciler,
    )


def _reconciler(dev_env, sessions, poll_s: float) -> ReadModelReconciler:
    return ReadModelReconciler(
        dev_env.client,
        sessions,
        poll_s=poll_s,
        lookback_s=3600,
        process_types=["sales_order"],
        final_stages=TERMINAL_STAGES,
    )


async def _start(worker: ProcflowWorker, inp: SalesOrderInput, **options) -> WorkflowHandle:
    return await worker.worker.client.start_workflow(
        SalesOrderWorkflow.run,
        inp,
        id=sales_order_workflow_id(inp.order_no),
        task_queue=worker.worker.task_queue,
        **options,
    )


async def _inbox_task_ids(sessions: async_sessionmaker, user: Principal) -> set[str]:
    async with sessions() as session:
        page = await inbox(user=user, session=session, limit=200)
    return {t.task_id for t in page.items}


async def _rows(sessions: async_sessionmaker) -> dict[str, list[tuple]]:
    """Every row of the read-model tables the reconciler writes, to compare whole states."""
    state = {}
    async with sessions() as session:
        for model in (Order, TaskRow, TaskCandidate, AuditEntry):
            cols = list(model.__table__.columns)
            rows = (await session.execute(select(*cols))).all()
            state[model.__tablename__] = sorted(tuple(str(v) for v in row) for row in rows)
    return state


async def _ended_audit(sessions: async_sessionmaker) -> list[AuditEntry]:
    async with sessions() as session:
        return list(
            (
                await session.scalars(
                    select(AuditEntry).where(AuditEntry.action == "instance_ended")
                )
            ).all()
        )


# ------------------------------------------------------------------------------ end to end
async def test_terminated_order_leaves_the_inboxes_and_says_terminated(
    dev_env, database, mail_sink
):
    _, sessions = database
    run = uuid.uuid4().hex[:8]
    # its own rounds are called below; the background loop only runs its first, at start
    async with _worker(dev_env, sessions, mail_sink, _reconciler(dev_env, sessions, 3600)) as w:
        doomed = await _start(w, _input(f"T-{run}-1", "SKU-PRINTER", 2, 300_000))
        waiting = await _start(w, _input(f"T-{run}-2", "SKU-PRINTER", 2, 300_000))
        completed = await _start(w, _input(f"T-{run}-3", "SKU-MUG", 2, "12.50"))
        [doomed_task] = (await doomed.execute_update(SalesOrderWorkflow.settle)).pending_tasks
        [waiting_task] = (await waiting.execute_update(SalesOrderWorkflow.settle)).pending_tasks
        assert doomed_task.candidate_roles == ["vice-president"]
        assert (await completed.result()).stage == Stage.CLOSED
        inbox_before = await _inbox_task_ids(sessions, VICTOR)
        assert {doomed_task.task_id, waiting_task.task_id} <= inbox_before

        await doomed.terminate("history size limit exceeded")
        desc = await doomed.describe()
        assert desc.status == WorkflowExecutionStatus.TERMINATED and desc.close_time

        # visibility is eventually consistent: rounds until the end is listed
        changed = []

        async def reconciled() -> bool:
            changed.extend(await w.reconciler.reconcile())
            return bool(changed)

        await until(reconciled, 60, "the termination is reconciled")

        assert [(a.end.workflow_id, a.end.run_id) for a in changed] == [(doomed.id, desc.run_id)]
        assert changed[0].tasks_closed == [doomed_task.task_id]
        assert await _inbox_task_ids(sessions, VICTOR) == inbox_before - {doomed_task.task_id}
        async with sessions() as s:
            task = await s.get(TaskRow, doomed_task.task_id)
            other = await s.get(TaskRow, waiting_task.task_id)
            stages = dict(
                (
                    await s.execute(
                        select(Order.workflow_id, Order.stage).where(
                            Order.workflow_id.in_([doomed.id, waiting.id, completed.id])
                        )
                    )
                ).all()
            )
        assert task is not None and other is not None
        assert (task.status, task.outcome, task.revision) == ("closed", "aborted", FINAL_REVISION)
        assert task.closed_at == desc.close_time
        assert other.status == "open"
        assert stages == {doomed.id: "terminated", waiting.id: "approval", completed.id: "closed"}
        [entry] = await _ended_audit(sessions)
        assert (entry.workflow_id, entry.actor, entry.event_key) == (
            doomed.id,
            "system",
            f"{doomed.id}:ended:{desc.run_id}",
        )
        assert "TERMINATED" in entry.comment

        # a second round changes nothing
        before = await _rows(sessions)
        assert await w.reconciler.reconcile() == []
        assert await _rows(sessions) == before
        await waiting.terminate("test ended")


async def test_worker_reconciler_closes_an_order_whose_execution_timed_out(
    dev_env, database, mail_sink
):
    _, sessions = database
    no = f"TO-{uuid.uuid4().hex[:8]}"
    async with _worker(dev_env, sessions, mail_sink, _reconciler(dev_env, sessions, 0.5)) as w:
        handle = await _start(
            w,
            _input(no, "SKU-PRINTER", 2, 300_000),
            execution_timeout=timedelta(seconds=10),
        )
        [task] = (await handle.execute_update(SalesOrderWorkflow.settle)).pending_tasks
        assert task.task_id in await _inbox_task_ids(sessions, VICTOR)

        async def stage() -> str | None:
            async with sessions() as s:
                order = await s.get(Order, no)
            return order.stage if order else None

        async def timed_out() -> bool:
            return await stage() == "timed_out"

        # nothing but the worker's own reconciler, polling in the background, writes this
        await until(timed_out, 90, "the order shows timed_out")
        assert task.task_id not in await _inbox_task_ids(sessions, VICTOR)
        desc = await handle.describe()
        assert desc.status == WorkflowExecutionStatus.TIMED_OUT
        [entry] = await _ended_audit(sessions)
        assert entry.event_key == f"{handle.id}:ended:{desc.run_id}"
        assert "TIMED_OUT" in entry.comment
    assert w.reconciler.applied == 1


async def test_build_worker_runs_a_reconciler_configured_by_the_settings(
    dev_env, database, mail_sink
):
    _, sessions = database
    settings = Settings()
    worker = build_worker(
        dev_env.client,
        task_queue=f"ended-{uuid.uuid4()}",
        session_factory=sessions,
        sender=SmtpSender(mail_sink.host, mail_sink.port, 10, "procflow@localhost"),
        provider=SandboxPaymentProvider(sessions),
    )
    reconciler = worker.reconciler
    assert Settings.model_fields["reconcile_poll_s"].default == 30
    assert Settings.model_fields["reconcile_lookback_s"].default == 86400
    assert reconciler.poll_s == settings.reconcile_poll_s
    looked_back = datetime.now(UTC) - reconciler.watermark
    lookback = timedelta(seconds=settings.reconcile_lookback_s)
    assert lookback <= looked_back < lookback + timedelta(seconds=600)
    assert reconciler.process_types == ["sales_order"]
    assert "closed" in reconciler.final_stages


async def test_reconciler_refuses_a_process_type_that_is_not_a_plain_name(dev_env, sessions):
    with pytest.raises(ValueError, match="process_types"):
        ReadModelReconciler(dev_env.client, sessions, process_types=["x') OR ('1' = '1"])
    with pytest.raises(ValueError, match="process_types"):
        ReadModelReconciler(dev_env.client, sessions, process_types=[])


def test_abnormal_ends_query_names_the_types_statuses_and_close_time():
    query = abnormal_ends_query(["sales_order"], T0)
    assert query == (
        "ProcessType IN ('sales_order') AND "
        "ExecutionStatus IN ('Terminated', 'TimedOut', 'Failed', 'Canceled') "
        "AND CloseTime > '2026-05-04T10:00:00+00:00'"
    )


# ------------------------------------------------------------------------------ apply step
def _order(no: str, workflow_id: str) -> OrderRecord:
    return OrderRecord(
        order_no=no,
        workflow_id=workflow_id,
        customer_id="CUST-13",
        customer_name="Umbrella",
        customer_email="buyer@umbrella.example",
        requester="alice",
        variant="standard",
        currency="EUR",
        amount=Decimal(600_000),
        amount_due=Decimal(600_000),
        stage="received",
        policy_version=1,
        lines=[
            OrderLineRecord(
                line_no=1, sku="SKU-PRINTER", quantity=Decimal(2), unit_price=Decimal(300_000)
            )
        ],
    )


def _task(workflow_id: str, n: int, *, status: str, revision: int, at: datetime) -> TaskSnapshot:
    closed = status == "closed"
    return task_snapshot(
        workflow_id,
        n,
        status=status,
        outcome="approved" if closed else None,
        decided_by="victor" if closed else None,
        created_at=at,
        closed_at=at + timedelta(minutes=5) if closed else None,
        revision=revision,
    )


async def _project(sessions: async_sessionmaker, batch: ProjectionBatch) -> None:
    await ActivityEnvironment().run(RecordActivities(sessions).project, batch)


async def _order_in_approval(
    sessions: async_sessionmaker, no: str, stage: str = "approval", at: datetime = T0
) -> str:
    """An order projected as its workflow would: one task decided, one open; its workflow id."""
    wid = f"sales_order-{no}"
    await _project(
        sessions,
        ProjectionBatch(
            order=_order(no, wid),
            stage=StageChange(order_no=no, stage=stage, revision=3, at=at + timedelta(minutes=6)),
            tasks=[
                _task(wid, 1, status="closed", revision=2, at=at),
                _task(wid, 2, status="open", revision=3, at=at + timedelta(minutes=6)),
            ],
            audit=[
                AuditRecord(event_key=f"{wid}#1", workflow_id=wid, actor="alice", action="x", at=at)
            ],
        ),
    )
    return wid


def _end(wid: str, closed_at: datetime = T0 + timedelta(hours=1)) -> AbnormalEnd:
    return AbnormalEnd(
        workflow_id=wid,
        run_id="run-1",
        status=WorkflowExecutionStatus.TERMINATED,
        closed_at=closed_at,
    )


async def test_apply_closes_open_tasks_once_and_a_late_snapshot_cannot_reopen_them(database):
    _, sessions = database
    wid = await _order_in_approval(sessions, "A-1")
    bystander = await _order_in_approval(sessions, "A-2")
    end = _end(wid)

    applied = await apply_abnormal_end(sessions, end, final_stages=TERMINAL_STAGES)

    assert applied.changed and applied.order_no == "A-1" and applied.audited
    assert applied.tasks_closed == [f"{wid}.t2"]
    async with sessions() as s:
        decided = await s.get(TaskRow, f"{wid}.t1")
        aborted = await s.get(TaskRow, f"{wid}.t2")
        untouched = await s.get(TaskRow, f"{bystander}.t2")
        order = await s.get(Order, "A-1")
        other_order = await s.get(Order, "A-2")
    assert decided is not None and (decided.outcome, decided.revision) == ("approved", 2)
    assert aborted is not None
    assert (aborted.status, aborted.outcome, aborted.closed_at) == (
        "closed",
        "aborted",
        end.closed_at,
    )
    assert aborted.revision == FINAL_REVISION
    assert untouched is not None and untouched.status == "open"
    assert order is not None and (order.stage, order.updated_at) == ("terminated", end.closed_at)
    assert other_order is not None and other_order.stage == "approval"
    [entry] = await _ended_audit(sessions)
    assert (entry.event_key, entry.actor, entry.at) == (
        f"{wid}:ended:run-1",
        "system",
        end.closed_at,
    )
    assert entry.details["tasks_closed"] == [f"{wid}.t2"]

    # again: nothing changes
    before = await _rows(sessions)
    again = await apply_abnormal_end(sessions, end, final_stages=TERMINAL_STAGES)
    assert not again.changed
    assert await _rows(sessions) == before

    # a snapshot the terminated workflow had in flight arrives late: the task stays closed
    await _project(
        sessions,
        ProjectionBatch(tasks=[_task(wid, 2, status="open", revision=4, at=T0)]),
    )
    assert f"{wid}.t2" not in await _inbox_task_ids(sessions, VICTOR)
    assert f"{bystander}.t2" in await _inbox_task_ids(sessions, VICTOR)


async def test_apply_concurrently_from_several_reconcilers_writes_once(database):
    _, sessions = database
    wid = await _order_in_approval(sessions, "C-1")
    results = await asyncio.gather(*(apply_abnormal_end(sessions, _end(wid)) for _ in range(4)))
    assert [r.order_no for r in results if r.order_no] == ["C-1"]
    assert sorted(t for r in results for t in r.tasks_closed) == [f"{wid}.t2"]
    assert sum(r.audited for r in results) == 1
    assert len(await _ended_audit(sessions)) == 1


async def test_apply_leaves_final_stages_later_runs_and_unknown_instances_alone(database):
    _, sessions = database
    closed_wid = await _order_in_approval(sessions, "F-1", stage="closed")
    # the instance's rows were written after the ended run closed: a later run owns them
    later_wid = await _order_in_approval(sessions, "L-1", at=T0 + timedelta(days=1))

    closed = await apply_abnormal_end(sessions, _end(closed_wid), final_stages=TERMINAL_STAGES)
    later = await apply_abnormal_end(sessions, _end(later_wid), final_stages=TERMINAL_STAGES)
    before = await _rows(sessions)
    unknown = await apply_abnormal_end(sessions, _end("sales_order-elsewhere"))

    assert closed.order_no is None and closed.tasks_closed == [f"{closed_wid}.t2"]
    assert not later.changed and not unknown.changed
    assert await _rows(sessions) == before
    async with sessions() as s:
        assert (await s.get(Order, "F-1")).stage == "closed"  # type: ignore[union-attr]
        assert (await s.get(Order, "L-1")).stage == "approval"  # type: ignore[union-attr]
    assert [e.workflow_id for e in await _ended_audit(sessions)] == [closed_wid]
