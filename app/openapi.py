"""The published contract: /openapi.json as the settings in force make it, and the docs pages.

`/openapi.json` is the single source: FastAPI builds it from the routes and schemas, then
`apply_settings` writes in what only the settings know (the limits, which keys guard what),
so a client generated from a running service sees the limits and the auth that service
enforces. Swagger UI (`/docs`) and ReDoc (`/redoc`) are served from the assets the
fastapi-offline package ships, so both pages work on a machine without internet.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from app.settings import Settings

DOCS_ASSETS = "/docs-assets"
_ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))

_DESCRIPTION = """\
Cross-modal retrieval: image feature vectors in, ranked texts out, and the other way round.

Every 4xx/5xx answer is `{"error": {"type", "field", "message"}}` (the `ErrorResponse`
schema); `field` names the request field at fault, e.g. `vectors[0]`.
"""


def _operation_id(route: APIRoute) -> str:
    # The route function's name (search_image_to_text, get_item...): short, stable, and what
    # a generated client names its functions.
    return route.name


def app_options() -> dict[str, Any]:
    """Keyword arguments of FastAPI(...) for the contract: metadata, ids, no CDN docs pages."""
    return {
        "title": "cdpae",
        "summary": "Cross-modal (image <-> text) retrieval with the CDPAE kNN marginal similarity",
        "version": "0.1.0",
        "description": _DESCRIPTION,
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN; install_docs serves them.
        "docs_url": None,
        "redoc_url": None,
        "generate_unique_id_function": _operation_id,
    }


def apply_settings(doc: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write the limits and the key requirements of `settings` into an OpenAPI document."""
    schemas = doc["components"]["schemas"]
    search = schemas["SearchRequest"]["properties"]
    search["vectors"]["maxItems"] = settings.max_batch
    search["top_k"]["maximum"] = settings.max_top_k
    schemas["UpsertRequest"]["properties"]["items"]["maxItems"] = settings.max_upsert
    limits = (
        f"\nLimits in force: at most {settings.max_batch} vectors per search "
        f"(CDPAE_MAX_BATCH), top_k at most {settings.max_top_k} (CDPAE_MAX_TOP_K), at most "
        f"{settings.max_upsert} items per upsert (CDPAE_MAX_UPSERT), request bodies at most "
        f"{settings.max_body_bytes} bytes (CDPAE_MAX_BODY_BYTES, else 413).\n"
    )
    doc["info"]["description"] = doc["info"].get("description", "") + limits

    configured = {
        "writeKey": settings.api_key is not None,
        "readKey": settings.read_api_key is not None,
    }
    used: set[str] = set()
    for path_item in doc["paths"].values():
        for operation in path_item.values():
            responses = operation["responses"]
            if "413" in responses:
                responses["413"]["description"] = (
                    f"the request body is over {settings.max_body_bytes} bytes "
                    "(CDPAE_MAX_BODY_BYTES)"
                )
            _apply_security(operation, configured, settings)
            for requirement in operation.get("security", []):
                used.update(requirement)
    schemes = doc["components"].get("securitySchemes", {})
    for name in list(schemes):
        if name not in used:
            del schemes[name]
    if not schemes:
        doc["components"].pop("securitySchemes", None)
    return doc


def _apply_security(operation: dict[str, Any], configured: dict[str, bool], s: Settings) -> None:
    """Mirror app/deps.py: reads are open unless the read key is set (then either key works);
    writes are open unless the write key is set; 403 only for the read key writing."""
    requirements = operation.get("security", [])
    is_read = any("readKey" in r for r in requirements)
    open_ = s.read_api_key is None if is_read else s.api_key is None
    kept = [] if open_ else [r for r in requirements if all(configured[name] for name in r)]
    responses = operation["responses"]
    if kept:
        operation["security"] = kept
    else:
        operation.pop("security", None)
        responses.pop("401", None)
    if not kept or is_read or s.read_api_key is None:
        responses.pop("403", None)


def _without_fastapi_422(doc: dict[str, Any]) -> dict[str, Any]:
    """Drop the 422 HTTPValidationError FastAPI adds to operations with parameters.

    The service never sends that body: operations that can answer 422 declare it with
    ErrorResponse (app/errors.py error_responses), and a bad path parameter is a 404.
    """
    fastapi_422 = "#/components/schemas/HTTPValidationError"
    for path_item in doc["paths"].values():
        for operation in path_item.values():
            response = operation["responses"].get("422", {})
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref") == fastapi_422:
                del operation["responses"]["422"]
    if fastapi_422 not in json.dumps(doc["paths"]):
        for name in ("HTTPValidationError", "ValidationError"):
            doc["components"]["schemas"].pop(name, None)
    return doc


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """/openapi.json built once per app, with `settings` applied."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = apply_settings(_without_fastapi_422(doc), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc (ReDoc) from local assets; no request leaves the machine."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=_ASSETS_DIR), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        # Behind a proxy that mounts the service under a prefix, the page's URLs need it too.
        root = request.scope.get("root_path", "").rstrip("/")
        return f"{root}{app.openapi_url or '/openapi.json'}", f"{root}{DOCS_ASSETS}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi_url, assets = urls(request)
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        openapi_url, assets = urls(request)
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,  # fonts from Google would be the one remote request
        )
