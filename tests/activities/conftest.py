"""Fixtures for activity unit tests (sessions and mail_sink come from tests/conftest.py): every
database test here runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.testing import ActivityEnvironment

from activities.payments import PaymentActivities, SandboxPaymentProvider
from core.db import StockItem, User


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """A fresh migrated database, SQLite and PostgreSQL in turn."""
    return any_db_url


@pytest.fixture
def provider(sessions: async_sessionmaker) -> SandboxPaymentProvider:
    """The sandbox provider on the test's ledger; it declines CUST-DECLINE's charges."""
    return SandboxPaymentProvider(sessions, decline_customers={"CUST-DECLINE"})


@pytest.fixture
def payments(provider: SandboxPaymentProvider, sessions: async_sessionmaker) -> PaymentActivities:
    return PaymentActivities(provider, sessions)


@pytest.fixture
def activity_env() -> ActivityEnvironment:
    return ActivityEnvironment()


@pytest.fixture
async def stock(sessions: async_sessionmaker) -> dict[str, Decimal]:
    levels = {"SKU-A": Decimal(10), "SKU-B": Decimal(5)}
    async with sessions.begin() as session:
        for sku, on_hand in levels.items():
            session.add(StockItem(sku=sku, description=sku, on_hand=on_hand, reserved=0))
    return levels


@pytest.fixture
async def users(sessions) -> None:
    """Four users: alice (requester), victor (vice-president), vera (both), olga (inactive)."""
    async with sessions.begin() as session:
        for name, roles, active in [
            ("alice", ["requester"], True),
            ("victor", ["vice-president"], True),
            ("vera", ["requester", "vice-president"], True),
            ("olga", ["vice-president"], False),
        ]:
            session.add(
                User(
                    username=name,
                    display_name=name,
                    email=f"{name}@example.com",
                    password_hash="x",
                    roles=roles,
                    active=active,
                )
            )
