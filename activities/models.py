"""Inputs and outputs of every activity: the contract between workflows and side effects.

Workflows import this module (passed through the sandbox); it must stay free of I/O.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, Field


class PolicyRequest(BaseModel):
    process_type: str


class PolicyDocument(BaseModel):
    """A versioned policy: the raw document is validated by the process that uses it."""

    process_type: str
    version: int
    document: dict[str, Any]


class OrderLineRecord(BaseModel):
    line_no: int
    sku: str
    description: str = ""
    quantity: Decimal
    unit_price: Decimal


class OrderRecord(BaseModel):
    order_no: str
    workflow_id: str
    customer_id: str
    customer_name: str
    customer_email: str
    requester: str
    variant: str
    currency: str
    amount: Decimal
    amount_due: Decimal
    stage: str
    policy_version: int
    special_change: bool = False
    lines: list[OrderLineRecord]


class StageChange(BaseModel):
    """Update the order's stage in the read model (idempotent: last write by revision wins)."""

    order_no: str
    stage: str
    revision: int
    special_change: bool = False
    at: datetime


class TaskSnapshot(BaseModel):
    """The whole projection of one human task; upserted, never older over newer (revision)."""

    task_id: str
    workflow_id: str
    process_type: str
    business_key: str
    name: str
    kind: str
    candidate_roles: list[str]
    assignee: str | None
    requester: str
    outcomes: list[str]
    status: Literal["open", "closed"]
    outcome: str | None = None
    decided_by: str | None = None
    due_at: datetime | None = None
    escalated: bool = False
    created_at: datetime
    closed_at: datetime | None = None
    revision: int


class AuditRecord(BaseModel):
    event_key: str = Field(description="idempotency key: workflow id + event sequence")
    workflow_id: str
    task_id: str | None = None
    actor: str
    action: str
    comment: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    at: datetime


class Notification(BaseModel):
    """A mail to users (by name), roles (all active users holding them) and/or addresses."""

    idempotency_key: str
    workflow_id: str
    to_users: list[str] = Field(default_factory=list)
    to_roles: list[str] = Field(default_factory=list)
    to_emails: list[str] = Field(default_factory=list)
    subject: str
    body: str


class ProjectionBatch(BaseModel):
    """Several read-model writes, and the mails of the step, applied in one transaction."""

    order: OrderRecord | None = None
    stage: StageChange | None = None
    tasks: list[TaskSnapshot] = Field(default_factory=list)
    audit: list[AuditRecord] = Field(default_factory=list)
    mails: list[Notification] = Field(default_factory=list)  # queued in the outbox


class NotificationResult(BaseModel):
    recipients: list[str]
    sent: bool
    duplicate: bool = False


class PaymentRequest(BaseModel):
    idempotency_key: str
    order_no: str
    customer_id: str
    amount: Decimal
    currency: str


class PaymentResult(BaseModel):
    idempotency_key: str
    provider_ref: str
    amount: Decimal
    status: Literal["captured", "refunded", "received"]
    duplicate: bool = False


class RefundRequest(BaseModel):
    idempotency_key: str
    order_no: str
    original_key: str
    amount: Decimal
    currency: str


class IncomingPayment(BaseModel):
    """A payment the provider reports as received (prepaid orders); keyed by its event id."""

    event_id: str
    order_no: str
    amount: Decimal
    currency: str


class StockRequest(BaseModel):
    order_no: str
    lines: list[OrderLineRecord]


class StockResult(BaseModel):
    order_no: str
    reserved: dict[str, Decimal]


class ShipmentRequest(BaseModel):
    order_no: str


class ShipmentResult(BaseModel):
    order_no: str
    tracking_no: str


class InvoiceRequest(BaseModel):
    order_no: str
    amount: Decimal
    currency: str


class InvoiceResult(BaseModel):
    invoice_no: str
    order_no: str
    amount: Decimal


# Typed business errors (ApplicationError.type) that activities raise and workflows handle.
PAYMENT_DECLINED = "PaymentDeclined"
PROVIDER_UNAVAILABLE = "PaymentProviderUnavailable"
OUT_OF_STOCK = "OutOfStock"
POLICY_INVALID = "PolicyInvalid"
# a provider event already booked for another order, amount or currency: counted nowhere
PAYMENT_EVENT_CONFLICT = "PaymentEventConflict"
NON_RETRYABLE_ERRORS = (PAYMENT_DECLINED, OUT_OF_STOCK, POLICY_INVALID, PAYMENT_EVENT_CONFLICT)
