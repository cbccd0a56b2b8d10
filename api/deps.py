"""Dependencies as typed Annotated aliases: settings, DB session, Temporal client, caller."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from api.errors import TemporalUnavailable, unauthorized
from api.limits import ConcurrencyLimit, RateLimiter
from api.schemas import Principal
from api.security import decode_access_token
from core import logs
from core.db import User
from core.settings import Settings
from core.temporal import connect

log = logging.getLogger("procflow.api")


class TemporalConnection:
    """The app's one Temporal client; made at startup, or on first use if Temporal was down."""

    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        self._settings = settings
        self._client = client
        self._lock = asyncio.Lock()

    @property
    def client(self) -> Client | None:
        return self._client

    async def get(self) -> Client:
        """The client; raises TemporalUnavailable (-> 503) while no connection can be made."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await asyncio.wait_for(
                        connect(self._settings), self._settings.temporal_rpc_timeout_s
                    )
                except (RuntimeError, OSError, TimeoutError) as err:
                    log.warning("cannot connect to Temporal: %s", err)
                    raise TemporalUnavailable(self._settings.temporal_address) from err
        return self._client


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    factory: async_sessionmaker[AsyncSession] = request.app.state.session_factory
    async with factory() as session:
        yield session


async def get_temporal(request: Request) -> AsyncIterator[Client]:
    """The client, holding one of the process's slots towards Temporal for the request.

    No slot within temporal_rpc_timeout_s: TemporalBusy (-> 503 with Retry-After).
    """
    limit: ConcurrencyLimit = request.app.state.temporal_slots
    async with limit.slot():
        yield await request.app.state.temporal.get()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
TemporalDep = Annotated[Client, Depends(get_temporal)]

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/auth/token", auto_error=False)


async def get_current_user(
    request: Request,
    token: Annotated[str | None, Depends(oauth2_scheme)],
    settings: SettingsDep,
    session: SessionDep,
) -> Principal:
    """The caller behind the bearer token; the user must exist and be active.

    Each authenticated request takes a token from the user's bucket (else 429).
    """
    if not token:
        raise unauthorized("not authenticated")
    try:
        claims = decode_access_token(settings, token)
    except jwt.InvalidTokenError as err:
        raise unauthorized(f"invalid token: {err}") from err
    limiter: RateLimiter = request.app.state.user_rate
    limiter.check(claims["sub"], "requests")
    user = await session.get(User, claims["sub"])
    if user is None or not user.active:
        raise unauthorized("unknown or inactive user")
    principal = Principal(
        username=user.username,
        display_name=user.display_name,
        email=user.email,
        roles=list(user.roles or []),
    )
    logs.set_user(principal.username)  # this request's log lines name the acting user
    # Give the connection back: a handler that waits on Temporal must not hold one (the
    # session opens a new one if the handler queries).
    await session.close()
    return principal


CurrentUser = Annotated[Principal, Depends(get_current_user)]


def require_roles(*roles: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets through callers holding at least one of roles (else 403)."""

    async def _check(user: CurrentUser) -> Principal:
        if not set(roles) & set(user.roles):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"requires one of the roles: {', '.join(roles)}"
            )
        return user

    return _check
