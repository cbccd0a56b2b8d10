"""The FastAPI application: `uvicorn api.app:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client

from api import errors
from api.definitions import publish_seeds, sync_registry
from api.deps import TemporalConnection
from api.errors import TemporalUnavailable, responses
from api.jsonbody import JsonNumberGuard
from api.limits import BodySizeLimit, ConcurrencyLimit, RateLimiter
from api.logcontext import LogContext
from api.routers import (
    auth,
    codec,
    definitions,
    health,
    metrics,
    orders,
    outbox,
    policies,
    process_types,
    processes,
    tasks,
)
from api.security import HashSlots
from core import logs
from core.db import make_engine, make_session_factory
from core.metrics import ApiMetrics, RequestMetrics
from core.settings import Settings, get_settings, import_process_modules
from core.tracing import configure_tracing
from workflows import registry

log = logging.getLogger("procflow.api")

ROOT = Path(__file__).resolve().parent.parent  # the project root: relative seed dirs start here
# bound on publishing the seeds and registering the current blueprints at start-up: past it
# the API starts without them (the gateway registers current versions before each start)
SEED_TIMEOUT_S = 60.0
# paths the tracing instrumentation leaves out (regexes, comma-separated): probes and scrapes
UNTRACED_URLS = "/healthz$,/readyz$,/metrics$"

DESCRIPTION = """
Business processes as durable Temporal workflows. Sign in at `POST /auth/token`
(OAuth2 password form), then send `Authorization: Bearer <token>`.

Orders start and drive `SalesOrderWorkflow` instances; inboxes and order lists read the
read model that the workflows project into the database; `/orders/search` reads Temporal
visibility, which is eventually consistent. Processes defined as data (blueprints) are
published, versioned and served at `/definitions`. When Temporal or the database is unreachable
the API answers 503 with `Retry-After`.

Limits (per API process): request bodies up to `PROCFLOW_API_MAX_BODY_BYTES` (else 413),
`PROCFLOW_API_RATE_LIMIT_PER_MINUTE` requests per user and
`PROCFLOW_API_AUTH_RATE_LIMIT_PER_MINUTE` sign-ins per client address (else 429 with
`Retry-After`), `PROCFLOW_TEMPORAL_MAX_CONCURRENCY` requests in flight to Temporal (else 503
with `Retry-After`).
"""


def seed_directory(settings: Settings) -> Path | None:
    """The directory of the seed blueprints (relative: to the project root); None: no seeds."""
    if not settings.blueprints_dir:
        return None
    directory = Path(settings.blueprints_dir)
    return directory if directory.is_absolute() else ROOT / directory


async def load_blueprints(settings: Settings, session_factory: async_sessionmaker) -> None:
    """Publish the seed blueprints whose content is new and register every current version; a
    database that is unreachable, not migrated or too slow is logged, and the API starts."""
    directory = seed_directory(settings)
    try:
        async with asyncio.timeout(SEED_TIMEOUT_S):
            if directory is not None:
                await publish_seeds(session_factory, directory)
            else:
                async with session_factory() as session:
                    await sync_registry(session)
    except (SQLAlchemyError, OSError, TimeoutError) as err:
        log.warning(
            "blueprints not published or registered at start-up (%s: %s); starting anyway",
            type(err).__name__,
            err,
        )


def create_app(
    settings: Settings | None = None, *, temporal_client: Client | None = None
) -> FastAPI:
    """Build the app; the engine and the Temporal client are made once, in the lifespan."""
    settings = settings or get_settings()
    logs.configure(settings, registry.process_type_of)
    import_process_modules(settings.process_modules)  # their types registered, before the routes

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        await load_blueprints(settings, app.state.session_factory)
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
        # FastAPI's own tracing would follow any global TracerProvider, PROCFLOW_TRACING_ENABLED
        # or not: the spans are the instrumentation's below, and only when tracing is on
        telemetry={"tracing": False},
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
    app.add_middleware(codec.CodecCors, origin=settings.temporal_ui_url)  # /codec/* only
    if settings.metrics_enabled:  # outside the limits: their 413s and 429s are counted too
        app.state.metrics = ApiMetrics(settings.metrics_scrape_timeout_s)
        app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.add_middleware(LogContext)  # outermost: every line of a request carries its context
    errors.install(app)
    for module in (auth, orders, processes, tasks, policies, definitions, outbox):
        app.include_router(module.router, responses=responses(400, 413, 429))
    processes.install_openapi(app)  # each process type's start, event and status schemas
    app.include_router(process_types.router, responses=responses(400, 413, 429))
    app.include_router(health.router, responses=responses(413))
    app.include_router(codec.router, responses=responses(400, 413, 429))
    if settings.metrics_enabled:
        app.include_router(metrics.router, responses=responses(413))
    provider = configure_tracing(settings, "procflow-api")
    if provider is not None:  # tracing on: a server span per request, the parent of its calls
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # one server span per request (not one per ASGI send and receive as well), and none
        # for the probes and scrapes that come every few seconds
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=provider,
            exclude_spans=["receive", "send"],
            excluded_urls=UNTRACED_URLS,
        )
    return app
