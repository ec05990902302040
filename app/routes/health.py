"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import error_body, error_responses
from app.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get(
    "/healthz", response_model=Health, responses=error_responses(), summary="The process is up"
)
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    responses=error_responses(503),
    summary="Bundle loaded and verified, gallery built",
)
async def readyz(request: Request) -> Response:
    state = request.app.state
    if state.load_error is not None:
        return JSONResponse(
            error_body("unavailable", f"the gallery failed to load: {state.load_error}"), 503
        )
    if not state.ready.is_set():
        return JSONResponse(
            error_body("unavailable", "the gallery is still loading"),
            503,
            headers={"Retry-After": "2"},
        )
    manifest = state.engine.bundle.manifest
    return JSONResponse(
        {"status": "ready", "bundle": str(state.engine.bundle.path), "dataset": manifest.dataset}
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        },
        **error_responses(),
    },
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
