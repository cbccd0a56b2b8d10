"""The JSON guard: numbers no field can hold are refused with 422 before the app parses a body.

Python's json accepts the bare literals `NaN`, `Infinity` and `-Infinity`, turns `1e999` into
an infinite float and spends quadratic time on a 50,000-digit integer (past 4,300 digits it
raises). Such a value in any field, even an unknown one, used to end as a 500: the validation
error that named it could not be serialised. This middleware parses every JSON request body once
with hooks that mark those values, and answers 422 in FastAPI's list format with `loc` naming
the path to the first of them; every other body reaches the app unchanged (malformed JSON is
left to FastAPI, which answers 422 `json_invalid`).
"""

from __future__ import annotations

import email.message
import json
import math
from typing import Any

from fastapi import status
from starlette.types import ASGIApp, Receive, Scope, Send

from api.limits import read_body, replaying, send_json

# longer than any amount (16 digits), quantity or 64-bit integer a field can hold, with room
# for a sign, a point and an exponent
MAX_NUMBER_CHARS = 40
GUARDED_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _Refused:
    """A number no field can hold, marked where the parser met it."""

    __slots__ = ("type", "msg")

    def __init__(self, type_: str, msg: str) -> None:
        self.type = type_
        self.msg = msg


def _constant(literal: str) -> _Refused:
    return _Refused("finite_number", f"{literal} is not a number a field can hold")


def _float(text: str) -> float | _Refused:
    if len(text) > MAX_NUMBER_CHARS:
        return _Refused("number_too_long", f"numbers are limited to {MAX_NUMBER_CHARS} characters")
    value = float(text)
    if not math.isfinite(value):
        return _Refused("finite_number", f"{text} is out of range")
    return value


def _int(text: str) -> int | _Refused:
    if len(text) > MAX_NUMBER_CHARS:
        return _Refused("number_too_long", f"numbers are limited to {MAX_NUMBER_CHARS} characters")
    return int(text)


def _first_refused(value: Any, path: list[str | int]) -> tuple[list[str | int], _Refused] | None:
    """The path to the first marked value, depth first in document order."""
    stack: list[tuple[Any, list[str | int]]] = [(value, path)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, _Refused):
            return at, node
        if isinstance(node, dict):
            stack.extend((v, [*at, k]) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((v, [*at, i]) for i, v in reversed(list(enumerate(node))))
    return None


def refused_number(body: bytes) -> dict[str, Any] | None:
    """The 422 error for the first number of body no field can hold; None if there is none
    (or if body is no JSON at all: FastAPI answers that itself)."""
    try:
        doc = json.loads(body, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except (ValueError, RecursionError):  # JSONDecodeError, bad encoding: left to FastAPI
        return None
    found = _first_refused(doc, ["body"])
    if found is None:
        return None
    loc, refused = found
    return {"type": refused.type, "loc": loc, "msg": refused.msg}


def _is_json(scope: Scope) -> bool:
    """Whether FastAPI would parse this request's body as JSON (no content type, or
    application/json, or application/*+json)."""
    value = next((v for k, v in scope.get("headers", []) if k == b"content-type"), None)
    if value is None:
        return True
    message = email.message.Message()
    message["content-type"] = value.decode("latin-1")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class JsonNumberGuard:
    """ASGI middleware: a JSON body holding NaN, +-Infinity, an overflowing float or an absurdly
    long number is answered 422 naming its field. Install it inside BodySizeLimit, which bounds
    what is buffered here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in GUARDED_METHODS or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        read = await read_body(receive)  # BodySizeLimit, outside, bounds it
        assert read is not None
        body, disconnect = read
        error = refused_number(body) if disconnect is None and body else None
        if error is not None:
            await _unprocessable(send, error)
            return
        await self.app(scope, replaying(body, disconnect, receive), send)


async def _unprocessable(send: Send, error: dict[str, Any]) -> None:
    payload = json.dumps({"detail": [error]}).encode()
    await send_json(send, status.HTTP_422_UNPROCESSABLE_CONTENT, payload)
