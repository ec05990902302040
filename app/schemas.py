"""Request and response bodies of the HTTP API (the contract in the README).

Floats are checked finite here (allow_inf_nan=False): NaN or infinity in a
vector is a 422 naming the element. Dimensions depend on the bundle loaded, so
the engine checks them.
"""

from __future__ import annotations

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


class _Strict(BaseModel):
    # Unknown fields are refused (a typo in "top_k" must not silently mean 10).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SearchRequest(_Strict):
    vectors: list[list[float]] = Field(
        min_length=1, description="raw feature vectors of the query modality, one per query"
    )
    top_k: int = Field(10, ge=1, le=1000, description="hits per query")
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


class GalleryItem(_Strict):
    id: str = Field(min_length=1, max_length=256)
    vector: list[float] = Field(min_length=1, description="raw features of the gallery's modality")
    metadata: dict[str, Any] = Field(default_factory=dict)


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
