"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text

from api.errors import TemporalUnavailable
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "the database or Temporal is down"}},
)
async def readyz(request: Request, response: Response) -> Health:
    """Readiness: the database answers a query and the Temporal frontend reports healthy."""
    settings = request.app.state.settings
    timeout = settings.temporal_rpc_timeout_s
    db_ok = temporal_ok = False
    try:
        async with request.app.state.session_factory() as session:
            await asyncio.wait_for(session.execute(text("SELECT 1")), timeout)
        db_ok = True
    except Exception:  # noqa: BLE001 - any failure means not ready
        pass
    try:
        client = await request.app.state.temporal.get()
        temporal_ok = await client.service_client.check_health(timeout=timedelta(seconds=timeout))
    except (TemporalUnavailable, Exception):  # noqa: BLE001
        pass
    ok = db_ok and temporal_ok
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "5"
    return Health(
        status="ok" if ok else "unavailable",
        database="ok" if db_ok else "unavailable",
        temporal="ok" if temporal_ok else "unavailable",
    )
