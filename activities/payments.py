"""Payment activities and the embedded sandbox payment provider.

The sandbox keeps its charges in the payments_ledger table; the unique idempotency key makes a
retried charge return the first charge instead of charging twice. The activities record each
charge or refund a provider declines in payment_declines (once per key), never in the ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.models import (
    PAYMENT_DECLINED,
    PAYMENT_EVENT_CONFLICT,
    PROVIDER_UNAVAILABLE,
    IncomingPayment,
    PaymentRequest,
    PaymentResult,
    RefundRequest,
)
from core.db import DECLINE_REASON_LENGTH, LedgerEntry, Money, PaymentDecline, to_minor_units

log = logging.getLogger(__name__)


class PaymentDeclinedError(Exception):
    """The provider refused the charge or refund (a business outcome, never retried)."""


class ProviderUnavailableError(Exception):
    """The provider could not be reached or its answer was lost (retried)."""


class PaymentProvider(Protocol):
    """`workflow_id` names the instance the money belongs to (the ledger is keyed by it)."""

    async def charge(
        self,
        key: str,
        order_no: str,
        customer_id: str,
        amount: Decimal,
        currency: str,
        *,
        workflow_id: str | None = None,
    ) -> str: ...

    async def refund(
        self,
        key: str,
        order_no: str,
        original_key: str,
        amount: Decimal,
        currency: str,
        *,
        workflow_id: str | None = None,
    ) -> str: ...


def _workflow_id() -> str | None:
    """The workflow id of the running activity (None outside an activity)."""
    try:
        return activity.info().workflow_id
    except RuntimeError:  # not in an activity context
        return None


def _ref(prefix: str, key: str) -> str:
    return f"{prefix}_{hashlib.sha256(key.encode()).hexdigest()[:24]}"


async def _ledger_row(sessions: async_sessionmaker, key: str) -> LedgerEntry | None:
    async with sessions() as session:
        return (
            await session.execute(select(LedgerEntry).where(LedgerEntry.idempotency_key == key))
        ).scalar_one_or_none()


async def _insert_once(
    sessions: async_sessionmaker, entry: LedgerEntry
) -> tuple[LedgerEntry, bool]:
    """Insert entry; if its key exists (also after a lost race) return the stored row, True."""
    existing = await _ledger_row(sessions, entry.idempotency_key)
    if existing is not None:
        return existing, True
    try:
        async with sessions.begin() as session:
            session.add(entry)
    except IntegrityError:
        existing = await _ledger_row(sessions, entry.idempotency_key)
        if existing is None:
            raise
        return existing, True
    return entry, False


# a run of 12 or more digits, spaces or dashes between them allowed: a card number, perhaps
_LONG_DIGITS = re.compile(r"\d(?:[ -]?\d){11,}")


def decline_reason(err: BaseException) -> str:
    """The provider's message as stored with a decline: on one line, digit runs as long as a
    card number masked, cut to DECLINE_REASON_LENGTH."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = _LONG_DIGITS.sub("[masked]", text)
    if len(text) > DECLINE_REASON_LENGTH:
        text = text[: DECLINE_REASON_LENGTH - 3] + "..."
    return text


async def _decline_row(sessions: async_sessionmaker, key: str) -> PaymentDecline | None:
    async with sessions() as session:
        return (
            await session.execute(
                select(PaymentDecline).where(PaymentDecline.idempotency_key == key)
            )
        ).scalar_one_or_none()


async def record_decline(
    sessions: async_sessionmaker,
    *,
    key: str,
    order_no: str,
    kind: str,
    amount: Decimal,
    currency: str,
    err: PaymentDeclinedError,
) -> bool:
    """Store the decline of the charge or refund `key` once: True if this call stored it,
    False if a row for the key was there (an activity run again after a crash keeps the
    first). A database error propagates (the activity is retried; the provider is idempotent
    by key). An amount the ledger's Money type cannot hold exactly is not stored (logged):
    it must not turn the decline into another error."""
    try:
        to_minor_units(amount, Money.scale, Money.precision)
    except ValueError:
        activity.logger.warning(
            "%s %s declined, not recorded: its amount cannot be stored exactly",
            kind,
            key,
        )
        return False
    if await _decline_row(sessions, key) is not None:
        activity.logger.info("%s %s: its decline is recorded already", kind, key)
        return False
    row = PaymentDecline(
        idempotency_key=key,
        workflow_id=_workflow_id(),
        order_no=order_no,
        kind=kind,
        amount=amount,
        currency=currency,
        reason=decline_reason(err),
    )
    try:
        async with sessions.begin() as session:
            session.add(row)
    except IntegrityError:
        if await _decline_row(sessions, key) is None:
            raise  # not the key: a real constraint failure
        activity.logger.info("%s %s: its decline is recorded already", kind, key)
        return False
    return True


