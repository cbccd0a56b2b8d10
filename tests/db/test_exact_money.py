"""Money and quantities are exact on SQLite and PostgreSQL: stored as integer minor units
(core/db.py `MinorUnits`), read back as Decimals with their places, compared, ordered and
summed in SQL as integers, and refused when they cannot be stored exactly."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import async_sessionmaker

from activities.payments import PaymentDeclinedError, SandboxPaymentProvider
from core.db import (
    Invoice,
    LedgerEntry,
    Order,
    OrderLine,
    ProcessInstance,
    StockItem,
    StockReservation,
    to_minor_units,
)

BIG = Decimal("99999999999999.74")  # a float has no room for its cents
CENT = Decimal("0.01")
BIG_QUANTITY = Decimal("999999999999999.999")  # the largest NUMERIC(18, 3)


def _ledger(key: str, amount: Decimal, kind: str = "charge") -> LedgerEntry:
    return LedgerEntry(
        idempotency_key=key,
        order_no="SO-1",
        kind=kind,
        amount=amount,
        currency="EUR",
        provider_ref=f"ref-{key}",
        status="captured",
    )


def _order(no: str, amount: Decimal) -> Order:
    return Order(
        order_no=no,
        workflow_id=f"sales-order-{no}",
        customer_id="CUST-1",
        customer_name="ACME",
        customer_email="buyer@acme.example",
        requester="alice",
        variant="standard",
        currency="EUR",
        amount=amount,
        amount_due=amount,
        stage="approval",
        policy_version=1,
        created_at=datetime(2026, 11, 24, tzinfo=UTC),
        updated_at=datetime(2026, 11, 24, tzinfo=UTC),
    )


def _instance(no: str) -> ProcessInstance:
    """The instance an order extends (orders reference process_instances)."""
    at = datetime(2026, 11, 24, tzinfo=UTC)
    return ProcessInstance(
        workflow_id=f"sales-order-{no}",
        process_type="sales_order",
        business_key=no,
        stage="approval",
        status="running",
        requester="alice",
        started_at=at,
        stage_entered_at=at,
        updated_at=at,
    )


async def _amounts(sessions: async_sessionmaker, *where, order_by=LedgerEntry.id) -> list[str]:
    async with sessions() as session:
        rows = await session.scalars(select(LedgerEntry.amount).where(*where).order_by(order_by))
        return [str(v) for v in rows]


async def test_money_and_quantities_round_trip_exactly_through_the_orm(sessions):
    async with sessions.begin() as session:
        session.add(_instance("SO-1"))
        await session.flush()
        session.add(_order("SO-1", BIG))
        session.add_all([_ledger("big", BIG), _ledger("cent", CENT)])
        session.add(Invoice(invoice_no="INV-1", order_no="SO-1", amount=BIG, currency="EUR"))
        session.add(StockItem(sku="SKU-A", on_hand=BIG_QUANTITY, reserved=Decimal("0.001")))
        session.add(
            StockReservation(order_no="SO-1", sku="SKU-A", quantity=Decimal("0.001"), status="held")
        )
    async with sessions.begin() as session:
        session.add(
            OrderLine(
                order_no="SO-1", line_no=1, sku="SKU-A", quantity=BIG_QUANTITY, unit_price=CENT
            )
        )
    async with sessions() as session:
        order = await session.get(Order, "SO-1")
        line = (await session.scalars(select(OrderLine))).one()
        invoice = await session.get(Invoice, "INV-1")
        item = await session.get(StockItem, "SKU-A")
        held = (await session.scalars(select(StockReservation))).one()
    assert order is not None and invoice is not None and item is not None
    # str: the same digits and exactly the column's places, not only an equal value
    assert [str(order.amount), str(order.amount_due), str(invoice.amount)] == [str(BIG)] * 3
    assert [str(line.quantity), str(line.unit_price)] == [str(BIG_QUANTITY), "0.01"]
    assert [str(item.on_hand), str(item.reserved), str(held.quantity)] == [
        str(BIG_QUANTITY),
        "0.001",
        "0.001",
    ]
    assert await _amounts(sessions) == ["99999999999999.74", "0.01"]
    async with sessions() as session:
        # whole amounts come back with their places too
        session.add(_ledger("whole", Decimal(1200000)))
        await session.commit()
        stored = await session.scalar(
            text("SELECT amount FROM payments_ledger WHERE idempotency_key = 'whole'")
        )
    assert stored == 120000000  # in cents
    assert await _amounts(sessions, LedgerEntry.idempotency_key == "whole") == ["1200000.00"]


async def test_sql_comparisons_and_ordering_compare_in_cents(sessions):
    async with sessions.begin() as session:
        session.add_all([_ledger("big", BIG), _ledger("cent", CENT)])
        session.add_all([_instance(f"SO-{a}") for a in ("12.33", "12.34", "12.35")])
        await session.flush()
        session.add_all([_order(f"SO-{a}", Decimal(a)) for a in ("12.33", "12.34", "12.35")])
    assert await _amounts(sessions, LedgerEntry.amount > Decimal("99999999999999.73")) == [str(BIG)]
    assert await _amounts(sessions, LedgerEntry.amount >= BIG) == [str(BIG)]
    assert await _amounts(sessions, LedgerEntry.amount < BIG) == ["0.01"]
    assert await _amounts(sessions, LedgerEntry.amount == CENT) == ["0.01"]
    assert await _amounts(sessions, order_by=LedgerEntry.amount.desc()) == [str(BIG), "0.01"]
    async with sessions() as session:
        due = await session.scalars(
            select(Order.amount_due)
            .where(Order.amount_due >= Decimal("12.34"))
            .order_by(Order.amount_due)
        )
        assert [str(v) for v in due] == ["12.34", "12.35"]
    # the bound itself is converted by the column type: the database compares integers
    for dialect in (sqlite.dialect(), postgresql.dialect()):
        clause = Order.amount_due >= Decimal("12.34")
        bind = clause.right
        assert bind.type.process_bind_param(bind.value, dialect) == 1234
        literal = clause.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        assert str(literal) == "orders.amount_due >= 1234"


async def test_a_bound_with_more_places_or_beyond_the_range_still_compares_exactly(sessions):
    async with sessions.begin() as session:
        session.add_all([_ledger("big", BIG), _ledger("cent", CENT)])
    # a filter such as GET /orders?min_amount=0.005 is not an amount to store: it is rounded
    # towards the side that keeps the comparison true to the decimal value
    assert await _amounts(sessions, LedgerEntry.amount >= Decimal("0.005")) == [str(BIG), "0.01"]
    assert await _amounts(sessions, LedgerEntry.amount > Decimal("0.015")) == [str(BIG)]
    assert await _amounts(sessions, LedgerEntry.amount < Decimal("0.015")) == ["0.01"]
    assert await _amounts(sessions, LedgerEntry.amount <= Decimal("0.009")) == []
    assert await _amounts(sessions, LedgerEntry.amount <= Decimal("1e16")) == [str(BIG), "0.01"]
    assert await _amounts(sessions, LedgerEntry.amount >= Decimal("1e40")) == []
    assert await _amounts(sessions, LedgerEntry.amount > Decimal("-1e40")) == [str(BIG), "0.01"]


async def test_sum_of_amounts_is_exact(sessions):
    async with sessions.begin() as session:
        session.add_all([_ledger("big", BIG), _ledger("c1", CENT), _ledger("c2", CENT)])
    async with sessions() as session:
        total = await session.scalar(select(func.sum(LedgerEntry.amount)))
        none = await session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                LedgerEntry.kind == "refund"
            )
        )
    assert str(total) == "99999999999999.76"
    assert str(none) == "0.00"


async def test_refunds_are_limited_to_the_exact_refundable_amount(sessions):
    # activities/payments.py refund: refundable = charge - SUM(refunds), all in SQL integers
    provider = SandboxPaymentProvider(sessions)
    await provider.charge("ch", "SO-1", "CUST-1", BIG, "EUR")
    await provider.refund("re1", "SO-1", "ch", BIG - CENT, "EUR")
    await provider.refund("re2", "SO-1", "ch", CENT, "EUR")
    with pytest.raises(PaymentDeclinedError, match=r"exceeds the refundable 0\.00"):
        await provider.refund("re3", "SO-1", "ch", CENT, "EUR")
    assert await _amounts(sessions) == [str(BIG), "99999999999999.73", "0.01"]


async def _hold(sessions: async_sessionmaker, quantity: Decimal | int) -> bool:
    """activities/warehouse.py's check-and-hold: held only if on_hand - reserved >= quantity."""
    async with sessions.begin() as session:
        result = await session.execute(
            update(StockItem)
            .where(StockItem.sku == "SKU-A", StockItem.on_hand - StockItem.reserved >= quantity)
            .values(reserved=StockItem.reserved + quantity)
        )
        return result.rowcount == 1


