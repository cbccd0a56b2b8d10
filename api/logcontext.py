"""ASGI middleware: each request's log lines carry its request id and the acting user, and the
request ends with one access line (method, path without the query string, status, duration).

The request id is the caller's X-Request-ID when it is a short plain token, else a new one; it
is sent back in X-Request-ID. The user is named by api/deps.py once the token is verified."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logs

access_log = logging.getLogger("procflow.api.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class LogContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        status = 500  # what the line says when the app fails before answering
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        with logs.request_context(request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                access_log.info(
                    "%s %s %s %.0f ms",
                    scope.get("method", ""),
                    scope.get("path", ""),
                    status,
                    (time.perf_counter() - started) * 1000,
                )
