"""Passwords (argon2), access tokens (JWT signed with the settings' HMAC key) and the client
address that sign-in throttling is keyed on."""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import HTTPException, Request, status

from core.settings import Settings

_hasher = PasswordHasher()
# verified against when the user does not exist, so that both paths cost the same
_DUMMY_HASH = _hasher.hash("procflow-no-such-user")

# an iat this far ahead of our clock is still accepted (clock skew between replicas)
CLOCK_LEEWAY_S = 30

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def verify_password(password_hash: str | None, password: str) -> bool:
    """True if password matches the stored argon2 hash (False for a missing or broken hash)."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


class HashSlots:
    """Password verifications in worker threads, at most `limit` at once in this process.

    A sign-in that finds no free slot within wait_s is answered 503 with Retry-After. A slot is
    given back when its thread finishes, not when the request goes away, so a client that
    disconnects mid-hash cannot push more than `limit` hashes onto the CPUs.
    """

    def __init__(
        self,
        limit: int,
        wait_s: float,
        verify: Callable[[str | None, str], bool] = verify_password,
    ) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.verify = verify
        self._semaphore = asyncio.Semaphore(limit)
        self._running: set[asyncio.Task[bool]] = set()

    async def check(self, password_hash: str | None, password: str) -> bool:
        """verify(password_hash, password) in a thread, once a slot is free."""
        try:
            async with asyncio.timeout(self.wait_s):
                await self._semaphore.acquire()
        except TimeoutError:
            wait = max(1, math.ceil(self.wait_s))
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"too many sign-ins are being checked at once; retry after {wait} s",
                headers={"Retry-After": str(wait)},
            ) from None
        task = asyncio.ensure_future(asyncio.to_thread(self.verify, password_hash, password))
        self._running.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[bool]) -> None:
        self._running.discard(task)
        self._semaphore.release()


# ------------------------------------------------------------------------------ client address
def _parse_ip(text: str) -> IPAddress | None:
    """An address from one X-Forwarded-For hop ("1.2.3.4", "1.2.3.4:80", "[::1]:80", "::1")."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, proxies: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in proxies)


def resolve_client_address(
    peer: str | None, forwarded_for: Sequence[str], proxies: Sequence[IPNetwork]
) -> str:
    """The client's address: the socket peer, unless the peer is a trusted proxy.

    Behind trusted proxies it is the right-most X-Forwarded-For hop that is not itself a trusted
    proxy: every hop to its right was appended by a proxy we trust, everything to its left came
    from the client and may be forged. A hop that is not an address ends the walk at the
    trusted proxy that passed it on (that proxy is the key then); hops that are all trusted
    give the left-most one.
    """
    if peer is None:
        return "unknown"
    peer_ip = _parse_ip(peer)
    if peer_ip is None or not _trusted(peer_ip, proxies):
        return str(peer_ip or peer)
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    nearest = peer_ip
    for hop in reversed(hops):
        address = _parse_ip(hop)
        if address is None:
            break
        if not _trusted(address, proxies):
            return str(address)
        nearest = address
    return str(nearest)


def client_address(request: Request) -> str:
    """The address of the client behind request, under the app's PROCFLOW_TRUSTED_PROXIES."""
    settings: Settings = request.app.state.settings
    peer = request.client.host if request.client else None
    return resolve_client_address(
        peer, request.headers.getlist("x-forwarded-for"), settings.trusted_proxies
    )


# ------------------------------------------------------------------------------ tokens
def create_access_token(settings: Settings, username: str, roles: list[str]) -> tuple[str, int]:
    """A signed token for username; returns the token and its lifetime in seconds."""
    now = datetime.now(UTC)
    ttl = timedelta(minutes=settings.jwt_ttl_minutes)
    claims = {"sub": username, "roles": list(roles), "iat": now, "exp": now + ttl}
    token = jwt.encode(claims, settings.jwt_secret, algorithm=settings.jwt_algorithm)
    return token, int(ttl.total_seconds())


def decode_access_token(settings: Settings, token: str) -> dict[str, Any]:
    """The verified claims of token; raises jwt.InvalidTokenError for anything not acceptable.

    Beyond signature and expiry: iat may lie at most CLOCK_LEEWAY_S in the future, and the
    token may not live longer (exp - iat) than jwt_ttl_minutes.
    """
    claims = jwt.decode(
        token,
        settings.jwt_secret,
        algorithms=[settings.jwt_algorithm],
        # iat is checked below, with a leeway that exp does not get
        options={"require": ["exp", "iat", "sub"], "verify_iat": False},
    )
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise jwt.InvalidTokenError("sub must be a non-empty string")
    iat, exp = claims["iat"], claims["exp"]
    for name, value in (("iat", iat), ("exp", exp)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise jwt.InvalidTokenError(f"{name} must be a number")
    if iat > datetime.now(UTC).timestamp() + CLOCK_LEEWAY_S:
        raise jwt.ImmatureSignatureError("the token is issued in the future (iat)")
    if exp - iat > settings.jwt_ttl_minutes * 60:
        raise jwt.InvalidTokenError(
            f"the token lives longer than the allowed {settings.jwt_ttl_minutes} minutes"
        )
    return claims
