"""/openapi.json says what the service does: error model, statuses, enums, ids, auth, limits."""

from __future__ import annotations

import pytest

from app.errors import error_body
from tests.support.service import service

ERROR_REF = "#/components/schemas/ErrorResponse"

OPERATION_IDS = {
    ("post", "/search/image-to-text"): "search_image_to_text",
    ("post", "/search/text-to-image"): "search_text_to_image",
    ("put", "/gallery/{modality}/items"): "upsert_items",
    ("get", "/gallery/{modality}/items/{item_id}"): "get_item",
    ("delete", "/gallery/{modality}/items/{item_id}"): "delete_item",
    ("get", "/gallery/{modality}"): "gallery_info",
    ("get", "/healthz"): "healthz",
    ("get", "/readyz"): "readyz",
    ("get", "/metrics"): "metrics",
}

# Every status each operation can answer with both keys configured (500 is a bug, documented
# because a client must still parse it).
STATUSES_WITH_KEYS = {
    "search_image_to_text": {200, 400, 401, 413, 422, 500, 503},
    "search_text_to_image": {200, 400, 401, 413, 422, 500, 503},
    "upsert_items": {200, 400, 401, 403, 404, 413, 422, 500, 503, 507},
    "get_item": {200, 401, 404, 500, 503},
    "delete_item": {200, 401, 403, 404, 500, 503, 507},
    "gallery_info": {200, 401, 404, 500, 503},
    "healthz": {200, 500},
    "readyz": {200, 500, 503},
    "metrics": {200, 500},
}


def _operations(doc):
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


@pytest.fixture(scope="module")
def keyed_doc(synthetic_bundle, tmp_path_factory):
    data = tmp_path_factory.mktemp("contract")
    with service(synthetic_bundle, data, api_key="w", read_api_key="r") as c:
        return c.get("/openapi.json").json()


def test_operation_ids_are_short_and_every_status_uses_the_error_model(keyed_doc):
    seen = {}
    for method, path, operation in _operations(keyed_doc):
        seen[(method, path)] = operation["operationId"]
        statuses = {int(s) for s in operation["responses"]}
        assert statuses == STATUSES_WITH_KEYS[operation["operationId"]], operation["operationId"]
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (path, status)
        if "503" in operation["responses"]:
            assert "Retry-After" in operation["responses"]["503"]["headers"]
    assert seen == OPERATION_IDS
    schemas = keyed_doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorDetail"]["required"] == ["type", "field", "message"]


def test_the_error_model_is_what_the_service_sends(keyed_doc):
    detail = keyed_doc["components"]["schemas"]["ErrorDetail"]["properties"]
    assert set(error_body("x", "m")["error"]) == set(detail)


def test_enums_and_response_models(keyed_doc):
    schemas = keyed_doc["components"]["schemas"]
    assert schemas["Modality"]["enum"] == ["image", "text"]
    assert schemas["Similarity"]["enum"] == ["knn", "cosine"]
    assert schemas["SearchMode"]["enum"] == ["auto", "exact", "approximate"]
    search = schemas["SearchRequest"]["properties"]
    assert search["similarity"]["$ref"].endswith("/Similarity")
    assert search["mode"]["$ref"].endswith("/SearchMode")
    assert schemas["GalleryInfo"]["properties"]["modality"]["$ref"].endswith("/Modality")
    for _, path, operation in _operations(keyed_doc):
        if "{modality}" in path:
            (param,) = [p for p in operation["parameters"] if p["name"] == "modality"]
            assert param["schema"]["$ref"].endswith("/Modality"), path
        assert not any(p["in"] == "header" for p in operation.get("parameters", [])), path
        ok = operation["responses"]["200"]["content"]
        if operation["operationId"] == "metrics":
            assert list(ok) == ["text/plain"]
        else:
            assert "$ref" in ok["application/json"]["schema"], path
    item = keyed_doc["paths"]["/gallery/{modality}/items/{item_id}"]["get"]
    assert item["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Item"
    )


def test_security_schemes_match_the_checks(keyed_doc):
    schemes = keyed_doc["components"]["securitySchemes"]
    assert schemes == {
        name: {"type": "http", "scheme": "bearer", "description": schemes[name]["description"]}
        for name in ("readKey", "writeKey")
    }
    for _, _, operation in _operations(keyed_doc):
        op = operation["operationId"]
        security = operation.get("security")
        if op in ("upsert_items", "delete_item"):
            assert security == [{"writeKey": []}], op
        elif op in ("healthz", "readyz", "metrics"):
            assert security is None, op
        else:
            assert security == [{"readKey": []}, {"writeKey": []}], op


@pytest.mark.parametrize(
    ("keys", "reads", "writes"),
    [
        ({}, None, None),
        ({"api_key": "w"}, None, [{"writeKey": []}]),
        ({"read_api_key": "r"}, [{"readKey": []}], None),
    ],
)
def test_security_follows_the_keys_configured(synthetic_bundle, tmp_path, keys, reads, writes):
    with service(synthetic_bundle, tmp_path, **keys) as c:
        doc = c.get("/openapi.json").json()
        search = doc["paths"]["/search/image-to-text"]["post"]
        upsert = doc["paths"]["/gallery/{modality}/items"]["put"]
        assert search.get("security") == reads
        assert upsert.get("security") == writes
        assert ("401" in search["responses"]) == (reads is not None)
        assert ("401" in upsert["responses"]) == (writes is not None)
        assert "403" not in upsert["responses"]  # 403 needs both keys: a read key writing
        used = {name for op in (search, upsert) for r in op.get("security", []) for name in r}
        assert set(doc["components"].get("securitySchemes", {})) == used
        # and the service does what the document says
        r = c.post("/search/image-to-text", json={"vectors": [[1.0] * 16]})
        assert r.status_code == (401 if reads else 200), r.text


def test_limits_come_from_the_settings_in_force(synthetic_bundle, tmp_path):
    limits = {"max_batch": 3, "max_top_k": 5000, "max_upsert": 7, "max_body_bytes": 4096}
    with service(synthetic_bundle, tmp_path, **limits) as c:
        doc = c.get("/openapi.json").json()
        schemas = doc["components"]["schemas"]
        assert schemas["SearchRequest"]["properties"]["vectors"]["maxItems"] == 3
        assert schemas["SearchRequest"]["properties"]["top_k"]["maximum"] == 5000
        assert schemas["UpsertRequest"]["properties"]["items"]["maxItems"] == 7
        upsert = doc["paths"]["/gallery/{modality}/items"]["put"]
        assert "4096 bytes" in upsert["responses"]["413"]["description"]
        assert "4096" in doc["info"]["description"]
        # top_k 2000 is allowed when CDPAE_MAX_TOP_K is 5000 (schemas.py capped it at 1000)
        r = c.post("/search/image-to-text", json={"vectors": [[1.0] * 16], "top_k": 2000})
        assert r.status_code == 200, r.text
        r = c.post("/search/image-to-text", json={"vectors": [[1.0] * 16], "top_k": 5001})
        assert r.status_code == 422 and r.json()["error"]["field"] == "top_k"
        r = c.post("/search/image-to-text", json={"vectors": [[1.0] * 16] * 4})
        assert r.status_code == 422 and r.json()["error"]["field"] == "vectors"


def test_a_modality_outside_the_enum_is_a_404_naming_it(client):
    r = client.get("/gallery/audio")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "type": "not_found",
        "field": "modality",
        "message": "unknown modality 'audio': use image or text",
    }