class SandboxPaymentProvider:
    """A faithful fake provider: idempotent by key, with scripted declines, outages, crashes."""

    def __init__(
        self,
        session_factory: async_sessionmaker,
        decline_customers: Iterable[str] = frozenset(),
        outages: int = 0,
        crash_after_charge: int = 0,
        pause_before_charge_s: float = 0.0,
        pause_after_charge_s: float = 0.0,
    ) -> None:
        self.session_factory = session_factory
        self.decline_customers: set[str] = set(decline_customers)
        self.outages = outages
        self.crash_after_charge = crash_after_charge
        # Fault-test hooks: hold a new charge open before the provider is called, or after the
        # charge committed but before the answer returns, so a test can kill the worker there.
        self.pause_before_charge_s = pause_before_charge_s
        self.pause_after_charge_s = pause_after_charge_s

    async def _pause(self, seconds: float, where: str, key: str) -> None:
        if seconds > 0:
            log.warning("sandbox fault hook: pausing %.1f s %s charge %s", seconds, where, key)
            await asyncio.sleep(seconds)

    def _maybe_outage(self) -> None:
        if self.outages > 0:
            self.outages -= 1
            raise ProviderUnavailableError("sandbox provider unavailable")

    async def charge(
        self,
        key: str,
        order_no: str,
        customer_id: str,
        amount: Decimal,
        currency: str,
        *,
        workflow_id: str | None = None,
    ) -> str:
        self._maybe_outage()
        existing = await _ledger_row(self.session_factory, key)
        if existing is not None:
            return existing.provider_ref
        await self._pause(self.pause_before_charge_s, "before", key)
        if customer_id in self.decline_customers:
            raise PaymentDeclinedError(f"card of customer {customer_id} declined")
        if amount <= 0:
            raise PaymentDeclinedError(f"invalid charge amount {amount}")
        entry, _ = await _insert_once(
            self.session_factory,
            LedgerEntry(
                idempotency_key=key,
                order_no=order_no,
                workflow_id=workflow_id,
                kind="charge",
                amount=amount,
                currency=currency,
                provider_ref=_ref("ch", key),
                status="captured",
            ),
        )
        await self._pause(self.pause_after_charge_s, "after", key)
        if self.crash_after_charge > 0:
            self.crash_after_charge -= 1
            raise ProviderUnavailableError("sandbox provider charged, but the answer was lost")
        return entry.provider_ref

    async def refund(
        self,
        key: str,
        order_no: str,
        original_key: str,
        amount: Decimal,
        currency: str,
        *,
        workflow_id: str | None = None,
    ) -> str:
        self._maybe_outage()
        existing = await _ledger_row(self.session_factory, key)
        if existing is not None:
            return existing.provider_ref
        original = await _ledger_row(self.session_factory, original_key)
        if original is None or original.kind not in ("charge", "incoming"):
            raise PaymentDeclinedError(f"no payment {original_key} to refund")
        if original.currency != currency:
            raise PaymentDeclinedError(f"refund currency {currency} != {original.currency}")
        async with self.session_factory() as session:
            refunded = (
                await session.execute(
                    select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                        LedgerEntry.original_key == original_key, LedgerEntry.kind == "refund"
                    )
                )
            ).scalar_one()
        if amount <= 0 or amount > original.amount - Decimal(refunded):
            raise PaymentDeclinedError(
                f"refund {amount} exceeds the refundable {original.amount - Decimal(refunded)}"
            )
        entry, _ = await _insert_once(
            self.session_factory,
            LedgerEntry(
                idempotency_key=key,
                order_no=order_no,
                workflow_id=workflow_id,
                kind="refund",
                original_key=original_key,
                amount=amount,
                currency=currency,
                provider_ref=_ref("re", key),
                status="refunded",
            ),
        )
        return entry.provider_ref


