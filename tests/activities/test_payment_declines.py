"""Declined charges and refunds (issue 14): PaymentActivities records each in payment_declines,
once per idempotency key and never in the payments ledger, before it raises PaymentDeclined;
with the sandbox and with any other provider."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import activities.payments as payments_module
from activities.models import PAYMENT_DECLINED, PaymentRequest, RefundRequest
from activities.payments import (
    PaymentActivities,
    PaymentDeclinedError,
    decline_reason,
)
from core.db import DECLINE_REASON_LENGTH, LedgerEntry, PaymentDecline

WORKFLOW_ID = "sales_order-SO-1"
KEY = "sales_order-SO-1:installment-1"


def _charge(customer: str = "CUST-DECLINE", key: str = KEY, amount: str = "250.00"):
    return PaymentRequest(
        idempotency_key=key,
        order_no="SO-1",
        customer_id=customer,
        amount=Decimal(amount),
        currency="EUR",
    )


def _refund(amount: str, key: str = "sales_order-SO-1:refund", original: str = KEY):
    return RefundRequest(
        idempotency_key=key,
        order_no="SO-1",
        original_key=original,
        amount=Decimal(amount),
        currency="EUR",
    )


def _env(workflow_id: str = WORKFLOW_ID) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id=workflow_id)
    return env


async def _declines(sessions: async_sessionmaker) -> list[PaymentDecline]:
    async with sessions() as session:
        return list(
            (await session.scalars(select(PaymentDecline).order_by(PaymentDecline.id))).all()
        )


async def _ledger_keys(sessions: async_sessionmaker) -> list[str]:
    async with sessions() as session:
        return list((await session.scalars(select(LedgerEntry.idempotency_key))).all())


async def _declined(env: ActivityEnvironment, fn, request) -> ApplicationError:  # type: ignore[no-untyped-def]
    with pytest.raises(ApplicationError) as err:
        await env.run(fn, request)
    assert err.value.type == PAYMENT_DECLINED and err.value.non_retryable is True
    return err.value


async def test_a_declined_charge_is_recorded_once_and_not_in_the_ledger(payments, sessions):
    await _declined(_env(), payments.capture_payment, _charge())

    [row] = await _declines(sessions)
    assert (row.idempotency_key, row.kind, row.order_no) == (KEY, "charge", "SO-1")
    assert (row.amount, row.currency, row.workflow_id) == (Decimal("250.00"), "EUR", WORKFLOW_ID)
    assert row.reason == "card of customer CUST-DECLINE declined"
    assert row.created_at.tzinfo is not None
    assert await _ledger_keys(sessions) == []


async def test_the_same_key_declined_again_keeps_the_first_row(payments, sessions):
    """The activity run again after a crash (here from another workflow id, for a larger
    amount): still PaymentDeclined, and the first decline stays the only one."""
    await _declined(_env(), payments.capture_payment, _charge())
    await _declined(_env("sales_order-SO-2"), payments.capture_payment, _charge(amount="9.99"))

    [row] = await _declines(sessions)
    assert (row.workflow_id, row.amount) == (WORKFLOW_ID, Decimal("250.00"))
    assert await _ledger_keys(sessions) == []


async def test_a_decline_stored_by_a_concurrent_run_is_no_error(
    payments, sessions, monkeypatch: pytest.MonkeyPatch
):
    """The row appears between the look-up and the insert (a run beside this one): the
    unique key refuses the insert and the activity still raises PaymentDeclined."""
    await _declined(_env(), payments.capture_payment, _charge())
    looked_up = payments_module._decline_row

    async def missed_once(session_factory, key):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(payments_module, "_decline_row", looked_up)
        return None

    monkeypatch.setattr(payments_module, "_decline_row", missed_once)
    await _declined(_env("sales_order-SO-2"), payments.capture_payment, _charge())

    assert payments_module._decline_row is looked_up  # the insert was tried and refused
    assert [r.workflow_id for r in await _declines(sessions)] == [WORKFLOW_ID]


async def test_declined_refunds_are_recorded_as_refunds(payments, sessions):
    # a refund of a charge that does not exist, and one beyond what a charge can give back
    await _declined(_env(), payments.refund_payment, _refund("10.00", original="no-such-charge"))
    charged = await _env().run(payments.capture_payment, _charge(customer="CUST-1", key="ch-2"))
    assert charged.status == "captured"
    too_much = _refund("250.01", key="sales_order-SO-1:refund-2", original="ch-2")
    await _declined(_env(), payments.refund_payment, too_much)

    rows = await _declines(sessions)
    assert [(r.idempotency_key, r.kind, r.amount) for r in rows] == [
        ("sales_order-SO-1:refund", "refund", Decimal("10.00")),
        ("sales_order-SO-1:refund-2", "refund", Decimal("250.01")),
    ]
    assert all(r.workflow_id == WORKFLOW_ID and r.currency == "EUR" for r in rows)
    assert "exceeds the refundable 250.00" in rows[1].reason
    assert await _ledger_keys(sessions) == ["ch-2"]


async def test_a_successful_charge_and_refund_record_no_decline(payments, sessions):
    await _env().run(payments.capture_payment, _charge(customer="CUST-1"))
    await _env().run(payments.refund_payment, _refund("100.00"))
    assert await _declines(sessions) == []
    assert sorted(await _ledger_keys(sessions)) == sorted([KEY, "sales_order-SO-1:refund"])


class DecliningProvider:
    """Another provider: declines every charge and refund with its own message."""

    def __init__(self, message: str) -> None:
        self.message = message

    async def charge(self, key, order_no, customer_id, amount, currency, *, workflow_id=None):  # type: ignore[no-untyped-def]
        raise PaymentDeclinedError(self.message)

    async def refund(self, key, order_no, original_key, amount, currency, *, workflow_id=None):  # type: ignore[no-untyped-def]
        raise PaymentDeclinedError(self.message)


async def test_any_provider_declines_are_recorded_without_card_data(sessions):
    message = "do not honour: card 4111 1111 1111 1111 expired\n" + "x" * 500
    payments = PaymentActivities(DecliningProvider(message), sessions)

    await _declined(_env(), payments.capture_payment, _charge(customer="CUST-1"))
    await _declined(_env(), payments.refund_payment, _refund("5.00"))

    rows = await _declines(sessions)
    assert [r.kind for r in rows] == ["charge", "refund"]
    for row in rows:
        assert "4111" not in row.reason and "[masked]" in row.reason
        assert row.reason.startswith("do not honour: card [masked] expired x")
        assert len(row.reason) == DECLINE_REASON_LENGTH and row.reason.endswith("...")
    assert await _ledger_keys(sessions) == []


def test_decline_reason_keeps_short_messages_and_order_numbers() -> None:
    assert decline_reason(PaymentDeclinedError("no payment SO-12 to refund")) == (
        "no payment SO-12 to refund"
    )
    assert decline_reason(PaymentDeclinedError("")) == "PaymentDeclinedError"
    assert decline_reason(PaymentDeclinedError("pan 5500-0000-0000-0004")) == "pan [masked]"


async def test_an_amount_the_table_cannot_hold_leaves_the_decline_a_decline(sessions):
    """A provider declining an amount of thousandths: not recorded (cents only), and the
    activity still raises PaymentDeclined rather than another error."""
    payments = PaymentActivities(DecliningProvider("invalid amount"), sessions)
    await _declined(_env(), payments.capture_payment, _charge(amount="10.005"))
    assert await _declines(sessions) == []


async def test_a_database_error_while_recording_propagates(payments, sessions):
    """Not a PaymentDeclined: the activity is retried (the provider is idempotent by key)."""
    async with sessions.begin() as session:
        await session.execute(text("DROP TABLE payment_declines"))

    with pytest.raises(DBAPIError):
        await _env().run(payments.capture_payment, _charge())
    assert await _ledger_keys(sessions) == []
