"""The role names the system knows: users hold them, the API requires them, policies name them."""

from __future__ import annotations

KNOWN_ROLES: frozenset[str] = frozenset(
    {
        "requester",
        "sales",
        "vice-president",
        "sales-director",
        "procurement",
        "production",
        "inspection",
        "finance",
        "manager",
        "admin",
        # the seed blueprints' (blueprints/complaint.yaml, blueprints/onboarding.yaml)
        "support",
        "support-lead",
        "service-manager",
        "strategist",
        "account-director",
    }
)
