"""GET /metrics: the API's Prometheus metrics (core/metrics.py), without authentication, as is
customary for Prometheus; keep the API port internal or filter /metrics at the reverse proxy."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from core.metrics import CONTENT_TYPE, ApiMetrics

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics (requests, business series)",
)
async def metrics(request: Request) -> Response:
    """The API's requests by route template, method and status with latency histograms, and the
    business series read from the database at scrape time, in Prometheus text format."""
    registry: ApiMetrics = request.app.state.metrics
    body = await registry.scrape(getattr(request.app.state, "session_factory", None))
    return Response(body, media_type=CONTENT_TYPE)
