"""Request and response bodies of the HTTP API (the contract in the README).

Floats are checked finite here (allow_inf_nan=False): NaN or infinity in a
vector is a 422 naming the element. Dimensions depend on the bundle loaded, so
the engine checks them. Limits that come from the settings (batch size, top_k,
items per upsert) are checked by the routes and written into the OpenAPI
document by app/openapi.py, so the schema shows the limits in force.
"""

from __future__ import annotations

import json
import unicodedata
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema


# Enums (not Literals) so that the OpenAPI document names them as components and a generated
# client gets one type for each, shared by every operation that uses it.
class Modality(StrEnum):
    image = "image"
    text = "text"


class Similarity(StrEnum):
    knn = "knn"
    cosine = "cosine"


class SearchMode(StrEnum):
    auto = "auto"
    exact = "exact"
    approximate = "approximate"


class ErrorDetail(BaseModel):
    type: str = Field(
        description="machine-readable kind: invalid_request, invalid_json, unauthorized, "
        "forbidden, not_found, payload_too_large, overloaded, unavailable, "
        "insufficient_storage, internal",
        examples=["invalid_request"],
    )
    field: str | None = Field(
        description="the request field at fault, e.g. vectors[0] or items[2].id "
        "(authorization for key errors; null when no single field is)",
        examples=["vectors[0]"],
    )
    message: str = Field(description="what is wrong, for a person", examples=["expected 10 floats"])


class ErrorResponse(BaseModel):
    """The one shape of every 4xx/5xx answer."""

    error: ErrorDetail


def _scalar_values(flt: dict[str, Any] | None) -> dict[str, Any] | None:
    for key, value in (flt or {}).items():
        if not isinstance(value, str | int | float | bool | None):
            raise ValueError(
                f"filter value of {key!r} must be a string, number, boolean or null "
                "(exact match on a metadata value)"
            )
    return flt


_SCALAR_SCHEMA = {
    "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
}
# The validator gives a message naming the key; the schema says the same for clients.
Filter = Annotated[
    dict[str, Any] | None,
    AfterValidator(_scalar_values),
    WithJsonSchema(
        {"anyOf": [{"type": "object", "additionalProperties": _SCALAR_SCHEMA}, {"type": "null"}]}
    ),
]


def _strict_json(metadata: dict[str, Any]) -> dict[str, Any]:
    # Python's JSON parser takes NaN, Infinity and 1e400 (-> inf); stored, they would make
    # every later response carrying this metadata invalid JSON.
    try:
        json.dumps(metadata, allow_nan=False)
    except ValueError as exc:
        raise ValueError("metadata must be plain JSON: NaN and Infinity are not allowed") from exc
    return metadata


Metadata = Annotated[dict[str, Any], AfterValidator(_strict_json)]


class _Strict(BaseModel):
    # Unknown fields are refused (a typo in "top_k" must not silently mean 10).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SearchRequest(_Strict):
    vectors: list[list[float]] = Field(
        min_length=1, description="raw feature vectors of the query modality, one per query"
    )
    # No upper bound here: CDPAE_MAX_TOP_K is the limit (checked by the route, shown in the schema).
    top_k: int = Field(10, ge=1, strict=True, description="hits per query")
    similarity: Similarity = Field(
        Similarity.knn,
        description="knn: the kNN marginal-probability similarity; cosine: plain cosine",
    )
    filter: Filter = Field(
        None, description='exact match on metadata keys, e.g. {"category": "art"}'
    )
    mode: SearchMode = Field(
        SearchMode.auto,
        description="auto: approximate for large galleries (knn, no filter), else exact; "
        "exact / approximate force one path",
    )


class Hit(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any]


class SearchResult(BaseModel):
    hits: list[Hit]


class SearchResponse(BaseModel):
    results: list[SearchResult]


def _addressable(item_id: str) -> str:
    # URLs normalise "." and ".." path segments away, and the router's path pattern stops at a
    # newline: such an item could be stored but never read or deleted.
    if item_id in (".", ".."):
        raise ValueError(f"id {item_id!r} can't be addressed in a URL path")
    if any(unicodedata.category(c) == "Cc" for c in item_id):
        raise ValueError("id must not contain control characters (newline, tab, NUL...)")
    return item_id


class GalleryItem(_Strict):
    id: Annotated[str, AfterValidator(_addressable)] = Field(min_length=1, max_length=256)
    vector: list[float] = Field(min_length=1, description="raw features of the gallery's modality")
    metadata: Metadata = Field(default_factory=dict)


class UpsertRequest(_Strict):
    items: list[GalleryItem] = Field(min_length=1)


class UpsertResponse(BaseModel):
    upserted: int
    count: int


class DeleteResponse(BaseModel):
    deleted: str
    count: int


class Item(BaseModel):
    id: str
    vector: list[float] = Field(description="the raw features as stored")
    metadata: dict[str, Any]


class GalleryInfo(BaseModel):
    modality: Modality
    count: int = Field(description="items in the gallery")
    dim: int = Field(description="length of this modality's raw feature vectors")


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    bundle: str = Field(description="the bundle directory served")
    dataset: str = Field(description="the data set the bundle was trained on")
