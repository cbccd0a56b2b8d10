"""Passwords (argon2) and access tokens (JWT signed with the settings' HMAC key)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from core.settings import Settings

_hasher = PasswordHasher()
# verified against when the user does not exist, so that both paths cost the same
_DUMMY_HASH = _hasher.hash("procflow-no-such-user")


def verify_password(password_hash: str | None, password: str) -> bool:
    """True if password matches the stored argon2 hash (False for a missing or broken hash)."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def create_access_token(settings: Settings, username: str, roles: list[str]) -> tuple[str, int]:
    """A signed token for username; returns the token and its lifetime in seconds."""
    now = datetime.now(UTC)
    ttl = timedelta(minutes=settings.jwt_ttl_minutes)
    claims = {"sub": username, "roles": list(roles), "iat": now, "exp": now + ttl}
    token = jwt.encode(claims, settings.jwt_secret, algorithm=settings.jwt_algorithm)
    return token, int(ttl.total_seconds())


def decode_access_token(settings: Settings, token: str) -> dict[str, Any]:
    """The verified claims of token; raises jwt.InvalidTokenError for anything not acceptable."""
    claims = jwt.decode(
        token,
        settings.jwt_secret,
        algorithms=[settings.jwt_algorithm],
        options={"require": ["exp", "iat", "sub"]},
    )
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise jwt.InvalidTokenError("sub must be a non-empty string")
    return claims
