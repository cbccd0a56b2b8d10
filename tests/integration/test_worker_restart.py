"""A sales order survives its worker being killed mid-process (real dev server, real DB, mail)."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

from sqlalchemy import func, select

from core.db import LedgerEntry, Order, TaskRow
from workflows.human_task import Actor, DecideInput
from workflows.sales_order import (
    Customer,
    OrderLine,
    SalesOrderInput,
    SalesOrderWorkflow,
    Stage,
    sales_order_workflow_id,
)


async def test_order_completes_after_worker_is_killed_and_restarted(
    dev_env, database, mail_sink, worker_process
):
    _, sessions = database
    client = dev_env.client
    inp = SalesOrderInput(
        order_no="R-1001",
        customer=Customer(
            id="CUST-7",
            company_name="Globex",
            contact_phone="+40 21 555 0101",
            email="orders@globex.example",
        ),
        lines=[OrderLine(sku="SKU-PRINTER", quantity=Decimal(4), unit_price=Decimal(300_000))],
        requester="alice",
    )
    handle = await client.start_workflow(
        SalesOrderWorkflow.run,
        inp,
        id=sales_order_workflow_id(inp.order_no),
        task_queue=worker_process.env["PROCFLOW_TASK_QUEUE"],
    )
    status = await handle.execute_update(SalesOrderWorkflow.settle)
    [vp_task] = status.pending_tasks
    await handle.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(
            task_id=vp_task.task_id,
            outcome="approved",
            actor=Actor(username="victor", roles=["vice-president"]),
        ),
    )

    # the read model already shows the sales director's task, then the worker dies
    async with sessions() as s:
        open_roles = (
            (await s.execute(select(TaskRow.candidate_roles).where(TaskRow.status == "open")))
            .scalars()
            .all()
        )
    assert open_roles == [["sales-director"]]
    worker_process.kill()
    worker_process.start()

    [sd_task] = (await handle.query(SalesOrderWorkflow.status)).pending_tasks
    await handle.execute_update(
        SalesOrderWorkflow.decide,
        DecideInput(
            task_id=sd_task.task_id,
            outcome="approved",
            actor=Actor(username="diana", roles=["sales-director"]),
        ),
    )
    result = await handle.result()
    assert result.stage == Stage.CLOSED

    async with sessions() as s:
        charges = (
            await s.execute(
                select(func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.order_no == "R-1001", LedgerEntry.kind == "charge")
            )
        ).scalar_one()
        order = await s.get(Order, "R-1001")
    assert charges == 1
    assert order is not None and order.stage == "closed"
    # mail leaves through the outbox: the worker's dispatcher sends it just after the step; a
    # mail the killed worker had claimed but not sent goes out once its lease ends (3 s here)
    wanted = ("Order R-1001: closed", "Approval needed")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        subjects = [m["Subject"] for m in mail_sink.messages]
        if all(any(w in s for s in subjects) for w in wanted):
            break
        await asyncio.sleep(0.1)
    assert "Order R-1001: closed" in subjects
    # both approval requests (vice-president, then sales director) reached the sink
    assert sum("Approval needed" in s for s in subjects) >= 2, subjects
