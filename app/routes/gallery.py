"""The gallery of each modality: batch upsert, read, delete, size.

Item routes use {item_id:path}: the server decodes %2F before routing, so an id with a
slash must still reach its item (else it could be stored but never read or deleted).
"""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import Admission, EngineDep, ModalityDep, ReadAccess, SettingsDep, WriteAccess
from app.errors import ApiError, error_responses
from app.schemas import DeleteResponse, GalleryInfo, Item, UpsertRequest, UpsertResponse

router = APIRouter(prefix="/gallery", tags=["gallery"])


@router.put(
    "/{modality}/items",
    response_model=UpsertResponse,
    responses=error_responses(400, 401, 403, 404, 413, 422, 503, 507),
    dependencies=[WriteAccess, Admission],
    summary="Insert or replace items (all or nothing, durable when acknowledged)",
)
def upsert_items(
    modality: ModalityDep, body: UpsertRequest, engine: EngineDep, settings: SettingsDep
) -> UpsertResponse:
    items = body.items
    if len(items) > settings.max_upsert:
        raise ApiError(
            422,
            "invalid_request",
            f"at most {settings.max_upsert} items per request (CDPAE_MAX_UPSERT), got {len(items)}",
            "items",
        )
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise ApiError(
                422,
                "invalid_request",
                f"id {item.id!r} appears twice in this batch (also items[{seen[item.id]}])",
                f"items[{i}].id",
            )
        seen[item.id] = i
    # Everything is checked before anything is written.
    features = engine.check_vectors(modality, [it.vector for it in items], "items[{i}].vector")
    count = engine.upsert(
        modality, [it.id for it in items], features, [it.metadata for it in items]
    )
    return UpsertResponse(upserted=len(items), count=count)


@router.get(
    "/{modality}/items/{item_id:path}",
    response_model=Item,
    responses=error_responses(401, 404, 503),
    dependencies=[ReadAccess],
    summary="One item",
)
def get_item(modality: ModalityDep, item_id: str, engine: EngineDep) -> Item:
    item = engine.get(modality, item_id)
    if item is None:
        raise ApiError(404, "not_found", f"no {modality} item with id {item_id!r}", "id")
    return Item(id=item.id, vector=item.vector.tolist(), metadata=item.metadata)


@router.delete(
    "/{modality}/items/{item_id:path}",
    response_model=DeleteResponse,
    responses=error_responses(401, 403, 404, 503, 507),
    dependencies=[WriteAccess, Admission],
    summary="Delete one item (durable when acknowledged)",
)
def delete_item(modality: ModalityDep, item_id: str, engine: EngineDep) -> DeleteResponse:
    count = engine.delete(modality, item_id)
    if count is None:
        raise ApiError(404, "not_found", f"no {modality} item with id {item_id!r}", "id")
    return DeleteResponse(deleted=item_id, count=count)


@router.get(
    "/{modality}",
    response_model=GalleryInfo,
    responses=error_responses(401, 404, 503),
    dependencies=[ReadAccess],
    summary="Gallery size",
)
def gallery_info(modality: ModalityDep, engine: EngineDep) -> GalleryInfo:
    return GalleryInfo(
        modality=modality, count=engine.count(modality), dim=engine.input_dim(modality)
    )
