"""Credentials: tokens, the caller from the users table, 401 on any bad token, 403 on roles."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest
from sqlalchemy import update

from core.db import User
from tests.api.conftest import Api, order_body

ME = "/auth/me"

# the other-alg case signs HS512 with the (shorter) HS256 dev key on purpose
pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is")


def _token(settings, **overrides) -> str:
    now = datetime.now(UTC)
    claims = {"sub": "alice", "roles": ["admin"], "iat": now, "exp": now + timedelta(minutes=5)}
    claims.update(overrides)
    return jwt.encode(
        {k: v for k, v in claims.items() if v is not None}, settings.jwt_secret, "HS256"
    )


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_password_grant_returns_a_bearer_token_with_the_users_roles(api: Api):
    r = await api.http.post("/auth/token", data={"username": "vera", "password": "demo"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    assert sorted(body["roles"]) == ["requester", "vice-president"]
    me = await api.http.get(ME, headers=_bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["username"] == "vera"


@pytest.mark.parametrize("username,password", [("vera", "wrong"), ("nobody", "demo")])
async def test_bad_credentials_are_401(api: Api, username: str, password: str):
    r = await api.http.post("/auth/token", data={"username": username, "password": password})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"detail": "incorrect username or password"}


async def test_missing_token_is_401_with_www_authenticate(api: Api):
    r = await api.http.get(ME)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda s: "not-a-jwt", id="garbage"),
        pytest.param(
            lambda s: _token(s, exp=datetime.now(UTC) - timedelta(seconds=5)), id="expired"
        ),
        pytest.param(lambda s: _token(s, exp=None), id="no-exp"),
        pytest.param(
            lambda s: jwt.encode(
                {
                    "sub": "alice",
                    "iat": datetime.now(UTC),
                    "exp": datetime.now(UTC) + timedelta(minutes=5),
                },
                "another-key-of-sufficient-length",
                "HS256",
            ),
            id="other-key",
        ),
        pytest.param(
            lambda s: jwt.encode(
                {
                    "sub": "alice",
                    "iat": datetime.now(UTC),
                    "exp": datetime.now(UTC) + timedelta(minutes=5),
                },
                None,
                "none",
            ),
            id="alg-none",
        ),
        pytest.param(
            lambda s: jwt.encode(
                {
                    "sub": "alice",
                    "iat": datetime.now(UTC),
                    "exp": datetime.now(UTC) + timedelta(minutes=5),
                },
                s.jwt_secret,
                "HS512",
            ),
            id="other-alg",
        ),
        pytest.param(lambda s: _token(s, sub="ghost"), id="unknown-user"),
    ],
)
async def test_bad_tokens_are_401(api: Api, settings, make):
    r = await api.http.get(ME, headers=_bearer(make(settings)))
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"


async def test_roles_come_from_the_database_not_from_the_token(api: Api, settings):
    # the token claims admin, the users row says requester: publishing a policy is refused
    r = await api.http.post(
        "/policies/sales_order", json={"document": {}}, headers=_bearer(_token(settings))
    )
    assert r.status_code == 403
    assert "admin" in r.json()["detail"]


async def test_deactivated_user_token_is_401(api: Api, sessions):
    headers = await api.login("alice")
    assert (await api.http.get(ME, headers=headers)).status_code == 200
    async with sessions.begin() as s:
        await s.execute(update(User).where(User.username == "alice").values(active=False))
    assert (await api.http.get(ME, headers=headers)).status_code == 401


async def test_wrong_role_is_403_naming_the_roles_needed(api: Api):
    r = await api.post("/orders", "fiona", json=order_body())
    assert r.status_code == 403
    assert r.json()["detail"] == "requires one of the roles: requester, sales, manager"
    r = await api.post("/orders/X1/payments", "alice", json={"event_id": "e1", "amount": "10"})
    assert r.status_code == 403
    assert "finance" in r.json()["detail"]
