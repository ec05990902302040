"""Request and response bodies of the HTTP API (the contract in the README).

Floats are checked finite here (allow_inf_nan=False): NaN or infinity in a
vector is a 422 naming the element. Dimensions depend on the bundle loaded, so
the engine checks them.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Similarity = Literal["knn", "cosine"]
SearchMode = Literal["auto", "exact", "approximate"]


def _scalar_values(flt: dict[str, Any] | None) -> dict[str, Any] | None:
    for key, value in (flt or {}).items():
        if not isinstance(value, str | int | float | bool | None):
            raise ValueError(
                f"filter value of {key!r} must be a string, number, boolean or null "
                "(exact match on a metadata value)"
            )
    return flt


Filter = Annotated[dict[str, Any] | None, AfterValidator(_scalar_values)]


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
    top_k: int = Field(10, ge=1, le=1000, strict=True, description="hits per query")
    similarity: Similarity = Field(
        "knn", description="knn: the kNN marginal-probability similarity; cosine: plain cosine"
    )
    filter: Filter = Field(
        None, description='exact match on metadata keys, e.g. {"category": "art"}'
    )
    mode: SearchMode = Field(
        "auto",
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


class GalleryInfo(BaseModel):
    modality: str
    count: int
    dim: int


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    bundle: str
    dataset: str
