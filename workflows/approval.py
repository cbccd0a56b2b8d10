"""Approval chains: ordered levels computed from the policy, each sequential, all-of or k-of-n."""

from __future__ import annotations

from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from workflows.documents import document_error, document_refusal
from workflows.human_task import TIMED_OUT, HumanTask

if TYPE_CHECKING:  # policy.py builds its chains with approval_chain
    from workflows.policy import ApprovalTier

APPROVED = "approved"
REJECTED = "rejected"
APPROVAL_OUTCOMES = (APPROVED, REJECTED)
# A rejection must say why.
APPROVAL_REQUIRED_FIELDS = MappingProxyType({REJECTED: ("comment",)})


class ApprovalLevel(BaseModel):
    name: str
    roles: list[str]
    mode: Literal["sequential", "all", "k_of_n"] = "sequential"
    k: int | None = None

    def task_roles(self) -> list[list[str]]:
        """Candidate roles of each task this level opens."""
        if self.mode == "sequential":
            return [list(self.roles)]
        return [[r] for r in self.roles]

    def needed(self) -> int:
        if self.mode == "sequential":
            return 1
        if self.mode == "all":
            return len(self.roles)
        assert self.k is not None
        return self.k


def check_quorum(mode: str, k: int | None, n: int, *, missing: str, too_large: str) -> None:
    """Refuse (at `k`) a k-of-n level without k or with more than its n roles, and a k on any
    other mode; `missing` is the error type of a missing k, `too_large` ends its message."""
    if mode == "k_of_n" and k is None:
        raise document_refusal(
            "ApprovalTier", [document_error(("k",), missing, "k_of_n needs k", None)]
        )
    if mode == "k_of_n" and k is not None and k > n:
        message = f"k ({k}) exceeds the {n} roles of {too_large}"
        raise document_refusal("ApprovalTier", [document_error(("k",), "k_too_large", message, k)])
    if mode != "k_of_n" and k is not None:
        message = f"k applies to mode k_of_n only, not {mode}"
        raise document_refusal("ApprovalTier", [document_error(("k",), "k_unused", message, k)])


def approval_chain(tiers: list[ApprovalTier], amount: Decimal) -> list[ApprovalLevel]:
    """Levels the amount needs, lowest threshold first."""
    return [
        ApprovalLevel(name=t.name, roles=t.roles, mode=t.mode, k=t.k)
        for t in sorted(tiers, key=lambda t: t.min_amount)
        if amount >= t.min_amount
    ]


def level_outcome(level: ApprovalLevel, tasks: list[HumanTask]) -> str | None:
    """approved / rejected / timed_out once decided, None while it can still go either way."""
    approvals = sum(1 for t in tasks if t.outcome == APPROVED)
    if approvals >= level.needed():
        return APPROVED
    still_open = sum(1 for t in tasks if t.is_open)
    if approvals + still_open >= level.needed():
        return None
    # it can no longer reach the quorum: the first refusal decides how it failed
    refusals = sorted(
        (t for t in tasks if t.outcome not in (None, APPROVED)),
        key=lambda t: (t.closed_at, t.task_id),
    )
    return REJECTED if refusals[0].outcome != TIMED_OUT else TIMED_OUT
