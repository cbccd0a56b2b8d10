"""The codec server (issue 14): the Temporal UI and CLI send encrypted payloads here to read them.

`POST /codec/decode` and `POST /codec/encode` speak the Temporal codec-server protocol: a JSON
body `{"payloads": [...]}`, each payload in protobuf JSON (`metadata` a map of base64 values,
`data` base64), answered in the same form. They use the codec of the API's own settings
(core.codec), so they decode exactly what the client, worker and API encrypted.

Who may decode: callers holding `admin` or `manager` (CODEC_ROLES). Decoding reveals every
instance's inputs, results and customer data, beyond what the API shows a role; the operators of
the process engine hold these roles. Without credentials: 401; without the role: 403; anyone not
signed in therefore sees ciphertext in the UI.

Credentials: the API's bearer token in `Authorization` (the CLI: `temporal workflow show
--codec-endpoint ... --codec-auth "Bearer <token>"`), or the cookie that `POST /codec/session`
sets from that token. The Temporal UI of the dev server sends no `Authorization` (its "pass the
access token" option needs the UI's own OIDC sign-in and an https endpoint); with "Include
cross-origin credentials" ticked in its codec settings it sends the cookie. The cookie is
HttpOnly, SameSite=Strict, limited to /codec and lives as long as the token.

CORS (CodecCors, for /codec/* only): the UI's origin (settings.temporal_ui_url) with credentials.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import jwt
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.api.common.v1 import Payload

from api.deps import SessionDep, SettingsDep, get_current_user, oauth2_scheme
from api.errors import field_error, responses, unauthorized
from api.schemas import Principal
from api.security import decode_access_token
from core.codec import EncryptionCodec, PayloadDecryptionError

router = APIRouter(prefix="/codec", tags=["codec"])

CODEC_ROLES = ("admin", "manager")
COOKIE = "procflow_codec"
PREFIX = "/codec/"
# what the Temporal UI sends with a codec request (Authorization-Extras: its OIDC id token)
UI_HEADERS = ["Authorization", "Authorization-Extras", "Content-Type", "X-Namespace"]
MAX_PAYLOADS = 1000


class CodecCors:
    """CORS for the codec routes only: the Temporal UI's origin, with credentials (the cookie);
    every other path goes straight to the app, without CORS headers."""

    def __init__(self, app: ASGIApp, origin: str) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=[origin.rstrip("/")],
            allow_methods=["POST"],
            allow_headers=UI_HEADERS,
            allow_credentials=True,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def codec_user(
    request: Request,
    token: Annotated[str | None, Depends(oauth2_scheme)],
    settings: SettingsDep,
    session: SessionDep,
) -> Principal:
    """The caller, by bearer token or else the codec cookie; 401 without valid credentials, 403
    without one of CODEC_ROLES."""
    user = await get_current_user(request, token or request.cookies.get(COOKIE), settings, session)
    if not set(CODEC_ROLES) & set(user.roles):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"requires one of the roles: {', '.join(CODEC_ROLES)}"
        )
    return user


CodecUser = Annotated[Principal, Depends(codec_user)]


def get_codec(request: Request) -> EncryptionCodec | None:
    """The codec of the API's settings, made once per app; None: payloads are not encrypted."""
    state = request.app.state
    if not hasattr(state, "payload_codec"):
        state.payload_codec = EncryptionCodec.from_settings(state.settings)
    return state.payload_codec


class PayloadsBody(BaseModel):
    """The codec-server protocol's body: payloads in protobuf JSON (base64 metadata and data)."""

    model_config = ConfigDict(extra="forbid")

    payloads: list[dict[str, Any]] = Field(max_length=MAX_PAYLOADS)


def _parse(body: PayloadsBody) -> list[Payload]:
    parsed: list[Payload] = []
    for i, item in enumerate(body.payloads):
        try:
            parsed.append(json_format.ParseDict(item, Payload(), ignore_unknown_fields=True))
        except json_format.ParseError as err:
            raise field_error(f"payloads.{i}", f"not a Temporal payload: {err}") from None
    return parsed


def _out(payloads: list[Payload]) -> PayloadsBody:
    return PayloadsBody(payloads=[json_format.MessageToDict(p) for p in payloads])


@router.post("/decode", responses=responses(401, 403, 422))
async def decode(body: PayloadsBody, user: CodecUser, request: Request) -> PayloadsBody:
    """Decrypt payloads; those not encrypted come back unchanged. 422 names the key id of a
    payload encrypted with a key the API does not hold (or one that fails authentication)."""
    payloads = _parse(body)
    codec = get_codec(request)
    if codec is None:
        return _out(payloads)
    try:
        return _out(await codec.decode(payloads))
    except PayloadDecryptionError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from None


@router.post("/encode", responses=responses(401, 403, 422))
async def encode(body: PayloadsBody, user: CodecUser, request: Request) -> PayloadsBody:
    """Encrypt payloads with the newest key (unchanged while payload encryption is off)."""
    payloads = _parse(body)
    codec = get_codec(request)
    return _out(payloads if codec is None else await codec.encode(payloads))


@router.post("/session", status_code=status.HTTP_204_NO_CONTENT, responses=responses(401, 403))
async def open_session(
    user: CodecUser,
    request: Request,
    settings: SettingsDep,
    token: Annotated[str | None, Depends(oauth2_scheme)],
) -> Response:
    """Set the codec cookie from the bearer token (call it from the API's /docs page in the
    browser the Temporal UI runs in): then the UI, with "Include cross-origin credentials" on,
    decodes for this operator until the token expires."""
    if not token:  # signed in by the cookie itself: nothing new to set
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    try:
        claims = decode_access_token(settings, token)
    except jwt.InvalidTokenError as err:  # checked by codec_user already; expired since
        raise unauthorized(f"invalid token: {err}") from err
    lifetime = max(0, int(claims["exp"] - datetime.now(UTC).timestamp()))
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.set_cookie(
        COOKIE,
        token,
        max_age=lifetime,
        path="/codec",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response
