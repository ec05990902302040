"""Where the knn certificate's slack is: each part of its bound against the true value.

    OPENBLAS_NUM_THREADS=1 python -m scripts.bench_knn_bound --size 1000000 --queries 150

In one process, on the store scripts/bench_service.py fills: the service's own knn HNSW
index and cosine clusters are built, then for each test image and candidate list size L
every gallery item is scored exactly, and an answer counts as certified when the items
outside the L candidates are bounded below the 10th score by
- the dense bound (d_L + projection slack) plus a sparse bound that is either
  - the earlier gallery-wide one, min(max_a s_q(a), sum_a s_q(a) max_b W(b)),
  - the knapsack over W(b) (app.knn_certificate.sparse_term_bound),
  - the knapsack and the per-cluster caps (app.knn_certificate.KnnCertificate: what the
    service uses),
  - the true largest sparse term of any outside item (an oracle: what a perfect sparse
    bound would certify, the dense bound unchanged).
Also prints the median of each part. Not a timing: the exact scores of every item are the
reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from app.ann import AnnParams, Candidates
from app.knn_certificate import KnnCertificate
from app.retrieval import gallery_weight_matrix
from scripts.bench_service import fill_store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=Path("models/wikipedia"))
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--candidates", type=int, nargs="+", default=[1024, 4000, 8192])
    args = parser.parse_args()
    data_dir = Path(".bench") / f"data-{args.size}"  # bench_service's
    data_dir.mkdir(parents=True, exist_ok=True)
    fill_store(data_dir, args.bundle, args.size)

    from app.bundle import load_bundle
    from app.engine import Engine
    from app.store import SqliteStore

    engine = Engine(
        load_bundle(args.bundle), SqliteStore(data_dir), ann_min_items=10**9, snapshot_dir=None
    )
    engine.load()
    gallery = engine.replicas["text"].gallery
    gallery.build_ann(AnnParams())
    assert gallery.ann is not None
    pool, n = gallery.pool, gallery.n_rows
    weights = gallery_weight_matrix(pool, gallery.neighbours[:n], gallery.weights[:n])
    with np.load(args.bundle / "default_gallery.npz") as default:  # real test images
        images = np.random.default_rng(1).permutation(default["image"])[: args.queries]
    queries = engine.embed_queries("image", images, "knn")

    kinds = ("gallery-wide", "knapsack", "per cluster", "true sparse")
    certified = {(size, kind): 0 for size in args.candidates for kind in kinds}
    parts: dict[str, list[float]] = {"10th score": [], "gallery-wide": [], "knapsack": []}
    for i in range(len(queries)):
        assert queries.codes is not None
        neighbours, query_weights = queries.codes.neighbours[i], queries.codes.weights[i]
        terms = query_weights.astype(np.float64) * pool.pair_correction[neighbours]
        sparse = np.zeros(pool.size)
        sparse[pool.partner(neighbours)] = terms
        sparse_terms = weights @ sparse
        scores = weights @ queries.profile[i].astype(np.float64)  # type: ignore[index]
        tenth = float(np.sort(scores)[-10])
        wide = min(float(terms.max()), float(terms.sum()) * float(gallery.weight_caps.max()))
        certificate = KnnCertificate(
            pool, neighbours, query_weights, gallery.weight_caps, gallery.cluster_caps
        )
        parts["10th score"].append(tenth)
        parts["gallery-wide"].append(wide)
        parts["knapsack"].append(certificate.sparse)
        for size in args.candidates:
            rows, dots, slack = gallery.ann.query(queries.codes.dense[i], size)
            dense = 0.5 + 0.5 * (float(dots.min()) + slack)
            outside = np.ones(n, dtype=bool)
            outside[rows] = False
            outside &= gallery.alive[:n]
            found = Candidates(rows, float(dots.min()) + slack)
            certified[size, "gallery-wide"] += dense + wide < tenth
            certified[size, "knapsack"] += dense + certificate.sparse < tenth
            certified[size, "per cluster"] += certificate(found, tenth)
            certified[size, "true sparse"] += dense + float(sparse_terms[outside].max()) < tenth
    print(
        f"{n:,} items, {len(queries)} queries; medians: "
        + ", ".join(f"{name} {np.median(values):.5f}" for name, values in parts.items())
    )
    print("| candidates L | " + " | ".join(f"certified, {kind}" for kind in kinds) + " |")
    print("| --- " * (len(kinds) + 1) + "|")
    for size in args.candidates:
        shares = [certified[size, kind] / len(queries) for kind in kinds]
        print(f"| {size} | " + " | ".join(f"{share:.3f}" for share in shares) + " |")


if __name__ == "__main__":
    main()
