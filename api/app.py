"""The FastAPI application: `uvicorn api.app:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from temporalio.client import Client

from api import errors
from api.deps import TemporalConnection
from api.errors import TemporalUnavailable, responses
from api.jsonbody import JsonNumberGuard
from api.limits import BodySizeLimit, ConcurrencyLimit, RateLimiter
from api.routers import (
    auth,
    health,
    orders,
    outbox,
    policies,
    process_types,
    processes,
    tasks,
)
from api.security import HashSlots
from core.db import make_engine, make_session_factory
from core.settings import Settings, get_settings

log = logging.getLogger("procflow.api")

DESCRIPTION = """
Business processes as durable Temporal workflows. Sign in at `POST /auth/token`
(OAuth2 password form), then send `Authorization: Bearer <token>`.

Orders start and drive `SalesOrderWorkflow` instances; inboxes and order lists read the
read model that the workflows project into the database; `/orders/search` reads Temporal
visibility, which is eventually consistent. When Temporal or the database is unreachable
the API answers 503 with `Retry-After`.

Limits (per API process): request bodies up to `PROCFLOW_API_MAX_BODY_BYTES` (else 413),
`PROCFLOW_API_RATE_LIMIT_PER_MINUTE` requests per user and
`PROCFLOW_API_AUTH_RATE_LIMIT_PER_MINUTE` sign-ins per client address (else 429 with
`Retry-After`), `PROCFLOW_TEMPORAL_MAX_CONCURRENCY` requests in flight to Temporal (else 503
with `Retry-After`).
"""


def create_app(
    settings: Settings | None = None, *, temporal_client: Client | None = None
) -> FastAPI:
    """Build the app; the engine and the Temporal client are made once, in the lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        connection = TemporalConnection(settings, temporal_client)
        app.state.temporal = connection
        if temporal_client is None:
            try:
                await connection.get()
            except TemporalUnavailable:
                log.warning(
                    "Temporal at %s is unreachable; starting anyway, answering 503 and "
                    "reconnecting on later requests",
                    settings.temporal_address,
                )
        try:
            yield
        finally:
            await asyncio.shield(engine.dispose())

    app = FastAPI(
        title="procflow",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.user_rate = RateLimiter(settings.api_rate_limit_per_minute)
    app.state.signin_rate = RateLimiter(settings.api_auth_rate_limit_per_minute)
    app.state.signin_account_rate = RateLimiter(settings.api_auth_account_rate_limit_per_minute)
    app.state.hash_slots = HashSlots(settings.auth_max_concurrent_hashes, settings.auth_hash_wait_s)
    app.state.temporal_slots = ConcurrencyLimit(
        settings.temporal_max_concurrency, settings.temporal_rpc_timeout_s
    )
    app.add_middleware(JsonNumberGuard)  # inside BodySizeLimit (added later: outermost)
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    errors.install(app)
    for module in (auth, orders, processes, tasks, policies, outbox):
        app.include_router(module.router, responses=responses(400, 413, 429))
    processes.install_openapi(app)  # each process type's start, event and status schemas
    app.include_router(process_types.router, responses=responses(400, 413, 429))
    app.include_router(health.router, responses=responses(413))
    return app
