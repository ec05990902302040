"""One JSON error shape for every failure: {"error": {"type", "field", "message"}}.

FastAPI's own validation errors, malformed JSON, unknown routes and methods are
all rewritten into it, so a client has one thing to parse.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.cluster import ShardUnavailableError
from app.schemas import ErrorResponse
from app.store import StoreFullError, StoreUnavailableError
from app.validation import InvalidInput

log = logging.getLogger("cdpae.service")


class ApiError(Exception):
    """An error the API reports to the client as it is."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.field = field
        self.headers = headers


def error_body(error_type: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": error_type, "field": field, "message": message}}


def error_response(
    status: int,
    error_type: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(error_type, message, field), status_code=status, headers=headers)


def field_name(loc: tuple | list) -> str | None:
    """("body", "vectors", 3, 5) -> "vectors[3][5]"; ("query", "x") -> "x"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


_STATUS_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "overloaded",
    503: "unavailable",
}


# What each status means on this API, for the OpenAPI document. app/openapi.py writes the body
# limit in force into 413 and drops 401/403 where no key is configured.
_STATUS_DESCRIPTIONS = {
    400: "the body is not valid JSON (type invalid_json)",
    401: "no API key, or a wrong one (field: authorization)",
    403: "the read key may not write (field: authorization)",
    404: "unknown modality, item id or path (field: modality or id)",
    413: "the request body is over CDPAE_MAX_BODY_BYTES (payload_too_large)",
    422: "a field is invalid: wrong vector dimension, NaN, over a limit, unknown field... "
    "(field names it, e.g. vectors[0])",
    503: "not ready (the gallery is loading or failed to load), too many requests in flight, "
    "or the gallery database is unreachable; retry after Retry-After seconds",
    507: "the gallery store's disk is full; the write was not applied",
    500: "a bug: see the service log for the request id",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying (when the service can tell)",
        "schema": {"type": "integer"},
    }
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these statuses, each with the one error body.

    Declaring 422 here also keeps FastAPI from documenting its own HTTPValidationError,
    which this service never sends.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status in (*statuses, 500):
        entry: dict[str, Any] = {
            "model": ErrorResponse,
            "description": _STATUS_DESCRIPTIONS[status],
        }
        if status == 503:
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error_type, exc.message, exc.field, exc.headers)

    @app.exception_handler(InvalidInput)
    async def _invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(422, "invalid_request", exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "decode error")
            position = first.get("loc", ())[-1] if first.get("loc") else "?"
            return error_response(
                400, "invalid_json", f"the body is not valid JSON: {reason} at character {position}"
            )
        loc = tuple(first.get("loc", ()))
        field = field_name(loc)
        message = str(first.get("msg", "invalid value"))
        if loc[:1] == ("path",):
            # A path segment outside its enum (/gallery/audio): no such resource.
            expected = (first.get("ctx") or {}).get("expected")
            hint = ": use " + expected.replace("'", "") if expected else ""
            return error_response(
                404, "not_found", f"unknown {field} {first.get('input')!r}{hint}", field
            )
        if loc == ("body",):
            # The body as a whole: absent, not an object, or not sent as JSON.
            field = "body"
            message = "the body must be a JSON object sent with Content-Type: application/json"
        elif first.get("type") == "missing":
            message = "this field is required"
        elif first.get("type") == "extra_forbidden":
            message = "unknown field"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        return error_response(422, "invalid_request", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        headers = dict(exc.headers) if exc.headers else None
        return error_response(
            exc.status_code, _STATUS_TYPES.get(exc.status_code, "error"), message, None, headers
        )

    @app.exception_handler(StoreFullError)
    async def _store_full(request: Request, exc: StoreFullError) -> JSONResponse:
        log.error("write refused: %s", exc)
        return error_response(
            507,
            "insufficient_storage",
            "the gallery store's disk is full; the write was not applied (reads still work)",
        )

    @app.exception_handler(StoreUnavailableError)
    async def _store_unavailable(request: Request, exc: StoreUnavailableError) -> JSONResponse:
        log.error("write refused: %s", exc)
        return error_response(
            503,
            "unavailable",
            f"the gallery database is unreachable; the write was not applied: {exc}",
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(ShardUnavailableError)
    async def _shard_unavailable(request: Request, exc: ShardUnavailableError) -> JSONResponse:
        log.error("shard unavailable: %s", exc)
        return error_response(503, "unavailable", str(exc), headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; see the service log")
