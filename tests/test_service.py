"""The HTTP service in-process (httpx via starlette's TestClient, lifespan included)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support.service import service


def _vector(client, modality="image", item_id="g-0"):
    return client.get(f"/gallery/{modality}/items/{item_id}").json()["vector"]


def test_probes_and_seeded_gallery(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["dataset"] == "synthetic"
    assert client.get("/gallery/image").json() == {"modality": "image", "count": 30, "dim": 16}
    assert client.get("/gallery/text").json() == {"modality": "text", "count": 30, "dim": 8}
    item = client.get("/gallery/text/items/g-3").json()
    assert item["id"] == "g-3" and len(item["vector"]) == 8
    assert item["metadata"]["category"].startswith("cat")
    assert client.get("/openapi.json").json()["paths"]["/search/image-to-text"]
    assert client.get("/docs").status_code == 200


def test_search_shape_order_and_both_directions(client):
    vectors = [_vector(client, "image", f"g-{i}") for i in range(3)]
    body = client.post("/search/image-to-text", json={"vectors": vectors, "top_k": 7}).json()
    assert len(body["results"]) == 3
    for result in body["results"]:
        scores = [h["score"] for h in result["hits"]]
        assert len(scores) == 7 and scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)  # S is a mean of h in [0, 1]
    text = _vector(client, "text", "g-5")
    hits = client.post(
        "/search/text-to-image", json={"vectors": [text], "top_k": 100, "similarity": "cosine"}
    ).json()["results"][0]["hits"]
    assert len(hits) == 30  # top_k above the gallery size returns the whole gallery, ranked
    assert len({h["id"] for h in hits}) == 30


def test_filter_returns_top_k_of_matching_items(client):
    vector = _vector(client)
    everything = client.post(
        "/search/image-to-text", json={"vectors": [vector], "top_k": 30}
    ).json()["results"][0]["hits"]
    art = [h for h in everything if h["metadata"]["category"] == "cat2"]
    for similarity in ("knn", "cosine"):
        hits = client.post(
            "/search/image-to-text",
            json={
                "vectors": [vector],
                "top_k": 4,
                "similarity": similarity,
                "filter": {"category": "cat2"},
            },
        ).json()["results"][0]["hits"]
        assert len(hits) == min(4, len(art))
        assert all(h["metadata"]["category"] == "cat2" for h in hits)
        if similarity == "knn":
            # the filtered ranking is the unfiltered ranking restricted to the matches
            assert [h["id"] for h in hits] == [h["id"] for h in art[:4]]
    none = client.post(
        "/search/image-to-text", json={"vectors": [vector], "filter": {"category": "nope"}}
    ).json()
    assert none == {"results": [{"hits": []}]}


def test_upsert_get_delete_roundtrip_and_search_sees_it(client):
    text = _vector(client, "text", "g-7")
    r = client.put(
        "/gallery/text/items",
        json={"items": [{"id": "new-1", "vector": text, "metadata": {"category": "fresh"}}]},
    )
    assert r.status_code == 200 and r.json() == {"upserted": 1, "count": 31}
    got = client.get("/gallery/text/items/new-1").json()
    assert got["metadata"] == {"category": "fresh"}
    np.testing.assert_allclose(got["vector"], text, rtol=1e-6)
    query = _vector(client, "image", "g-7")
    hits = client.post("/search/image-to-text", json={"vectors": [query], "top_k": 31}).json()[
        "results"
    ][0]["hits"]
    scores = {h["id"]: h["score"] for h in hits}
    assert scores["new-1"] == pytest.approx(scores["g-7"], abs=1e-6)  # same features, same score
    # replacing keeps the count; deleting removes it from search at once
    r = client.put(
        "/gallery/text/items",
        json={"items": [{"id": "new-1", "vector": text, "metadata": {"category": "other"}}]},
    )
    assert r.json()["count"] == 31
    assert client.delete("/gallery/text/items/new-1").json() == {"deleted": "new-1", "count": 30}
    hits = client.post("/search/image-to-text", json={"vectors": [query], "top_k": 50}).json()[
        "results"
    ][0]["hits"]
    assert "new-1" not in {h["id"] for h in hits}
    assert client.delete("/gallery/text/items/new-1").status_code == 404
    assert client.get("/gallery/text/items/new-1").status_code == 404


def _error(response, status, field):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "field", "message"}
    assert error["field"] == field, error
    return error


def test_bad_search_input_is_a_4xx_naming_the_field(client):
    good = _vector(client)
    url = "/search/image-to-text"
    e = _error(client.post(url, json={"vectors": [good, good, good, good[:12]]}), 422, "vectors[3]")
    assert e["message"] == "expected 16 floats (image features of bundle 'synthetic'), got 12"
    _error(client.post(url, json={"vectors": []}), 422, "vectors")
    _error(client.post(url, json={"vectors": [good] * 257}), 422, "vectors")
    _error(client.post(url, json={"vectors": [good], "top_k": 0}), 422, "top_k")
    _error(client.post(url, json={"vectors": [good], "top_k": 1001}), 422, "top_k")
    _error(client.post(url, json={"vectors": [good], "similarity": "dot"}), 422, "similarity")
    _error(client.post(url, json={"vectors": [good], "topk": 3}), 422, "topk")
    _error(client.post(url, json={"top_k": 3}), 422, "vectors")
    _error(client.post(url, json={"vectors": [good], "filter": {"a": [1]}}), 422, "filter")
    raw = {"content-type": "application/json"}
    nan = json.dumps({"vectors": [good]}).replace(str(good[2]), "NaN", 1)
    _error(client.post(url, content=nan, headers=raw), 422, "vectors[0][2]")
    inf = json.dumps({"vectors": [good]}).replace(str(good[1]), "1e999", 1)
    _error(client.post(url, content=inf, headers=raw), 422, "vectors[0][1]")
    big = json.dumps({"vectors": [good]}).replace(str(good[1]), "1e39", 1)  # overflows float32
    _error(client.post(url, content=big, headers=raw), 422, "vectors[0][1]")
    _error(client.post(url, content=b"[1, 2]", headers=raw), 422, "body")
    _error(client.post(url, content=b"", headers=raw), 422, "body")
    _error(client.post(url, json={"vectors": [good], "top_k": True}), 422, "top_k")
    _error(client.post(url, json={"vectors": [good], "top_k": 2.5}), 422, "top_k")
    e = _error(client.post(url, content=b'{"vectors": [[1, 2', headers=raw), 400, None)
    assert e["type"] == "invalid_json"
    _error(client.post("/search/sideways", json={"vectors": [good]}), 404, None)
    _error(client.get(url), 405, None)


def test_bad_gallery_input_changes_nothing(client):
    text = _vector(client, "text", "g-1")
    before = client.get("/gallery/text").json()["count"]
    bad_batches = [
        (
            {"items": [{"id": "a", "vector": text}, {"id": "b", "vector": text[:3]}]},
            "items[1].vector",
        ),
        ({"items": [{"id": "a", "vector": text}, {"id": "a", "vector": text}]}, "items[1].id"),
        ({"items": [{"id": "a", "vector": text}, {"id": "", "vector": text}]}, "items[1].id"),
        ({"items": [{"id": "a", "vector": text, "metadata": [1]}]}, "items[0].metadata"),
        ({"items": []}, "items"),
    ]
    for body, field in bad_batches:
        _error(client.put("/gallery/text/items", json=body), 422, field)
    e = _error(client.put("/gallery/texts/items", json={"items": []}), 404, "modality")
    assert "image or text" in e["message"]
    assert client.get("/gallery/text").json()["count"] == before
    assert client.get("/gallery/text/items/a").status_code == 404


def test_body_limit_is_413_before_parsing(synthetic_bundle, tmp_path):
    with service(synthetic_bundle, tmp_path / "d", max_body_bytes=2048) as c:
        body = json.dumps({"vectors": [[0.5] * 16] * 40})
        assert len(body) > 2048
        r = c.post(
            "/search/image-to-text", content=body, headers={"content-type": "application/json"}
        )
        _error(r, 413, None)

        def chunks():  # no Content-Length: the limit still holds while reading
            yield body[:1000].encode()
            yield body[1000:].encode()

        _error(c.post("/search/image-to-text", content=chunks()), 413, None)


def test_api_keys(synthetic_bundle, tmp_path):
    with service(
        synthetic_bundle, tmp_path / "d", api_key="write-secret", read_api_key="read-secret"
    ) as c:
        query = {"vectors": [[0.5] * 16]}
        item = {"items": [{"id": "k", "vector": [0.1] * 8}]}
        assert c.get("/healthz").status_code == 200  # probes stay open
        _error(c.post("/search/image-to-text", json=query), 401, "authorization")
        bad = {"Authorization": "Bearer nope"}
        _error(c.post("/search/image-to-text", json=query, headers=bad), 401, "authorization")
        read = {"Authorization": "Bearer read-secret"}
        write = {"Authorization": "Bearer write-secret"}
        assert c.post("/search/image-to-text", json=query, headers=read).status_code == 200
        assert c.post("/search/image-to-text", json=query, headers=write).status_code == 200
        _error(c.put("/gallery/text/items", json=item, headers=read), 403, "authorization")
        _error(c.put("/gallery/text/items", json=item), 401, "authorization")
        assert c.put("/gallery/text/items", json=item, headers=write).status_code == 200


def test_request_id_and_metrics(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32
    client.post("/search/image-to-text", json={"vectors": [_vector(client)]})
    text = client.get("/metrics").text
    assert (
        'cdpae_requests_total{method="POST",route="/search/image-to-text",status="200"} 1.0' in text
    )
    assert (
        'cdpae_request_duration_seconds_bucket{le="0.005",method="POST",route="/search/image-to-text"}'
        in text
    )
    assert 'cdpae_gallery_items{modality="text"} 30.0' in text
    assert 'cdpae_gallery_ann_building{modality="text"} 0.0' in text
    assert 'cdpae_search_queries_by_path{path="exact",similarity="knn"} 1.0' in text
    client.post(
        "/search/image-to-text", json={"vectors": [_vector(client)], "similarity": "cosine"}
    )
    text = client.get("/metrics").text
    assert 'cdpae_search_queries_by_path{path="exact",similarity="knn"} 1.0' in text
    assert 'cdpae_search_queries_by_path{path="exact",similarity="cosine"} 1.0' in text
    # the synthetic bundle's 120 training items are scanned, not searched through HNSW
    assert 'cdpae_training_neighbour_search{method="exact"} 1.0' in text
    assert 'cdpae_training_neighbour_search{method="hnsw"} 0.0' in text
