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
    """Update the order's stage in the read model (idempotent: last write by revision wins).

    Written by sales orders before the instance read model; an instance's stage now travels in
    `InstanceRecord` and each entry into a stage in `StageVisitRecord`. Kept so that batches of
    instances running older code still apply."""

    order_no: str
    stage: str
    revision: int
    special_change: bool = False
    at: datetime


InstanceStatus = Literal["running", "completed", "failed", "cancelled", "terminated"]


class InstanceRecord(BaseModel):
    """The whole projection of one process instance (`process_instances`): upserted, never
    older over newer (revision). Any process type, code or blueprint."""

    workflow_id: str
    process_type: str
    business_key: str
    definition_kind: Literal["code", "blueprint"] = "code"
    definition_version: str = Field("", description="blueprint content hash; '' for code")
    policy_version: int | None = None
    stage: str
    status: InstanceStatus = "running"
    requester: str
    owner_role: str | None = None
    started_at: datetime
    stage_entered_at: datetime
    closed_at: datetime | None = None
    revision: int
    summary: dict[str, Any] = Field(
        default_factory=dict, description="small listable fields (customer, amount, ...)"
    )


class StageVisitRecord(BaseModel):
    """One entry into a stage (`stage_visits`), keyed by (workflow id, seq): written when the
    stage is entered and again when it is left (left_at, outcome, by)."""

    workflow_id: str
    seq: int = Field(ge=1, description="the instance's count of stage entries, from the workflow")
    stage: str
    entered_at: datetime
    left_at: datetime | None = None
    outcome: str | None = None
    by: str | None = None


class SlaEventRecord(BaseModel):
    """A reminder, escalation or breach (`sla_events`), keyed by event_key (written once)."""

    event_key: str = Field(description="idempotency key: workflow id + event sequence")
    workflow_id: str
    task_id: str | None = None
    sla: str = Field(description="the task's name or the SLA's name")
    kind: Literal["reminded", "escalated", "breached"]
    at: datetime
    details: dict[str, Any] = Field(default_factory=dict)


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

    instance: InstanceRecord | None = None
    visits: list[StageVisitRecord] = Field(default_factory=list)
    sla_events: list[SlaEventRecord] = Field(default_factory=list)
    order: OrderRecord | None = None  # the sales order's extension row (and its lines)
    stage: StageChange | None = None  # older sales-order code only
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
