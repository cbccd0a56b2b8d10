"""Sign-in (OAuth2 password flow) and the caller's profile."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm

from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import field_error, responses, unauthorized
from api.limits import RateLimiter
from api.schemas import Principal, TokenOut
from api.security import HashSlots, client_address, create_access_token
from core.db import User

router = APIRouter(prefix="/auth", tags=["auth"])

USERNAME_MAX = 64  # the users table's key; longer names cannot exist


@router.post("/token", response_model=TokenOut, responses=responses(401, 503))
async def issue_token(
    request: Request,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    settings: SettingsDep,
    session: SessionDep,
) -> TokenOut:
    """Exchange a username and password for a bearer token carrying the user's roles."""
    # brute-force protection before the costly hash: per client address (X-Forwarded-For only
    # from PROCFLOW_TRUSTED_PROXIES), then per account whatever the address
    by_address: RateLimiter = request.app.state.signin_rate
    by_address.check(client_address(request), "sign-in attempts")
    if len(form.username) > USERNAME_MAX:
        raise field_error("username", f"at most {USERNAME_MAX} characters")
    by_account: RateLimiter = request.app.state.signin_account_rate
    by_account.check(form.username.casefold(), "sign-in attempts for this account")
    user = await session.get(User, form.username)
    await session.close()  # no database connection held while waiting for a hash slot
    hashes: HashSlots = request.app.state.hash_slots
    ok = await hashes.check(user.password_hash if user else None, form.password)
    if user is None or not ok or not user.active:
        raise unauthorized("incorrect username or password")
    roles = list(user.roles or [])
    token, expires_in = create_access_token(settings, user.username, roles)
    return TokenOut(access_token=token, expires_in=expires_in, roles=roles)


@router.get("/me", response_model=Principal, responses=responses(401))
async def me(user: CurrentUser) -> Principal:
    """The authenticated caller with the roles currently granted in the users table."""
    return user
