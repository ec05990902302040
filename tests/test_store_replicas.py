"""A shared gallery in PostgreSQL: restarts that don't re-embed, replicas that converge,
a database that goes away and comes back. Real `cdpae serve` processes where the point is
the network; a real PostgreSQL server (tests/support/postgres.py)."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import numpy as np
import pytest

from app.bundle import load_bundle
from app.engine import Engine
from tests.support.service import Server


def test_restart_loads_derived_data_instead_of_embedding(store_factory, synthetic_bundle):
    bundle = load_bundle(synthetic_bundle)
    first = Engine(bundle, store_factory(), ann_min_items=0)
    first.seed_if_empty()
    first.load()  # embeds the seeded items once and writes their derived data back
    rng = np.random.default_rng(0)
    first.upsert("text", ["u1", "u2"], rng.normal(size=(2, 8)).astype(np.float32), [{}, {}])
    query = bundle.default_gallery().features["image"][:3]
    before = first.search("image", query, 5)
    first.close()

    calls = []
    real_embed = bundle.embed
    bundle.embed = lambda modality, x: calls.append(len(x)) or real_embed(modality, x)
    try:
        second = Engine(bundle, store_factory(), ann_min_items=0)
        second.load()
        assert calls == []  # nothing stored was embedded again
        assert second.count("text") == first.count("text")
        after = second.search("image", query, 5)  # (embeds the 3 queries: 1 call)
    finally:
        bundle.embed = real_embed
    assert [[(h.id, h.score) for h in r] for r in after] == [
        [(h.id, h.score) for h in r] for r in before
    ]
    second.close()


def _vector(i: int, dim: int = 8) -> list[float]:
    """A text feature vector of the synthetic bundle (8-d); dim=16 for an image query."""
    return np.random.default_rng(i).normal(size=dim).round(4).tolist()


def _searchable(http: httpx.Client, item_id: str) -> bool:
    """Whether the replica's in-memory text gallery ranks the item (top_k covers it all)."""
    body = {"vectors": [_vector(1000, 16)], "top_k": 1000, "similarity": "cosine"}
    hits = http.post("/search/image-to-text", json=body).json()["results"][0]["hits"]
    return item_id in {h["id"] for h in hits}


def _count(http: httpx.Client) -> int:
    return http.get("/gallery/text").json()["count"]


@pytest.fixture
def replicas(synthetic_bundle, postgres_url, tmp_path):
    servers = []

    def start(name: str) -> Server:
        server = Server(
            synthetic_bundle,
            tmp_path / f"data-{name}",
            tmp_path / f"{name}.log",
            "--store",
            postgres_url,
            env={"CDPAE_LOG_LEVEL": "warning"},
        )
        servers.append(server)
        server.wait_ready(60)
        return server

    yield start
    for server in servers:
        server.stop()


def test_two_replicas_see_each_others_writes_within_a_second(replicas):
    a, b = replicas("a"), replicas("b")
    lags = []
    with httpx.Client(base_url=a.url) as via_a, httpx.Client(base_url=b.url) as via_b:
        for i in range(100):
            item = {"id": f"r-{i}", "vector": _vector(i), "metadata": {"n": i}}
            assert via_a.put("/gallery/text/items", json={"items": [item]}).status_code == 200
            acked = time.monotonic()
            while via_b.get(f"/gallery/text/items/r-{i}").status_code != 200:
                assert time.monotonic() - acked < 5, f"r-{i} not visible through b after 5 s"
            # visible to GET (the store) is not enough: b's in-memory gallery must have it
            while not _searchable(via_b, f"r-{i}"):
                assert time.monotonic() - acked < 5, f"r-{i} not searchable through b after 5 s"
            lags.append(time.monotonic() - acked)
        print(f"write via a -> searchable via b: median {statistics.median(lags) * 1e3:.0f} ms, "
              f"max {max(lags) * 1e3:.0f} ms over {len(lags)} writes")  # fmt: skip
        assert max(lags) < 1.0
        # a delete travels the same way
        assert via_a.delete("/gallery/text/items/r-0").status_code == 200
        deadline = time.monotonic() + 1.0
        while (
            via_b.get("/gallery/text").json()["count"] != via_a.get("/gallery/text").json()["count"]
        ):
            assert time.monotonic() < deadline
    # b killed, writes go on through a, b restarted: it catches up
    b.kill9()
    with httpx.Client(base_url=a.url) as via_a:
        items = [{"id": f"late-{i}", "vector": _vector(500 + i)} for i in range(20)]
        assert via_a.put("/gallery/text/items", json={"items": items}).status_code == 200
        count = via_a.get("/gallery/text").json()["count"]
    b2 = replicas("b2")
    with httpx.Client(base_url=b2.url) as via_b:
        assert via_b.get("/gallery/text").json()["count"] == count
        assert via_b.get("/gallery/text/items/late-19").status_code == 200


def test_database_restart_under_writes_and_searches(replicas, postgres_server):
    server = replicas("only")
    stop = threading.Event()
    acked: list[str] = []
    statuses: list[tuple[str, int, bool]] = []  # (kind, status, has Retry-After)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                i = 0
                while not stop.is_set():
                    item = {"id": f"w-{i}", "vector": _vector(i)}
                    r = http.put("/gallery/text/items", json={"items": [item]})
                    statuses.append(("write", r.status_code, "retry-after" in r.headers))
                    if r.status_code == 200:
                        acked.append(item["id"])
                    i += 1
        except BaseException as exc:
            errors.append(exc)

    def searcher() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while not stop.is_set():
                    r = http.post("/search/image-to-text", json={"vectors": [_vector(7, 16)]})
                    statuses.append(("search", r.status_code, "retry-after" in r.headers))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=searcher)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    postgres_server.stop("fast")
    time.sleep(4.0)  # longer than the store waits for a connection (2 s): writes get 503
    restarted = time.monotonic()
    postgres_server.start()
    acked_before = len(acked)
    while len(acked) == acked_before:
        assert time.monotonic() - restarted < 30, "writes did not recover within 30 s"
        time.sleep(0.05)
    recovery = time.monotonic() - restarted
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    refused = [s for s in statuses if s[1] != 200]
    print(f"{len(acked)} writes acknowledged, {len(refused)} refused while the database was "
          f"down, writes back {recovery:.2f} s after the server was started again")  # fmt: skip
    assert {s[1] for s in statuses} <= {200, 503}  # never a 500, never another 5xx
    assert all(retry for _, status, retry in statuses if status == 503)
    assert any(kind == "write" and status == 503 for kind, status, _ in statuses)
    assert all(status == 200 for kind, status, _ in statuses if kind == "search")  # from memory
    with httpx.Client(base_url=server.url) as http:
        missing = [i for i in acked if http.get(f"/gallery/text/items/{i}").status_code != 200]
    assert not missing, missing[:5]  # every acknowledged write is in the database
