"""Limits against bad input and abuse: body size, request rate, requests in flight to Temporal.

All state is in memory, per API process: with N replicas a user may send N times the rate.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import HTTPException, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import ErrorOut


# ------------------------------------------------------------------------------ body size
class BodySizeLimit:
    """ASGI middleware: a body over max_bytes is answered 413 before the app sees it.

    A declared Content-Length over the limit is refused without reading anything; a chunked
    (or lying) body is read only up to the limit. Bodies within the limit are buffered (they are
    small) and handed to the app unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(send)
            return
        read = await read_body(receive, self.max_bytes)
        if read is None:
            await self._too_large(send)
            return
        await self.app(scope, replaying(*read, receive), send)

    async def _too_large(self, send: Send) -> None:
        body = ErrorOut(
            detail=f"request body too large: the limit is {self.max_bytes} bytes"
        ).model_dump_json()
        await send_json(send, status.HTTP_413_CONTENT_TOO_LARGE, body.encode(), close=True)


async def send_json(send: Send, status_code: int, body: bytes, *, close: bool = False) -> None:
    """Answer a request from ASGI middleware with a JSON body (before the app saw it)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(
    receive: Receive, max_bytes: int | None = None
) -> tuple[bytes, Message | None] | None:
    """Read a request body whole: (body, None), or (b"", the disconnect) if the client went
    away; None once it grows beyond max_bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", message  # a disconnect: let the app see it
        chunk = message.get("body", b"")
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def replaying(body: bytes, disconnect: Message | None, receive: Receive) -> Receive:
    """A receive that hands the app the body read before (or the disconnect) once, unchanged."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            if disconnect is not None:
                return disconnect
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# ------------------------------------------------------------------------------ rate
@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute, bursts up to `per_minute`."""

    MAX_KEYS = 10_000

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def retry_after(self, key: str) -> int | None:
        """Take a token for key; None if allowed, else the seconds until one is available."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.MAX_KEYS:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(self.capacity, now)
        else:
            elapsed = max(0.0, now - bucket.at)
            bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self.rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - bucket.tokens) / self.rate))

    def check(self, key: str, what: str) -> None:
        """Raise 429 with Retry-After when key has no token left."""
        wait = self.retry_after(key)
        if wait is not None:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"too many {what}; retry after {wait} s",
                headers={"Retry-After": str(wait)},
            )

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled completely (they would start full anyway)."""
        full = [
            k
            for k, b in self._buckets.items()
            if b.tokens + (now - b.at) * self.rate >= self.capacity
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.MAX_KEYS:  # all busy: drop the oldest
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k].at)
            for k in oldest[: len(oldest) // 2]:
                del self._buckets[k]


# ------------------------------------------------------------------------------ Temporal
class TemporalBusy(Exception):
    """Every slot towards Temporal stayed taken for the whole wait (-> 503 with Retry-After)."""


class ConcurrencyLimit:
    """At most `limit` requests in flight to Temporal; waiting for a slot is bounded."""

    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self._semaphore = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.wait_s)
        except TimeoutError:
            raise TemporalBusy(
                f"{self.limit} requests are already waiting for Temporal; "
                f"no slot freed within {self.wait_s:g} s"
            ) from None
        try:
            yield
        finally:
            self._semaphore.release()
