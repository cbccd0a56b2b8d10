"""Fixtures for the security tests: those of tests/api (dev server, seeded database, worker,
app), plus one user per demo role, a user holding every role, and tokens minted for them."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import jwt
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import async_sessionmaker

from api.security import create_access_token
from core.db import User
from core.roles import KNOWN_ROLES
from core.settings import Settings
from tests.api.conftest import (  # noqa: F401 - fixtures reused from the API tests
    Api,
    _running,
    api,
    app,
    client,
    db_url,
    live_api,
    settings,
    task_queue,
    temporal_env,
    worker,
)

DEMO_ROLES = sorted(KNOWN_ROLES)  # every role the system knows
ROOT = "root"  # holds every role


def role_user(role: str) -> str:
    """The test user that holds exactly role."""
    return f"only-{role}"


@pytest_asyncio.fixture
async def role_users(sessions: async_sessionmaker) -> dict[str, list[str]]:
    """One user per demo role holding only that role, and `root` holding all of them."""
    users = {role_user(r): [r] for r in DEMO_ROLES} | {ROOT: list(DEMO_ROLES)}
    async with sessions() as session:
        for name, roles in users.items():
            session.add(
                User(
                    username=name,
                    display_name=name,
                    email=f"{name}@example.test",
                    password_hash="!",  # cannot sign in; tests mint tokens
                    roles=roles,
                )
            )
        await session.commit()
    return users


def bearer(config: Settings, username: str) -> dict[str, str]:
    token, _ = create_access_token(config, username, [])
    return {"Authorization": f"Bearer {token}"}


def bad_tokens(config: Settings, username: str) -> dict[str, dict[str, str]]:
    """Credentials that must all be refused with 401, by name."""
    now = datetime.now(UTC)
    claims = {"sub": username, "iat": now - timedelta(hours=2), "exp": now - timedelta(hours=1)}
    expired = jwt.encode(claims, config.jwt_secret, algorithm=config.jwt_algorithm)
    live = {"sub": username, "iat": now, "exp": now + timedelta(hours=1)}
    other_key = jwt.encode(live, "another-key-that-is-long-enough-for-hs256", algorithm="HS256")

    def b64(data: dict) -> str:
        raw = json.dumps(data, default=lambda d: int(d.timestamp())).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    alg_none = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(live)}."
    return {
        "no token": {},
        "expired": {"Authorization": f"Bearer {expired}"},
        "other key": {"Authorization": f"Bearer {other_key}"},
        "alg none": {"Authorization": f"Bearer {alg_none}"},
    }


async def running(application: FastAPI) -> AsyncIterator[Api]:
    """The app inside its lifespan behind an httpx client (for apps with their own settings)."""
    async for a in _running(application):
        yield a
