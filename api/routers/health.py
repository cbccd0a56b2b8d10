"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from api.errors import TemporalUnavailable
from api.schemas import Health
from core.health import database_ok, temporal_answers

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
    """Readiness: the database takes a write (rolled back) and the Temporal frontend reports
    healthy."""
    settings = request.app.state.settings
    timeout = settings.temporal_rpc_timeout_s
    db_ok = await database_ok(request.app.state.engine, timeout)
    try:
        client = await request.app.state.temporal.get()
    except TemporalUnavailable:
        temporal_ok = False
    else:
        temporal_ok = await temporal_answers(client, timeout)
    ok = db_ok and temporal_ok
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "5"
    return Health(
        status="ok" if ok else "unavailable",
        database="ok" if db_ok else "unavailable",
        temporal="ok" if temporal_ok else "unavailable",
    )