async def test_stock_arithmetic_in_sql_stays_in_thousandths(sessions):
    async with sessions.begin() as session:
        session.add(StockItem(sku="SKU-A", on_hand=Decimal("10.5"), reserved=Decimal("1.25")))
    # 9.25 available (9250 thousandths): were the bound of `on_hand - reserved >= x` taken as
    # units, 10 would fit
    assert not await _hold(sessions, 10)
    assert not await _hold(sessions, Decimal("9.251"))
    assert await _hold(sessions, Decimal("9.25"))
    assert not await _hold(sessions, Decimal("0.001"))
    async with sessions() as session:
        item = await session.get(StockItem, "SKU-A")
    assert item is not None and str(item.reserved) == "10.500"
    with pytest.raises(NotImplementedError, match="mul"):
        _ = StockItem.on_hand * OrderLine.unit_price
    with pytest.raises(NotImplementedError, match="truediv"):
        _ = Order.amount / 2


@pytest.mark.parametrize(
    ("model", "field", "value", "message"),
    [
        (LedgerEntry, "amount", Decimal("0.001"), "more than 2 decimal places"),
        (LedgerEntry, "amount", Decimal("12.345"), "more than 2 decimal places"),
        (LedgerEntry, "amount", Decimal("1e16"), "beyond the range of 16 digits"),
        (LedgerEntry, "amount", Decimal("-1e16"), "beyond the range of 16 digits"),
        (LedgerEntry, "amount", 10**16, "beyond the range of 16 digits"),
        (LedgerEntry, "amount", 0.1, "not an exact amount"),
        (LedgerEntry, "amount", Decimal("NaN"), "not a finite amount"),
        (StockItem, "on_hand", Decimal("0.0001"), "more than 3 decimal places"),
        (StockItem, "on_hand", Decimal("1e15"), "beyond the range of 15 digits"),
    ],
)
async def test_values_that_cannot_be_stored_exactly_are_refused(
    sessions, model, field, value, message
):
    row: LedgerEntry | StockItem
    if model is LedgerEntry:
        row = _ledger("bad", CENT)
    else:
        row = StockItem(sku="SKU-BAD", on_hand=Decimal(1), reserved=Decimal(0))
    setattr(row, field, value)
    with pytest.raises(StatementError, match=message) as raised:
        async with sessions.begin() as session:
            session.add(row)
    assert isinstance(raised.value.orig, ValueError)
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(model)) == 0


def test_conversion_to_minor_units_is_exact_at_the_edges():
    assert to_minor_units(Decimal("9999999999999999.99"), 2, 18) == 10**18 - 1
    assert to_minor_units(Decimal("-9999999999999999.99"), 2, 18) == -(10**18) + 1
    assert to_minor_units(Decimal("1.230000"), 2, 18) == 123  # trailing zeros are exact
    assert to_minor_units(Decimal("0E-40"), 2, 18) == 0
    assert to_minor_units(Decimal("5E+3"), 2, 18) == 500000
    # more digits than the default decimal context (28) keeps: still refused, not rounded
    with pytest.raises(ValueError, match="decimal places"):
        to_minor_units(Decimal("1.000000000000000000000000000001"), 2, 18)
    with pytest.raises(ValueError, match="decimal places"):
        to_minor_units(Decimal("1E-999999999"), 2, 18)
    assert to_minor_units(Decimal("-12.341"), 2, 18, "ceiling") == -1234
    assert to_minor_units(Decimal("-12.341"), 2, 18, "floor") == -1235
    assert to_minor_units(Decimal("12.341"), 2, 18, "ceiling") == 1235
    assert to_minor_units(Decimal("12.341"), 2, 18, "floor") == 1234
