"""Request and response bodies of the API that are not workflow models themselves.

Request bodies forbid unknown fields: the acting user always comes from the credentials, so
an `actor`, `requester` or `status` field in a body is a 422.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from workflows.human_task import Actor


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


# ------------------------------------------------------------------------------ query strings
# the largest offset of a list page (deeper pages are 422, not an overflowing query)
MAX_OFFSET = 1_000_000


def _printable(value: str) -> str:
    """Refuse control and format characters (NUL, newlines, bidi marks): no stored value holds
    one, and some backends refuse them with an error of their own."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cf"):
            raise PydanticCustomError(
                "string_control_character",
                "control characters are not allowed (U+{code})",
                {"code": f"{ord(ch):04X}"},
            )
    return value


QueryText = Annotated[str, AfterValidator(_printable)]
"""A string query parameter; give its bounds with Query(max_length=...)."""


# ------------------------------------------------------------------------------ errors
class ErrorOut(BaseModel):
    detail: str


# ------------------------------------------------------------------------------ auth
class Principal(BaseModel):
    """The authenticated caller; roles come from the users table, not from the token."""

    username: str
    display_name: str
    email: str
    roles: list[str]

    @property
    def actor(self) -> Actor:
        return Actor(username=self.username, roles=list(self.roles))

    @property
    def requester_only(self) -> bool:
        """True for a user whose only role is requester: they see only their own records."""
        return set(self.roles) <= {"requester"}


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="seconds until the token expires")
    roles: list[str]


# ------------------------------------------------------------------------------ orders
class AmendBody(Body):
    description: str = Field(min_length=1, max_length=2000, description="what changes")


class CancelBody(Body):
    reason: str = Field(min_length=1, max_length=2000)


class MigrateBody(Body):
    version: str = Field(
        "current",
        min_length=1,
        max_length=80,
        description="the target version: its `sha256:...` name, or `current`",
    )
    reason: str = Field("", max_length=2000, description="why (kept in the audit log)")


class PaymentBody(Body):
    event_id: str = Field(min_length=1, max_length=200, description="provider's event id")
    amount: Decimal = Field(gt=0, lt=Decimal("1e14"), max_digits=16, decimal_places=2)


class Accepted(BaseModel):
    accepted: bool = True


class PaymentReceipt(Accepted):
    """What a reported payment did to the order; figures as the ledger holds them now."""

    event_id: str
    duplicate: bool = Field(False, description="the event was recorded before: nothing changed")
    paid: Decimal
    refunded: Decimal
    balance: Decimal = Field(description="still owed (> 0) or owed back to the customer (< 0)")


class OrderSummary(BaseModel):
    """One order from the read model."""

    model_config = ConfigDict(from_attributes=True)

    order_no: str
    workflow_id: str
    customer_id: str
    customer_name: str
    requester: str
    variant: str
    currency: str
    amount: Decimal
    amount_due: Decimal
    special_change: bool
    stage: str
    policy_version: int
    created_at: datetime
    updated_at: datetime


class OrderPage(BaseModel):
    items: list[OrderSummary]
    total: int
    limit: int
    offset: int


class OrderSearchHit(BaseModel):
    """One order as Temporal visibility reports it (eventually consistent)."""

    workflow_id: str
    order_no: str
    stage: str | None
    customer_id: str | None
    amount: float | None
    status: str | None = Field(description="execution status: RUNNING, COMPLETED, ...")


class OrderSearchPage(BaseModel):
    items: list[OrderSearchHit]
    query: str = Field(description="the visibility query that was run")
    limit: int
    offset: int


# ------------------------------------------------------------------------------ processes
class ProcessHit(BaseModel):
    """One instance of any process type as Temporal visibility reports it (eventually
    consistent)."""

    process_type: str | None
    business_key: str
    workflow_id: str
    stage: str | None
    status: str | None = Field(description="execution status: RUNNING, COMPLETED, ...")
    requester: str | None
    customer_id: str | None
    pending_roles: list[str] = Field(description="the roles the instance waits for")
    started_at: datetime | None
    closed_at: datetime | None


class ProcessPage(BaseModel):
    items: list[ProcessHit]
    query: str = Field(description="the visibility query that was run")
    limit: int
    next_page_token: str | None = Field(
        description="pass as page_token for the next page of the same search; null: no more"
    )


class EventReceipt(Accepted):
    """What an external event did: the outcome its update answered, or for a duplicate (the
    event was reported before: nothing changed) what the type reports of it."""

    event: str
    duplicate: bool = False
    outcome: Any = None


# ------------------------------------------------------------------------------ tasks
class DecisionBody(Body):
    outcome: str = Field(min_length=1, max_length=32)
    comment: str = Field("", max_length=4000)
    fields: dict[str, str] = Field(default_factory=dict)


class CommentBody(Body):
    comment: str = Field("", max_length=4000)


class DelegateBody(Body):
    to_user: str = Field(min_length=1, max_length=64)
    comment: str = Field("", max_length=4000)


class ReassignBody(Body):
    to_user: str | None = Field(None, max_length=64, description="null puts it back in the pool")
    comment: str = Field("", max_length=4000)


class TaskOut(BaseModel):
    """A human task from the read model."""

    model_config = ConfigDict(from_attributes=True)

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
    status: str
    outcome: str | None
    decided_by: str | None
    due_at: datetime | None
    escalated: bool
    created_at: datetime
    closed_at: datetime | None
    taken: bool = Field(False, description="assigned to someone other than the caller")


class TaskPage(BaseModel):
    items: list[TaskOut]
    total: int | None = Field(description="every matching task; null when asked with count=false")
    limit: int
    offset: int


# ------------------------------------------------------------------------------ policies
class PolicyOut(BaseModel):
    process_type: str
    version: int = Field(description="0: built-in defaults, nothing published yet")
    document: dict[str, Any]
    published_by: str | None = None
    published_at: datetime | None = None
    note: str = ""


class PublishPolicyBody(Body):
    document: dict[str, Any]
    note: str = Field("", max_length=2000)


class PublishedPolicy(BaseModel):
    process_type: str
    version: int


# ------------------------------------------------------------------------------ health
class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unavailable"] | None = None
    temporal: Literal["ok", "unavailable"] | None = None
