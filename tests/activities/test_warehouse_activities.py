"""Warehouse activities: reservations all-or-nothing, shipments and invoices idempotent."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.exceptions import ApplicationError

from activities.models import (
    OUT_OF_STOCK,
    InvoiceRequest,
    OrderLineRecord,
    ShipmentRequest,
    StockRequest,
)
from activities.warehouse import WarehouseActivities
from core.db import Invoice, Shipment, StockItem, StockReservation


def _request(order_no: str = "SO-1", **quantities: int) -> StockRequest:
    lines = [
        OrderLineRecord(
            line_no=i, sku=sku.replace("_", "-"), quantity=Decimal(q), unit_price=Decimal(1)
        )
        for i, (sku, q) in enumerate(quantities.items(), start=1)
    ]
    return StockRequest(order_no=order_no, lines=lines)


async def _levels(sessions: async_sessionmaker) -> dict[str, tuple[Decimal, Decimal]]:
    async with sessions() as session:
        items = (await session.execute(select(StockItem))).scalars()
        return {i.sku: (Decimal(i.on_hand), Decimal(i.reserved)) for i in items}


async def _reservations(sessions: async_sessionmaker) -> list[tuple[str, str, Decimal, str]]:
    async with sessions() as session:
        rows = (await session.execute(select(StockReservation))).scalars()
        return sorted((r.order_no, r.sku, Decimal(r.quantity), r.status) for r in rows)


async def test_reserve_is_idempotent(sessions, stock, activity_env):
    warehouse = WarehouseActivities(sessions)
    first = await activity_env.run(warehouse.reserve_stock, _request(SKU_A=4, SKU_B=2))
    await activity_env.run(warehouse.reserve_stock, _request(SKU_A=4, SKU_B=2))
    assert first.reserved == {"SKU-A": Decimal(4), "SKU-B": Decimal(2)}
    assert await _levels(sessions) == {
        "SKU-A": (Decimal(10), Decimal(4)),
        "SKU-B": (Decimal(5), Decimal(2)),
    }
    assert len(await _reservations(sessions)) == 2


async def test_reserve_is_all_or_nothing_when_one_line_is_short(sessions, stock, activity_env):
    warehouse = WarehouseActivities(sessions)
    with pytest.raises(ApplicationError) as short:
        await activity_env.run(warehouse.reserve_stock, _request(SKU_A=4, SKU_B=6))
    assert short.value.type == OUT_OF_STOCK and short.value.non_retryable
    assert await _levels(sessions) == {
        "SKU-A": (Decimal(10), Decimal(0)),
        "SKU-B": (Decimal(5), Decimal(0)),
    }
    assert await _reservations(sessions) == []


async def test_reserve_counts_other_orders_holds_and_unknown_skus(sessions, stock, activity_env):
    warehouse = WarehouseActivities(sessions)
    await activity_env.run(warehouse.reserve_stock, _request("SO-1", SKU_B=4))
    with pytest.raises(ApplicationError) as short:
        await activity_env.run(warehouse.reserve_stock, _request("SO-2", SKU_B=2))
    assert short.value.type == OUT_OF_STOCK
    with pytest.raises(ApplicationError) as unknown:
        await activity_env.run(warehouse.reserve_stock, _request("SO-3", SKU_NOPE=1))
    assert unknown.value.type == OUT_OF_STOCK and unknown.value.non_retryable
    assert await _reservations(sessions) == [("SO-1", "SKU-B", Decimal(4), "held")]


async def test_release_returns_held_stock_once(sessions, stock, activity_env):
    warehouse = WarehouseActivities(sessions)
    await activity_env.run(warehouse.reserve_stock, _request(SKU_A=3))
    await activity_env.run(warehouse.release_stock, _request(SKU_A=3))
    await activity_env.run(warehouse.release_stock, _request(SKU_A=3))
    assert (await _levels(sessions))["SKU-A"] == (Decimal(10), Decimal(0))
    assert await _reservations(sessions) == [("SO-1", "SKU-A", Decimal(3), "released")]


async def test_ship_is_idempotent_and_consumes_held_stock(sessions, stock, activity_env):
    warehouse = WarehouseActivities(sessions)
    await activity_env.run(warehouse.reserve_stock, _request(SKU_A=3, SKU_B=1))
    first = await activity_env.run(warehouse.ship_order, ShipmentRequest(order_no="SO-1"))
    second = await activity_env.run(warehouse.ship_order, ShipmentRequest(order_no="SO-1"))
    assert first.tracking_no == second.tracking_no == "TRK-SO-1"
    assert await _levels(sessions) == {
        "SKU-A": (Decimal(7), Decimal(0)),
        "SKU-B": (Decimal(4), Decimal(0)),
    }
    assert {status for *_, status in await _reservations(sessions)} == {"shipped"}
    async with sessions() as session:
        assert len((await session.execute(select(Shipment))).scalars().all()) == 1


async def test_invoice_is_issued_once_per_order(sessions, activity_env):
    warehouse = WarehouseActivities(sessions)
    request = InvoiceRequest(order_no="SO-1", amount=Decimal("120.00"), currency="EUR")
    first = await activity_env.run(warehouse.issue_invoice, request)
    second = await activity_env.run(warehouse.issue_invoice, request)
    assert first == second
    assert (first.invoice_no, first.amount) == ("INV-SO-1", Decimal("120.00"))
    async with sessions() as session:
        assert len((await session.execute(select(Invoice))).scalars().all()) == 1
