"""Demo data: users (password "demo"), version 1 of the policy of every registered process
type that has one (its built-in defaults), stock items.

`python -m scripts.seed`; idempotent: rows that exist are left alone.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from decimal import Decimal

from argon2 import PasswordHasher
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from core.db import PolicyVersion, StockItem, User, make_engine, make_session_factory
from core.settings import get_settings
from workflows import registry

log = logging.getLogger("procflow.seed")

DEMO_PASSWORD = "demo"

# username -> roles. vera is requester and vice-president: she shows the four-eyes rule.
DEMO_USERS: dict[str, list[str]] = {
    "alice": ["requester"],
    "bob": ["requester"],
    "sam": ["sales", "requester"],
    "vera": ["requester", "vice-president"],
    "victor": ["vice-president"],
    "diana": ["sales-director"],
    "paula": ["procurement"],
    "pete": ["production"],
    "ivy": ["inspection"],
    "fiona": ["finance"],
    "mike": ["manager"],
    "ada": ["admin"],
    # the seed blueprints' people: complaints (support, its lead, the service manager) and
    # customer onboarding (a strategist, the account director; any user may be named for a task)
    "stan": ["support"],
    "lea": ["support-lead"],
    "marco": ["service-manager"],
    "stella": ["strategist"],
    "dora": ["account-director"],
}

DEMO_STOCK: dict[str, str] = {
    "SKU-MUG": "Coffee mug, 300 ml, printed logo",
    "SKU-TSHIRT": "T-shirt, cotton, printed logo",
    "SKU-PRINTER": "Office laser printer",
}
DEMO_ON_HAND = Decimal(100_000)


async def seed(session_factory: async_sessionmaker) -> dict[str, int]:
    """Insert the missing demo rows; returns how many rows of each kind were added."""
    added = {"users": 0, "policies": 0, "stock": 0}
    hasher = PasswordHasher()
    async with session_factory.begin() as session:
        existing = set((await session.execute(select(User.username))).scalars())
        for username, roles in DEMO_USERS.items():
            if username in existing:
                continue
            session.add(
                User(
                    username=username,
                    display_name=username.capitalize(),
                    email=f"{username}@example.com",
                    password_hash=hasher.hash(DEMO_PASSWORD),
                    roles=roles,
                    active=True,
                )
            )
            added["users"] += 1

        published = set(
            (await session.execute(select(PolicyVersion.process_type).distinct())).scalars()
        )
        for process_type in registry.with_policy():
            if process_type.name in published:
                continue
            session.add(
                PolicyVersion(
                    process_type=process_type.name,
                    version=1,
                    document=process_type.default_policy(),
                    published_by="system",
                    note="initial policy (built-in defaults)",
                )
            )
            added["policies"] += 1

        skus = set((await session.execute(select(StockItem.sku))).scalars())
        for sku, description in DEMO_STOCK.items():
            if sku not in skus:
                session.add(
                    StockItem(sku=sku, description=description, on_hand=DEMO_ON_HAND, reserved=0)
                )
                added["stock"] += 1
    return added


async def _main() -> None:
    engine = make_engine(get_settings().database_url)
    try:
        added = await seed(make_session_factory(engine))
    finally:
        await engine.dispose()
    log.info("seed done, added %s", added)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
