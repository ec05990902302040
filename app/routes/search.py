"""POST /search/image-to-text and /search/text-to-image."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from app.bundle import Modality
from app.deps import SearchContextDep
from app.engine import Engine
from app.errors import ApiError, error_responses
from app.gallery import Hit
from app.schemas import SearchRequest, SearchResponse
from app.settings import Settings

router = APIRouter(prefix="/search", tags=["search"])


async def _search(
    engine: Engine, settings: Settings, query_modality: Modality, body: SearchRequest
) -> Response:
    if len(body.vectors) > settings.max_batch:
        raise ApiError(
            422,
            "invalid_request",
            f"at most {settings.max_batch} vectors per request (CDPAE_MAX_BATCH), "
            f"got {len(body.vectors)}",
            "vectors",
        )
    if body.top_k > settings.max_top_k:
        raise ApiError(
            422, "invalid_request", f"top_k must be at most {settings.max_top_k}", "top_k"
        )

    def search() -> list[list[Hit]]:
        features = engine.check_vectors(query_modality, body.vectors, "vectors[{i}]")
        return engine.search(
            query_modality,
            features,
            body.top_k,
            body.similarity.value,
            body.filter,
            body.mode.value,
        )

    # A quick search runs here, on the event loop; any other in a worker thread, so that the
    # loop goes on answering (and the two cores both search) while it runs.
    if engine.is_quick(query_modality, len(body.vectors), body.mode.value):
        results = search()
    else:
        results = await run_in_threadpool(search)
    # A replica that can't reach a shared store answers from memory and says so.
    headers = {"X-Gallery-Stale": "true"} if engine.stale else None
    return Response(_results_json(results), media_type="application/json", headers=headers)


def _results_json(results: list[list[Hit]]) -> str:
    """The SearchResponse body, serialised by hand: pydantic models for up to 256 x 1000 hits
    cost more than the search."""
    payload = ",".join(
        '{"hits":['
        + ",".join(
            f'{{"id":{json.dumps(h.id)},"score":{h.score!r},"metadata":{h.metadata_json}}}'
            for h in hits
        )
        + "]}"
        for hits in results
    )
    return '{"results":[' + payload + "]}"


# 403 never: a search takes either key.
_RESPONSES = {
    200: {
        "headers": {
            "X-Gallery-Stale": {
                "description": "true when a replica can't reach the shared gallery store and "
                "answers from memory",
                "schema": {"type": "string", "enum": ["true"]},
            }
        }
    },
    **error_responses(400, 401, 413, 422, 503),
}


@router.post(
    "/image-to-text",
    response_model=SearchResponse,
    responses=_RESPONSES,
    summary="Rank the text gallery for image feature vectors",
)
async def search_image_to_text(body: SearchRequest, context: SearchContextDep) -> Response:
    return await _search(context.engine, context.settings, "image", body)


@router.post(
    "/text-to-image",
    response_model=SearchResponse,
    responses=_RESPONSES,
    summary="Rank the image gallery for text feature vectors",
)
async def search_text_to_image(body: SearchRequest, context: SearchContextDep) -> Response:
    return await _search(context.engine, context.settings, "text", body)
