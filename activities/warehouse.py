"""Warehouse activities: stock reservations, shipments and invoices (all idempotent)."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.models import (
    OUT_OF_STOCK,
    InvoiceRequest,
    InvoiceResult,
    ShipmentRequest,
    ShipmentResult,
    StockRequest,
    StockResult,
)
from core.db import Invoice, Shipment, StockItem, StockReservation


def tracking_no(order_no: str) -> str:
    return f"TRK-{order_no}"


def invoice_no(order_no: str) -> str:
    return f"INV-{order_no}"


def _quantities(request: StockRequest) -> dict[str, Decimal]:
    wanted: dict[str, Decimal] = defaultdict(Decimal)
    for line in request.lines:
        wanted[line.sku] += line.quantity
    return dict(sorted(wanted.items()))


class _OutOfStock(Exception):
    pass


class WarehouseActivities:
    def __init__(self, session_factory: async_sessionmaker) -> None:
        self._sessions = session_factory

    @activity.defn(name="reserve_stock")
    async def reserve_stock(self, request: StockRequest) -> StockResult:
        """Hold stock for every line of the order, all or nothing; a retry holds nothing twice."""
        wanted = _quantities(request)
        try:
            async with self._sessions.begin() as session:
                held = {
                    r.sku: r
                    for r in (
                        await session.execute(
                            select(StockReservation).where(
                                StockReservation.order_no == request.order_no
                            )
                        )
                    ).scalars()
                }
                for sku, quantity in wanted.items():
                    current = held.get(sku)
                    already = (
                        Decimal(current.quantity)
                        if current is not None and current.status == "held"
                        else Decimal(0)
                    )
                    delta = quantity - already
                    if delta != 0:
                        # atomic check-and-hold: safe against concurrent reservations
                        result = await session.execute(
                            update(StockItem)
                            .execution_options(synchronize_session=False)
                            .where(
                                StockItem.sku == sku,
                                StockItem.on_hand - StockItem.reserved >= delta,
                            )
                            .values(reserved=StockItem.reserved + delta)
                        )
                        if result.rowcount != 1:
                            raise _OutOfStock(sku)
                    if current is None:
                        session.add(
                            StockReservation(
                                order_no=request.order_no,
                                sku=sku,
                                quantity=quantity,
                                status="held",
                            )
                        )
                    else:
                        current.quantity = quantity
                        current.status = "held"
        except _OutOfStock as err:
            sku = err.args[0]
            activity.logger.info("order %s: %s out of stock", request.order_no, sku)
            raise ApplicationError(
                f"not enough stock of {sku} for order {request.order_no}",
                {"sku": sku},
                type=OUT_OF_STOCK,
                non_retryable=True,
            ) from None
        return StockResult(order_no=request.order_no, reserved=wanted)

    @activity.defn(name="release_stock")
    async def release_stock(self, request: StockRequest) -> None:
        """Release the order's held stock (only the lines' SKUs if lines are given)."""
        skus = {line.sku for line in request.lines}
        async with self._sessions.begin() as session:
            query = select(StockReservation).where(
                StockReservation.order_no == request.order_no, StockReservation.status == "held"
            )
            if skus:
                query = query.where(StockReservation.sku.in_(skus))
            for reservation in (await session.execute(query)).scalars():
                await session.execute(
                    update(StockItem)
                    .execution_options(synchronize_session=False)
                    .where(StockItem.sku == reservation.sku)
                    .values(reserved=StockItem.reserved - reservation.quantity)
                )
                reservation.status = "released"
                activity.logger.info(
                    "order %s: released %s %s",
                    request.order_no,
                    reservation.quantity,
                    reservation.sku,
                )

    @activity.defn(name="ship_order")
    async def ship_order(self, request: ShipmentRequest) -> ShipmentResult:
        """Ship the held stock once: the shipments row is the idempotency record."""
        try:
            async with self._sessions.begin() as session:
                existing = await session.get(Shipment, request.order_no)
                if existing is not None:
                    return ShipmentResult(
                        order_no=request.order_no, tracking_no=existing.tracking_no
                    )
                held = (
                    await session.execute(
                        select(StockReservation).where(
                            StockReservation.order_no == request.order_no,
                            StockReservation.status == "held",
                        )
                    )
                ).scalars()
                for reservation in held:
                    await session.execute(
                        update(StockItem)
                        .execution_options(synchronize_session=False)
                        .where(StockItem.sku == reservation.sku)
                        .values(
                            on_hand=StockItem.on_hand - reservation.quantity,
                            reserved=StockItem.reserved - reservation.quantity,
                        )
                    )
                    reservation.status = "shipped"
                session.add(
                    Shipment(order_no=request.order_no, tracking_no=tracking_no(request.order_no))
                )
        except IntegrityError:
            async with self._sessions() as session:
                existing = await session.get(Shipment, request.order_no)
            if existing is None:
                raise
            return ShipmentResult(order_no=request.order_no, tracking_no=existing.tracking_no)
        activity.logger.info("order %s shipped", request.order_no)
        return ShipmentResult(order_no=request.order_no, tracking_no=tracking_no(request.order_no))

    @activity.defn(name="issue_invoice")
    async def issue_invoice(self, request: InvoiceRequest) -> InvoiceResult:
        """Issue the order's invoice once (one invoice per order)."""
        query = select(Invoice).where(Invoice.order_no == request.order_no)
        try:
            async with self._sessions.begin() as session:
                existing = (await session.execute(query)).scalar_one_or_none()
                if existing is None:
                    existing = Invoice(
                        invoice_no=invoice_no(request.order_no),
                        order_no=request.order_no,
                        amount=request.amount,
                        currency=request.currency,
                    )
                    session.add(existing)
                    activity.logger.info("invoice %s issued", existing.invoice_no)
        except IntegrityError:
            async with self._sessions() as session:
                existing = (await session.execute(query)).scalar_one()
        return InvoiceResult(
            invoice_no=existing.invoice_no,
            order_no=existing.order_no,
            amount=Decimal(existing.amount),
        )
