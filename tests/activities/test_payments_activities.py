"""Payment activities against the sandbox provider and its ledger table."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.models import (
    PAYMENT_DECLINED,
    PAYMENT_EVENT_CONFLICT,
    PROVIDER_UNAVAILABLE,
    IncomingPayment,
    PaymentRequest,
    RefundRequest,
)
from core.db import LedgerEntry


def _charge(customer: str = "CUST-1", key: str = "sales-order-SO-1/capture") -> PaymentRequest:
    return PaymentRequest(
        idempotency_key=key,
        order_no="SO-1",
        customer_id=customer,
        amount=Decimal("250.00"),
        currency="EUR",
    )


def _refund(amount: str, key: str = "sales-order-SO-1/refund") -> RefundRequest:
    return RefundRequest(
        idempotency_key=key,
        order_no="SO-1",
        original_key="sales-order-SO-1/capture",
        amount=Decimal(amount),
        currency="EUR",
    )


async def _ledger(sessions: async_sessionmaker) -> list[tuple[str, str, Decimal]]:
    async with sessions() as session:
        rows = (await session.execute(select(LedgerEntry).order_by(LedgerEntry.id))).scalars()
        return [(r.kind, r.idempotency_key, Decimal(r.amount)) for r in rows]


async def test_capture_twice_with_same_key_charges_once(payments, sessions, activity_env):
    first = await activity_env.run(payments.capture_payment, _charge())
    second = await activity_env.run(payments.capture_payment, _charge())
    assert (first.status, first.duplicate) == ("captured", False)
    assert second.duplicate is True
    assert second.provider_ref == first.provider_ref
    assert await _ledger(sessions) == [("charge", "sales-order-SO-1/capture", Decimal("250.00"))]


async def test_charge_whose_answer_was_lost_is_not_repeated_on_retry(
    payments, provider, sessions, activity_env
):
    provider.crash_after_charge = 1
    with pytest.raises(ApplicationError) as lost:
        await activity_env.run(payments.capture_payment, _charge())
    assert lost.value.type == PROVIDER_UNAVAILABLE and not lost.value.non_retryable

    retried = await activity_env.run(payments.capture_payment, _charge())
    assert retried.duplicate is True
    assert [kind for kind, *_ in await _ledger(sessions)] == ["charge"]


async def test_declined_customer_is_a_non_retryable_payment_declined(
    payments, sessions, activity_env
):
    with pytest.raises(ApplicationError) as declined:
        await activity_env.run(payments.capture_payment, _charge(customer="CUST-DECLINE"))
    assert declined.value.type == PAYMENT_DECLINED == "PaymentDeclined"
    assert declined.value.non_retryable is True
    assert await _ledger(sessions) == []


async def test_outage_is_retryable_and_then_succeeds(payments, provider, sessions, activity_env):
    provider.outages = 2
    for _ in range(2):
        with pytest.raises(ApplicationError) as outage:
            await activity_env.run(payments.capture_payment, _charge())
        assert outage.value.type == PROVIDER_UNAVAILABLE
        assert outage.value.non_retryable is False
        assert await _ledger(sessions) == []
    result = await activity_env.run(payments.capture_payment, _charge())
    assert (result.status, result.duplicate, provider.outages) == ("captured", False, 0)


async def test_refund_is_idempotent_and_bounded_by_the_charge(payments, sessions, activity_env):
    await activity_env.run(payments.capture_payment, _charge())
    refund = await activity_env.run(payments.refund_payment, _refund("100.00"))
    again = await activity_env.run(payments.refund_payment, _refund("100.00"))
    assert (refund.status, refund.duplicate, again.duplicate) == ("refunded", False, True)
    assert again.provider_ref == refund.provider_ref

    with pytest.raises(ApplicationError) as too_much:
        await activity_env.run(payments.refund_payment, _refund("150.01", key="refund-2"))
    assert too_much.value.type == PAYMENT_DECLINED and too_much.value.non_retryable
    assert [kind for kind, *_ in await _ledger(sessions)] == ["charge", "refund"]


async def test_refund_of_an_unknown_charge_is_refused(payments, sessions, activity_env):
    with pytest.raises(ApplicationError) as refused:
        await activity_env.run(payments.refund_payment, _refund("10.00"))
    assert refused.value.type == PAYMENT_DECLINED and refused.value.non_retryable
    assert await _ledger(sessions) == []


async def test_incoming_payment_is_recorded_once_per_event(payments, sessions, activity_env):
    event = IncomingPayment(
        event_id="evt-42", order_no="SO-9", amount=Decimal("99.50"), currency="EUR"
    )
    first = await activity_env.run(payments.record_incoming_payment, event)
    second = await activity_env.run(payments.record_incoming_payment, event)
    assert (first.status, first.duplicate, second.duplicate) == ("received", False, True)
    assert first.idempotency_key == "incoming:evt-42"
    assert await _ledger(sessions) == [("incoming", "incoming:evt-42", Decimal("99.50"))]


@pytest.mark.parametrize(
    "other",
    [
        {"order_no": "SO-2"},  # the same event for another order
        {"amount": Decimal("5000.00")},  # the same event with another amount
        {"currency": "USD"},
    ],
)
async def test_an_incoming_event_belongs_to_one_order_and_amount(
    payments, sessions, activity_env, other
):
    event = {"event_id": "E-9080-a", "order_no": "SO-1", "amount": Decimal("100.00")}
    await activity_env.run(
        payments.record_incoming_payment, IncomingPayment(**event, currency="EUR")
    )
    replay = IncomingPayment(**{**event, "currency": "EUR", **other})
    with pytest.raises(ApplicationError) as err:
        await activity_env.run(payments.record_incoming_payment, replay)
    assert err.value.type == PAYMENT_EVENT_CONFLICT and err.value.non_retryable
    assert "E-9080-a" in err.value.message
    assert await _ledger(sessions) == [("incoming", "incoming:E-9080-a", Decimal("100.00"))]


async def test_ledger_rows_carry_the_workflow_id_of_the_activity(payments, sessions):
    """The ledger is keyed by instance: charge, refund and incoming payment all name the
    workflow that booked them; a retried charge from elsewhere keeps the first one's."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id="sales_order-SO-1")
    await env.run(payments.capture_payment, _charge())
    await env.run(payments.refund_payment, _refund("100.00"))
    await env.run(
        payments.record_incoming_payment,
        IncomingPayment(event_id="evt-7", order_no="SO-1", amount=Decimal("5.00"), currency="EUR"),
    )
    other = ActivityEnvironment()
    other.info = dataclasses.replace(other.info, workflow_id="sales_order-SO-2")
    assert (await other.run(payments.capture_payment, _charge())).duplicate

    async with sessions() as session:
        rows = (
            await session.execute(
                select(LedgerEntry.kind, LedgerEntry.workflow_id).order_by(LedgerEntry.id)
            )
        ).all()
        by_instance = (
            await session.scalars(
                select(LedgerEntry.kind).where(LedgerEntry.workflow_id == "sales_order-SO-1")
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("charge", "sales_order-SO-1"),
        ("refund", "sales_order-SO-1"),
        ("incoming", "sales_order-SO-1"),
    ]
    assert sorted(by_instance) == ["charge", "incoming", "refund"]


async def test_the_sandbox_called_outside_an_activity_books_no_workflow_id(provider, sessions):
    await provider.charge("direct", "SO-3", "CUST-1", Decimal("1.00"), "EUR")
    async with sessions() as session:
        entry = (await session.scalars(select(LedgerEntry))).one()
    assert (entry.idempotency_key, entry.workflow_id) == ("direct", None)
