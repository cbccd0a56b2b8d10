"""Sign-in (OAuth2 password flow) and the caller's profile."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm

from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import responses, unauthorized
from api.schemas import Principal, TokenOut
from api.security import create_access_token, verify_password
from core.db import User

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/token", response_model=TokenOut, responses=responses(401))
async def issue_token(
    request: Request,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    settings: SettingsDep,
    session: SessionDep,
) -> TokenOut:
    """Exchange a username and password for a bearer token carrying the user's roles."""
    # brute-force protection: sign-in attempts per client address, before the costly hash
    address = request.client.host if request.client else "unknown"
    request.app.state.signin_rate.check(address, "sign-in attempts")
    user = await session.get(User, form.username)
    ok = verify_password(user.password_hash if user else None, form.password)
    if user is None or not ok or not user.active:
        raise unauthorized("incorrect username or password")
    roles = list(user.roles or [])
    token, expires_in = create_access_token(settings, user.username, roles)
    return TokenOut(access_token=token, expires_in=expires_in, roles=roles)


@router.get("/me", response_model=Principal, responses=responses(401))
async def me(user: CurrentUser) -> Principal:
    """The authenticated caller with the roles currently granted in the users table."""
    return user
