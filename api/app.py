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
from api.errors import TemporalUnavailable
from api.routers import auth, health, orders, policies, tasks
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
    errors.install(app)
    for module in (auth, orders, tasks, policies, health):
        app.include_router(module.router)
    return app
