"""Policy documents (versioned business rules) validated by pydantic.

A document is stored as JSON in the policy_versions table; an instance loads the current
version at start through an activity and keeps it for its whole life. Version 0 means the
built-in defaults below (no version published yet).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ApprovalTier(BaseModel):
    """Orders with amount_due >= min_amount need this level (levels run lowest first)."""

    model_config = ConfigDict(extra="forbid")

    min_amount: Decimal = Field(ge=0)
    name: str
    roles: list[str] = Field(min_length=1)
    mode: Literal["sequential", "all", "k_of_n"] = Field(
        "sequential",
        description="sequential: one task for the roles; all: one task per role, all must "
        "approve; k_of_n: one task per role, k approvals suffice",
    )
    k: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _k_fits(self) -> ApprovalTier:
        if self.mode == "k_of_n" and (self.k is None or self.k > len(self.roles)):
            raise ValueError("k_of_n needs 1 <= k <= number of roles")
        return self


class TaskTimers(BaseModel):
    """When a human task reminds, escalates (SLA) and finally times out."""

    model_config = ConfigDict(extra="forbid")

    remind_after: timedelta = timedelta(days=1)
    escalate_after: timedelta = timedelta(days=2)
    deadline: timedelta = timedelta(days=7)
    escalation_role: str = "manager"

    @model_validator(mode="after")
    def _ordered(self) -> TaskTimers:
        if not (self.remind_after <= self.escalate_after <= self.deadline):
            raise ValueError("remind_after <= escalate_after <= deadline is required")
        return self


class SalesOrderPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approval_tiers: list[ApprovalTier] = Field(
        default_factory=lambda: [
            ApprovalTier(
                min_amount=Decimal(500_000),
                name="vice-president approval",
                roles=["vice-president"],
            ),
            ApprovalTier(
                min_amount=Decimal(1_000_000),
                name="sales director approval",
                roles=["sales-director"],
            ),
        ]
    )
    prepaid_exempt_from_approval: bool = True
    loyalty_discount_pct: Decimal = Field(Decimal(5), ge=0, le=100)
    approval_timers: TaskTimers = Field(default_factory=TaskTimers)
    acknowledgement_timers: TaskTimers = Field(
        default_factory=lambda: TaskTimers(
            remind_after=timedelta(hours=8),
            escalate_after=timedelta(days=1),
            deadline=timedelta(days=5),
        )
    )
    special_change_roles: list[str] = Field(
        default_factory=lambda: ["procurement", "production", "inspection"], min_length=1
    )
    payment_deadline: timedelta = Field(
        timedelta(days=14), description="prepaid orders are cancelled if unpaid by then"
    )
    payment_reminder_after: timedelta = timedelta(days=3)

    @field_validator("approval_tiers")
    @classmethod
    def _sorted(cls, tiers: list[ApprovalTier]) -> list[ApprovalTier]:
        return sorted(tiers, key=lambda t: t.min_amount)


POLICY_MODELS: Mapping[str, type[BaseModel]] = MappingProxyType({"sales_order": SalesOrderPolicy})


def default_policy_document(process_type: str) -> dict:
    return POLICY_MODELS[process_type]().model_dump(mode="json")


def validate_policy(process_type: str, document: dict) -> BaseModel:
    """Raise KeyError for an unknown process type, pydantic.ValidationError for a bad document."""
    return POLICY_MODELS[process_type].model_validate(document)
