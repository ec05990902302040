"""Dependencies handed to the routes: the engine, the settings, auth and admission control."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request

from app.bundle import MODALITIES, Modality
from app.engine import Engine
from app.errors import ApiError
from app.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    state = request.app.state
    if state.load_error is not None:
        raise ApiError(503, "unavailable", f"the gallery failed to load: {state.load_error}")
    if not state.ready.is_set():
        raise ApiError(
            503, "unavailable", "the gallery is still loading", headers={"Retry-After": "2"}
        )
    return state.engine


async def modality_of(modality: str) -> Modality:
    """The {modality} path parameter: 404 (not 422) for anything but image or text."""
    if modality not in MODALITIES:
        raise ApiError(
            404, "not_found", f"unknown modality {modality!r}: use image or text", "modality"
        )
    return modality  # type: ignore[return-value]


def _presented_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _matches(key: str | None, secret: object) -> bool:
    if key is None or secret is None:
        return False
    return hmac.compare_digest(key.encode(), secret.get_secret_value().encode())  # type: ignore[attr-defined]


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def require_read(
    settings: Annotated[Settings, Depends(get_settings)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """Searches and gallery reads: open unless CDPAE_READ_API_KEY is set."""
    if settings.read_api_key is None:
        return
    key = _presented_key(authorization)
    if not (_matches(key, settings.read_api_key) or _matches(key, settings.api_key)):
        raise ApiError(
            401,
            "unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
            "authorization",
            _CHALLENGE,
        )


async def require_write(
    settings: Annotated[Settings, Depends(get_settings)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """Gallery writes: open unless CDPAE_API_KEY is set; the read key gets 403."""
    if settings.api_key is None:
        return
    key = _presented_key(authorization)
    if _matches(key, settings.api_key):
        return
    if _matches(key, settings.read_api_key):
        raise ApiError(403, "forbidden", "this key may read but not write", "authorization")
    raise ApiError(
        401,
        "unauthorized",
        "a valid API key is required for writes: Authorization: Bearer <key>",
        "authorization",
        _CHALLENGE,
    )


async def admission(request: Request) -> AsyncIterator[None]:
    """At most CDPAE_MAX_INFLIGHT searches and writes at once; the rest get 503 + Retry-After.

    Runs on the event loop (single-threaded), so a plain counter is safe.
    """
    state = request.app.state
    if state.inflight >= state.settings.max_inflight:
        raise ApiError(
            503,
            "overloaded",
            "too many requests in flight; retry shortly",
            headers={"Retry-After": "1"},
        )
    state.inflight += 1
    try:
        yield
    finally:
        state.inflight -= 1


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ModalityDep = Annotated[Modality, Depends(modality_of)]
ReadAccess = Depends(require_read)
WriteAccess = Depends(require_write)
Admission = Depends(admission)