def _declined(err: PaymentDeclinedError) -> ApplicationError:
    return ApplicationError(str(err), type=PAYMENT_DECLINED, non_retryable=True)


def _unavailable(err: ProviderUnavailableError) -> ApplicationError:
    return ApplicationError(str(err), type=PROVIDER_UNAVAILABLE)


class PaymentActivities:
    def __init__(self, provider: PaymentProvider, session_factory: async_sessionmaker) -> None:
        self._provider = provider
        self._sessions = session_factory

    async def _record_decline(
        self, kind: str, request: PaymentRequest | RefundRequest, err: PaymentDeclinedError
    ) -> None:
        """Store the decline (once per key) before the activity raises PaymentDeclined."""
        await record_decline(
            self._sessions,
            key=request.idempotency_key,
            order_no=request.order_no,
            kind=kind,
            amount=request.amount,
            currency=request.currency,
            err=err,
        )

    @activity.defn(name="capture_payment")
    async def capture_payment(self, request: PaymentRequest) -> PaymentResult:
        """Charge the customer once per idempotency key."""
        duplicate = await _ledger_row(self._sessions, request.idempotency_key) is not None
        try:
            ref = await self._provider.charge(
                request.idempotency_key,
                request.order_no,
                request.customer_id,
                request.amount,
                request.currency,
                workflow_id=_workflow_id(),
            )
        except PaymentDeclinedError as err:
            activity.logger.info(
                "charge %s declined: %s", request.idempotency_key, decline_reason(err)
            )
            await self._record_decline("charge", request, err)
            raise _declined(err) from err
        except ProviderUnavailableError as err:
            activity.logger.warning("charge %s: provider unavailable", request.idempotency_key)
            raise _unavailable(err) from err
        return PaymentResult(
            idempotency_key=request.idempotency_key,
            provider_ref=ref,
            amount=request.amount,
            status="captured",
            duplicate=duplicate,
        )

    @activity.defn(name="refund_payment")
    async def refund_payment(self, request: RefundRequest) -> PaymentResult:
        """Refund (part of) an earlier charge once per idempotency key."""
        duplicate = await _ledger_row(self._sessions, request.idempotency_key) is not None
        try:
            ref = await self._provider.refund(
                request.idempotency_key,
                request.order_no,
                request.original_key,
                request.amount,
                request.currency,
                workflow_id=_workflow_id(),
            )
        except PaymentDeclinedError as err:
            activity.logger.info(
                "refund %s refused: %s", request.idempotency_key, decline_reason(err)
            )
            await self._record_decline("refund", request, err)
            raise _declined(err) from err
        except ProviderUnavailableError as err:
            activity.logger.warning("refund %s: provider unavailable", request.idempotency_key)
            raise _unavailable(err) from err
        return PaymentResult(
            idempotency_key=request.idempotency_key,
            provider_ref=ref,
            amount=request.amount,
            status="refunded",
            duplicate=duplicate,
        )

    @activity.defn(name="record_incoming_payment")
    async def record_incoming_payment(self, payment: IncomingPayment) -> PaymentResult:
        """Book a payment the provider reported as received, once per provider event."""
        key = f"incoming:{payment.event_id}"
        entry, duplicate = await _insert_once(
            self._sessions,
            LedgerEntry(
                idempotency_key=key,
                order_no=payment.order_no,
                workflow_id=_workflow_id(),
                kind="incoming",
                amount=payment.amount,
                currency=payment.currency,
                provider_ref=payment.event_id,
                status="received",
            ),
        )
        if duplicate and (
            entry.order_no != payment.order_no
            or Decimal(entry.amount) != payment.amount
            or entry.currency != payment.currency
        ):
            # one provider event pays one order, once: the same event id elsewhere is refused
            raise ApplicationError(
                f"payment event {payment.event_id} is already booked "
                f"({entry.amount} {entry.currency}) for another order or amount",
                type=PAYMENT_EVENT_CONFLICT,
                non_retryable=True,
            )
        return PaymentResult(
            idempotency_key=key,
            provider_ref=entry.provider_ref,
            amount=Decimal(entry.amount),
            status="received",
            duplicate=duplicate,
        )
