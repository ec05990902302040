"""The gallery sharded on a real Ray cluster ranks exactly like one process.

Two Ray nodes on 127.0.0.1 (ray.cluster_utils.Cluster), 4 shard actors per modality, a real
PostgreSQL server, and the front end as a real `cdpae serve --ray ... --shards 4` process:
- MAP@50 from the cluster's HTTP answers equals `cdpae evaluate` (the default gallery);
- with 10k synthetic items per modality added, every test query (both directions, knn and
  cosine, with and without a filter) gets the same ids in the same order as the single
  process, scores within 1e-6 (in fact equal: app.retrieval's sums do not depend on the
  split, tests/test_shard_merge.py);
- bad input gets the single process's 4xx.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from app.bundle import load_bundle
from app.engine import Engine
from tests.support.ranking import evaluate_metrics, map_at_50
from tests.support.ray_cluster import LocalCluster, ray_environment
from tests.support.service import Server

pytestmark = pytest.mark.slow

SHARDS = 4
SYNTHETIC_PER_MODALITY = 10_000


@pytest.fixture(scope="module")
def cluster(wikipedia_bundle, postgres_server, tmp_path_factory):
    """(front end URL, the single process's engine on the same database, the cluster)."""
    from app.store.postgres import PostgresStore

    url = postgres_server.create_database("cluster_ranking")
    single = Engine(load_bundle(wikipedia_bundle), PostgresStore(url))
    single.seed_if_empty()
    single.load()  # embeds the default gallery once; the shards load its derived data
    ray_cluster = LocalCluster(workers=1)
    tmp = tmp_path_factory.mktemp("cluster")
    front = Server(
        wikipedia_bundle,
        tmp / "data",
        tmp / "front.log",
        *("--store", url, "--ray", ray_cluster.address, "--shards", str(SHARDS)),
        env=ray_environment(ray_cluster.tmp),
    )
    try:
        front.wait_ready(timeout=300)
        yield front.url, single, ray_cluster
    finally:
        front.stop()
        single.close()
        ray_cluster.shutdown()


def _add_synthetic_items(engine: Engine, n: int, seed: int = 0) -> None:
    """n items per modality near the default gallery's (Wikipedia-like), through the engine
    (the store commits them; the shards follow the change log)."""
    rng = np.random.default_rng(seed)
    default = engine.bundle.default_gallery()
    categories = sorted(set(default.categories.tolist()))
    for modality in ("image", "text"):
        base = default.features[modality]
        scale = base.std(axis=0, keepdims=True)
        for start in range(0, n, 1000):
            picks = rng.integers(0, len(base), size=1000)
            vectors = base[picks] + 0.5 * scale * rng.normal(size=(1000, base.shape[1]))
            ids = [f"syn-{modality}-{start + i:05d}" for i in range(1000)]
            metadata = [{"category": categories[int(c)]} for c in rng.integers(0, 10, 1000)]
            engine.upsert(modality, ids, vectors.astype(np.float32), metadata)


def _wait_for_counts(url: str, engine: Engine, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = {m: httpx.get(f"{url}/gallery/{m}").json()["count"] for m in ("image", "text")}
        if counts == {m: engine.count(m) for m in counts}:
            return
        time.sleep(0.2)
    raise AssertionError(f"cluster counts {counts} never reached the single process's")


def test_cluster_map_equals_cdpae_evaluate(cluster, wikipedia_bundle):
    url, _single, _ = cluster
    reported = evaluate_metrics(wikipedia_bundle)
    with np.load(wikipedia_bundle / "default_gallery.npz") as gallery:
        image, text, categories = gallery["image"], gallery["text"], gallery["categories"]
    with httpx.Client(base_url=url, timeout=60) as client:
        for similarity, name in [("knn", "cdpae_knn"), ("cosine", "cdpae_cosine")]:
            i2t = map_at_50(client, "/search/image-to-text", image, categories, similarity)
            t2i = map_at_50(client, "/search/text-to-image", text, categories, similarity)
            print(f"{similarity}: cluster i2t {i2t:.4f} t2i {t2i:.4f}, evaluate {reported[name]}")
            assert round(i2t, 3) == round(reported[name]["i2t_map50"], 3)
            assert round(t2i, 3) == round(reported[name]["t2i_map50"], 3)


def test_cluster_ranks_like_the_single_process(cluster):
    url, single, _ = cluster
    _add_synthetic_items(single, SYNTHETIC_PER_MODALITY)
    _wait_for_counts(url, single)
    default = single.bundle.default_gallery()
    checked = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for query_modality, route in [("image", "image-to-text"), ("text", "text-to-image")]:
            queries = default.features[query_modality]
            for similarity in ("knn", "cosine"):
                for flt in (None, {"category": "history"}):
                    for start in range(0, len(queries), 256):
                        batch = queries[start : start + 256]
                        body = {"vectors": batch.tolist(), "top_k": 20, "similarity": similarity}
                        if flt:
                            body["filter"] = flt
                        response = client.post(f"/search/{route}", json=body)
                        assert response.status_code == 200, response.text
                        expected = single.search(query_modality, batch, 20, similarity, flt)
                        for got, want in zip(response.json()["results"], expected, strict=True):
                            assert [h["id"] for h in got["hits"]] == [h.id for h in want]
                            np.testing.assert_allclose(
                                [h["score"] for h in got["hits"]],
                                [h.score for h in want],
                                rtol=0,
                                atol=1e-6,
                            )
                            checked += 1
    print(f"{checked} rankings identical (ids and order), gallery {single.count('text')} texts")
    assert checked == 2 * 2 * 2 * len(default.ids)


def test_cluster_bad_input_gets_the_single_process_4xx(cluster):
    url, single, _ = cluster
    dim = single.input_dim("image")
    with httpx.Client(base_url=url, timeout=30) as client:
        wrong_dim = client.post("/search/image-to-text", json={"vectors": [[0.0] * (dim - 1)]})
        assert wrong_dim.status_code == 422
        assert wrong_dim.json()["error"]["field"] == "vectors[0]"
        nan = client.put(
            "/gallery/text/items",
            content=b'{"items": [{"id": "x", "vector": [NaN]}]}',
            headers={"Content-Type": "application/json"},
        )
        assert nan.status_code in (400, 422)
        assert client.get("/gallery/text/items/not-there").status_code == 404
        assert client.delete("/gallery/text/items/not-there").status_code == 404


def test_ray_local_starts_a_one_node_ray_and_serves(synthetic_bundle, postgres_url, tmp_path):
    """`cdpae serve --ray local`: the service starts its own one-node Ray (on a free GCS
    port), serves searches and writes through its shards, and takes Ray down with it."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths
    server = Server(
        synthetic_bundle,
        tmp_path / "data",
        tmp_path / "serve.log",
        *("--store", postgres_url, "--ray", "local", "--shards", "1"),
        env={"RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    try:
        server.wait_ready(timeout=180)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            dims = {m: client.get(f"/gallery/{m}").json()["dim"] for m in ("image", "text")}
            item = {"id": "local-1", "vector": [0.3] * dims["text"], "metadata": {"tag": "x"}}
            upsert = client.put("/gallery/text/items", json={"items": [item]})
            assert upsert.status_code == 200, upsert.text
            found = client.post(
                "/search/image-to-text",
                json={"vectors": [[0.1] * dims["image"]], "top_k": 3, "filter": {"tag": "x"}},
            )
            assert found.status_code == 200, found.text
            assert [h["id"] for h in found.json()["results"][0]["hits"]] == ["local-1"]
    finally:
        server.stop(timeout=30)
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left.strip(), f"Ray processes left behind: {left}"
