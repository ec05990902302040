"""Hostile input: ~1,350 generated requests against every endpoint of a real `cdpae serve`, each
response checked by our oracle and by schemathesis against /openapi.json, then the fuzzer's
finds as plain regression tests. The 20,000-request run is scripts/fuzz_long.py
(docs/reliability.md)."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest

from tests.support.reliability_fuzz import (
    READ_KEY,
    WRITE_KEY,
    FuzzReport,
    fuzz_schema,
    fuzz_semantic,
    problems,
)
from tests.support.service import Server, service

WRITE = {"Authorization": f"Bearer {WRITE_KEY}"}

# Requests per schema operation: the searches and the upsert carry the most input.
# (~1,200 requests reach the server: some generated cases can't be put on the wire.)
_BUDGET = {
    "POST /search/image-to-text": 280,
    "POST /search/text-to-image": 280,
    "PUT /gallery/{modality}/items": 330,
    "GET /gallery/{modality}/items/{item_id}": 130,
    "DELETE /gallery/{modality}/items/{item_id}": 130,
    "GET /gallery/{modality}": 70,
}


@pytest.fixture(scope="module")
def keyed(synthetic_bundle, tmp_path_factory):
    """The app with both keys configured (the fuzzer sends the write key, the read key or
    its own generated Authorization value)."""
    data = tmp_path_factory.mktemp("fuzz-data")
    with service(synthetic_bundle, data, api_key=WRITE_KEY, read_api_key=READ_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def keyed_server(synthetic_bundle, tmp_path_factory):
    """A real uvicorn process with both keys: the paths and headers as a client sends them."""
    tmp = tmp_path_factory.mktemp("fuzz-server")
    server = Server(
        synthetic_bundle,
        tmp / "data",
        tmp / "server.log",
        "--log-level",
        "warning",
        env={"CDPAE_API_KEY": WRITE_KEY, "CDPAE_READ_API_KEY": READ_KEY},
    )
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield client
    finally:
        server.stop()


def test_schema_fuzz_every_operation(keyed_server):
    """schemathesis's response checks (documented status, body schema, content type, headers,
    schema-violating input refused) plus our oracle: 0 problems over at least 1,000 requests."""
    report = FuzzReport()
    fuzz_schema(keyed_server, lambda method, path: _BUDGET.get(f"{method} {path}", 30), report)
    print(report.summary())
    assert report.requests >= 1000, report.summary()
    assert not report.failures
    # schema-valid vectors rarely have the bundle's dimension: test_bundle_aware_fuzz goes
    # deeper; here some requests still get through every check
    assert report.by_status[200] >= 20, report.summary()


def test_bundle_aware_fuzz(keyed):
    report = FuzzReport()
    fuzz_semantic(keyed, {"image": 16, "text": 8}, 250, report, percent_in_ids=False)
    print(report.summary())
    assert report.requests >= 250 and not report.failures
    assert report.by_status[200] >= 50 and report.by_status[422] >= 50, report.summary()


# --- what the fuzzer found, kept as plain regression tests -----------------------------------


def _vector(client, modality="text", item_id="g-1"):
    return client.get(f"/gallery/{modality}/items/{item_id}").json()["vector"]


def _error(response, status, field):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    return error["message"]


def test_huge_finite_values_are_refused_not_turned_into_nan_scores(client):
    # 3.5e38 is finite in JSON and float32-representable, but the encoder's z-scoring
    # overflowed to NaN: the search answered 200 with "score": nan (invalid JSON) and an
    # upsert stored an item whose NaN code ranked in every later search.
    query = [3.3e38] * 16
    message = _error(
        client.post("/search/image-to-text", json={"vectors": [[1.0] * 16, query]}),
        422,
        "vectors[1]",
    )
    assert "overflows" in message
    before = client.get("/gallery/image").json()["count"]
    r = client.put(
        "/gallery/image/items",
        json={"items": [{"id": "ok", "vector": [1.0] * 16}, {"id": "bad", "vector": query}]},
    )
    _error(r, 422, "items[1].vector")
    assert client.get("/gallery/image").json()["count"] == before  # all or nothing


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "1e400"])
def test_non_json_numbers_in_metadata_are_refused(client, constant):
    # Python's parser accepts NaN / Infinity / 1e400; stored, they made every response
    # carrying the item's metadata invalid JSON.
    vector = json.dumps(_vector(client))
    raw = f'{{"items": [{{"id": "n", "vector": {vector}, "metadata": {{"x": {constant}}}}}]}}'
    r = client.put("/gallery/text/items", content=raw, headers={"Content-Type": "application/json"})
    assert "NaN and Infinity" in _error(r, 422, "items[0].metadata")
    assert client.get("/gallery/text/items/n").status_code == 404


# ("a%2Fb" is checked against a real uvicorn in test_reliability_crash.py: starlette's
# TestClient decodes the path twice.)
@pytest.mark.parametrize("item_id", ["a/b", "/lead", "trail/", "a?b#c", "é 🙂", "%"])
def test_every_acknowledged_id_can_be_read_and_deleted(client, item_id):
    # "a/b" was stored (200) but the server decodes %2F before routing: GET and DELETE hit
    # "no route", so the item could never be read or removed.
    vector = _vector(client)
    assert (
        client.put(
            "/gallery/text/items", json={"items": [{"id": item_id, "vector": vector}]}
        ).status_code
        == 200
    )
    url = f"/gallery/text/items/{quote(item_id, safe='')}"
    assert client.get(url).json()["id"] == item_id
    assert client.delete(url).json()["deleted"] == item_id
    assert client.get(url).status_code == 404


@pytest.mark.parametrize(
    ("item_id", "says"),
    [
        (".", "URL path"),
        ("..", "URL path"),
        # found by scripts/fuzz_long.py: "x\n" was stored, but GET .../x%0A answered for "x"
        # (the route pattern's $ matches before a final newline) and "a\nb" had no route
        ("x\n", "control characters"),
        ("a\nb", "control characters"),
        ("\x00x", "control characters"),
        ("tab\t", "control characters"),
    ],
)
def test_unaddressable_ids_are_refused(client, item_id, says):
    r = client.put(
        "/gallery/text/items", json={"items": [{"id": item_id, "vector": _vector(client)}]}
    )
    assert says in _error(r, 422, "items[0].id")


def test_access_log_lines_cannot_be_forged_through_the_path(client, caplog):
    caplog.set_level("INFO", logger="cdpae.access")
    client.get("/gallery/text/items/x%0A2026-01-01 INFO cdpae.access fake line")
    lines = [r.getMessage() for r in caplog.records if r.name == "cdpae.access"]
    assert lines and all("\n" not in line for line in lines), lines


def test_problem_checker_catches_what_it_should(client):
    """The fuzz oracle itself: a 422 without a field, NaN in a body, a 5xx are problems."""
    import httpx

    request = httpx.Request("POST", "http://t/search/image-to-text")
    bad = [
        httpx.Response(500, json={"error": {"type": "x", "field": None, "message": "m"}}),
        httpx.Response(422, json={"error": {"type": "x", "field": None, "message": "m"}}),
        httpx.Response(400, json={"detail": "x"}),
        httpx.Response(
            200,
            content=b'{"results":[{"hits":[{"id":"a","score":NaN,"metadata":{}}]}]}',
            headers={"content-type": "application/json"},
        ),
        httpx.Response(503, json={"error": {"type": "x", "field": None, "message": "m"}}),
    ]
    for response in bad:
        response.request = request
        assert problems(response), response
    good = httpx.Response(422, json={"error": {"type": "x", "field": "top_k", "message": "m"}})
    good.request = request
    assert problems(good) == []
