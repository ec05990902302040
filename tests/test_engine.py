"""The engine against method.md's formula written out here, its ANN path, and concurrency."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app.ann import AnnParams
from app.bundle import load_bundle
from app.engine import Engine
from app.store import SqliteStore
from tests.support.reference import literal_scores
from tests.support.service import service


def test_service_scores_equal_the_literal_formula(synthetic_bundle, tmp_path):
    bundle = load_bundle(synthetic_bundle)
    train = np.load(synthetic_bundle / "train_embeddings.npy")
    default = bundle.default_gallery()
    with service(synthetic_bundle, tmp_path / "data") as client:
        for query_modality, gallery_modality, url in [
            ("image", "text", "/search/image-to-text"),
            ("text", "image", "/search/text-to-image"),
        ]:
            queries = default.features[query_modality][:6]
            body = {"vectors": queries.tolist(), "top_k": 30}
            results = client.post(url, json=body).json()["results"]
            expected = literal_scores(
                train,
                bundle.encoders[query_modality].embed(queries),
                bundle.encoders[gallery_modality].embed(default.features[gallery_modality]),
                bundle.knn_k,
            )
            ids = list(default.ids)
            for q, result in enumerate(results):
                got_ids = [h["id"] for h in result["hits"]]
                got = np.array([h["score"] for h in result["hits"]])
                want = expected[q, [ids.index(i) for i in got_ids]]
                np.testing.assert_allclose(got, want, atol=2e-6)
                # the same order: the literal ranking is the served one
                assert got_ids == [ids[j] for j in np.argsort(-expected[q], kind="stable")]


@pytest.fixture
def engine(synthetic_bundle, tmp_path):
    store = SqliteStore(tmp_path / "store")
    eng = Engine(load_bundle(synthetic_bundle), store, ann_min_items=0)
    eng.seed_if_empty()
    eng.load()
    yield eng
    store.close()


def _random_text_items(n: int, rng: np.random.Generator, prefix: str = "t"):
    ids = [f"{prefix}-{i}" for i in range(n)]
    features = rng.normal(size=(n, 8)).astype(np.float32)
    return ids, features, [{"category": f"c{i % 5}"} for i in range(n)]


@pytest.mark.parametrize("similarity", ["knn", "cosine"])
def test_an_exact_scan_in_parts_answers_as_in_one(engine, monkeypatch, similarity):
    """A batch's exact scan holds at most SCAN_CELLS scores at once: scanned 3 queries at a
    time, with dead rows and under a filter, the answers are the one-pass answers exactly."""
    import app.gallery

    rng = np.random.default_rng(6)
    engine.upsert("text", *_random_text_items(2000, rng))
    for i in range(0, 2000, 7):
        engine.delete("text", f"t-{i}")
    probes = rng.normal(size=(20, 16)).astype(np.float32)
    cases = [None, {"category": "c2"}]
    whole = [engine.search("image", probes, 25, similarity, flt, "exact") for flt in cases]
    gallery = engine.replicas["text"].gallery
    monkeypatch.setattr(app.gallery, "SCAN_CELLS", 3 * gallery.n_rows)
    parts = list(gallery.score_parts(engine.embed_queries("image", probes, similarity), similarity))
    assert [len(p) for p in parts] == [3] * 6 + [2]
    for flt, expected in zip(cases, whole, strict=True):
        assert engine.search("image", probes, 25, similarity, flt, "exact") == expected


@pytest.mark.parametrize("similarity", ["knn", "cosine"])
@pytest.mark.parametrize("projection", [0, 6])
def test_approximate_path_matches_exact(engine, projection, similarity):
    # projection 6: the knn ANN index holds m_g projected on 6 of the 12 pool directions
    for replica in engine.replicas.values():  # each replica builds its own indexes
        replica.ann_params = AnnParams(dim=projection)
    rng = np.random.default_rng(1)
    engine.upsert("text", *_random_text_items(3000, rng))
    for i in range(0, 3000, 7):  # deleted rows must not come back through the ANN index
        engine.delete("text", f"t-{i}")
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    exact = engine.search("image", queries, 10, similarity, mode="exact")
    approximate = engine.search("image", queries, 10, similarity, mode="approximate")
    gallery = engine.replicas["text"].gallery
    assert gallery.ann is not None and gallery.cosine_clusters is not None
    assert gallery.ann.params.dim == projection
    paths = engine.search_paths
    assert paths.get((similarity, "approximate"), 0) + paths.get((similarity, "uncertified"), 0)
    recall = np.mean(
        [
            len({h.id for h in a} & {h.id for h in e}) / 10
            for a, e in zip(approximate, exact, strict=True)
        ]
    )
    assert recall >= 0.99
    for a, e in zip(approximate, exact, strict=True):
        common = {h.id: h.score for h in e}
        for h in a:  # candidates are rescored exactly, by the same kernel: bit for bit
            if h.id in common:
                assert h.score == common[h.id]
    deleted = {f"t-{i}" for i in range(0, 3000, 7)}
    assert not deleted & {h.id for hits in approximate for h in hits}
    # an upsert after the index exists goes into it too
    engine.upsert("text", ["fresh"], engine.store.get("text", "t-1").vector[None, :], [{}])
    hits = engine.search("image", queries[:1], 3000, similarity, mode="approximate")[0]
    assert "fresh" in {h.id for h in hits}


def test_searches_never_see_items_deleted_before_they_began(engine):
    """Writers upsert and delete while readers search (knn exact, ANN, cosine)."""
    rng = np.random.default_rng(2)
    ids, features, metadata = _random_text_items(400, rng, "w")
    engine.upsert("text", ids, features, metadata)
    deleted_at: dict[str, float] = {}
    stop = threading.Event()
    failures: list[str] = []
    errors: list[BaseException] = []  # a thread's exception must fail the test, not vanish
    searches = [0]

    def collecting(work):
        def run(*args) -> None:
            try:
                work(*args)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        return run

    def writer() -> None:
        for i, item_id in enumerate(ids):
            if stop.is_set():
                return
            engine.delete("text", item_id)
            deleted_at[item_id] = time.monotonic()
            if i % 3 == 0:  # and keep growing the gallery, forcing array growth
                engine.upsert("text", [f"n-{i}"], features[i : i + 1], [{}])
        stop.set()

    def reader(mode: str, similarity: str) -> None:
        query = np.random.default_rng(len(mode)).normal(size=(2, 16)).astype(np.float32)
        while not stop.is_set():
            began = time.monotonic()
            gone = {i for i, t in list(deleted_at.items()) if t < began}
            for hits in engine.search("image", query, 500, similarity, mode=mode):
                seen = {h.id for h in hits}
                if seen & gone:
                    failures.append(f"{mode}/{similarity} saw deleted {sorted(seen & gone)[:3]}")
            searches[0] += 1

    threads = [threading.Thread(target=collecting(writer))] + [
        threading.Thread(target=collecting(reader), args=args)
        for args in [
            ("exact", "knn"),
            ("approximate", "knn"),
            ("auto", "cosine"),
            ("approximate", "cosine"),
        ]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[:3]
    assert not failures, failures[:5]
    assert searches[0] > 3  # the readers really ran alongside the writer
    assert engine.count("text") == 30 + len(range(0, 400, 3))


@pytest.mark.parametrize("k", [1, 4, 10])
def test_pool_profile_form_equals_dense_plus_sparse(k):
    from app.retrieval import TrainingPool, item_codes, knn_scores, unit_rows
    from tests.support.reference import dense_plus_sparse_scores, literal_code_scores

    rng = np.random.default_rng(k)
    img = rng.normal(size=(25, 6))
    pool = TrainingPool(unit_rows(np.vstack([img, img + 0.4 * rng.normal(size=img.shape)])))
    q = item_codes(pool, *pool.exact_neighbours(unit_rows(rng.normal(size=(5, 6))), k))
    g = item_codes(pool, *pool.exact_neighbours(unit_rows(rng.normal(size=(9, 6))), k))
    served = knn_scores(pool, q, g)
    np.testing.assert_allclose(served, dense_plus_sparse_scores(pool, q, g), atol=1e-6)
    np.testing.assert_allclose(served, literal_code_scores(pool, q, g), atol=1e-6)


# k = 1 is left out: every weight is 1, so the knapsack is max_a s_q(a), the global bound.
@pytest.mark.parametrize("k", [3, 10, 25])
def test_sparse_term_bound_holds_for_every_item_and_beats_the_global_one(k):
    from app.knn_certificate import sparse_term_bound
    from app.retrieval import TrainingPool, gallery_weight_matrix, item_codes, unit_rows

    rng = np.random.default_rng(10 + k)
    img = rng.normal(size=(40, 6))
    pool = TrainingPool(unit_rows(np.vstack([img, img + 0.3 * rng.normal(size=img.shape)])))
    q = item_codes(pool, *pool.exact_neighbours(unit_rows(rng.normal(size=(20, 6))), k))
    g = item_codes(pool, *pool.exact_neighbours(unit_rows(rng.normal(size=(500, 6))), k))
    caps = np.zeros(pool.size, dtype=np.float32)
    np.maximum.at(caps, g.neighbours.ravel(), g.weights.ravel())
    weights = gallery_weight_matrix(pool, g.neighbours, g.weights)
    tight = 0
    for i in range(len(q)):
        # s_q over the pool, placed on each query neighbour's partner: s_q.t_g = W_g s
        s = np.zeros(pool.size)
        s[pool.partner(q.neighbours[i])] = q.weights[i] * pool.pair_correction[q.neighbours[i]]
        sparse_terms = weights @ s
        bound = sparse_term_bound(pool, q.neighbours[i], q.weights[i], caps)
        assert sparse_terms.max() <= bound + 1e-12
        terms = q.weights[i] * pool.pair_correction[q.neighbours[i]]
        global_bound = min(terms.max(), terms.sum() * caps.max())
        assert bound <= global_bound + 1e-9
        tight += bound < global_bound - 1e-9
    assert tight  # strictly tighter for some queries, or the caps bought nothing


def test_per_cluster_weight_caps_bound_every_members_sparse_term(engine):
    from app.knn_certificate import KnnCertificate
    from app.retrieval import gallery_weight_matrix

    rng = np.random.default_rng(4)
    engine.upsert("text", *_random_text_items(2000, rng))  # past ann_min_items: clusters
    for i in range(0, 2000, 5):
        engine.delete("text", f"t-{i}")
    probe = rng.normal(size=(1, 16)).astype(np.float32)
    engine.search("image", probe, 10, "knn", mode="approximate")  # builds the indexes
    engine.upsert("text", *_random_text_items(300, rng))  # replaced: moved rows, new caps
    gallery = engine.replicas["text"].gallery
    caps, clusters, pool = gallery.cluster_caps, gallery.cosine_clusters, gallery.pool
    assert caps is not None and clusters is not None
    live = np.flatnonzero(gallery.alive[: gallery.n_rows])
    weights = gallery_weight_matrix(pool, gallery.neighbours[live], gallery.weights[live])
    member_of = clusters.cluster_of[live]
    queries = engine.embed_queries("image", rng.normal(size=(30, 16)).astype(np.float32), "knn")
    tighter = 0
    for i in range(len(queries)):
        nb, w = queries.codes.neighbours[i], queries.codes.weights[i]
        s = np.zeros(pool.size)
        s[pool.partner(nb)] = w * pool.pair_correction[nb]
        terms = weights @ s  # s_q.t_g of every live item
        largest = np.full(len(clusters.centroids), -np.inf)
        np.maximum.at(largest, member_of, terms)
        sums = caps.sums(pool, nb, w)
        assert (largest <= sums).all()  # float32 rounding included (sums allows for it)
        certificate = KnnCertificate(pool, nb, w, gallery.weight_caps, caps)
        tighter += np.median(np.minimum(sums, certificate.sparse)) < certificate.sparse
    assert tighter  # the caps must beat the gallery-wide bound somewhere


def test_indexes_built_in_the_background_miss_no_change_made_meanwhile(engine):
    """Writes and searches go on while the ANN indexes are built without the lock; what
    changed meanwhile is in the installed indexes (and what was deleted is not)."""
    rng = np.random.default_rng(4)
    engine.upsert("text", *_random_text_items(3000, rng))
    gallery = engine.replicas["text"].gallery
    assert gallery.ann is None
    # a build long enough to write during
    slow = AnnParams(hnsw=AnnParams().hnsw.model_copy(update={"M": 48, "ef_construction": 800}))
    builder = threading.Thread(target=gallery.build_ann_in_background, args=(slow,))
    builder.start()
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    changed = during = 0
    while builder.is_alive() or changed < 20:
        engine.delete("text", f"t-{changed}")
        engine.upsert("text", [f"late-{changed}"], rng.normal(size=(1, 8)).astype(np.float32), [{}])
        engine.search("image", queries, 10)  # exact meanwhile
        changed += 1
        during += builder.is_alive()
    builder.join()
    assert during >= 1  # some changes really happened while the indexes were being built
    assert gallery.ann is not None and not gallery.building_ann
    for similarity in ("knn", "cosine"):
        everything = engine.search("image", queries[:1], 4000, similarity, mode="approximate")[0]
        ids = {h.id for h in everything}
        assert {f"late-{i}" for i in range(changed)} <= ids
        assert not {f"t-{i}" for i in range(changed)} & ids
        assert len(ids) == engine.count("text")


def test_a_search_right_after_load_does_not_build_the_indexes_itself(synthetic_bundle, tmp_path):
    """The background build is marked as under way before load() returns: a search that
    comes at once takes the exact path, instead of building the indexes synchronously under
    the write lock (at 200k items that request took over a minute)."""
    store = SqliteStore(tmp_path / "store")
    eng = Engine(load_bundle(synthetic_bundle), store, ann_min_items=20)
    eng.seed_if_empty()
    eng.load()  # 30 seeded items per modality: over ann_min_items
    gallery = eng.replicas["text"].gallery
    assert gallery.building_ann or gallery.ann is not None
    eng.search("image", np.zeros((1, 16), dtype=np.float32), 5)
    deadline = time.monotonic() + 30
    while gallery.building_ann and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gallery.ann is not None and not gallery.building_ann
    store.close()
