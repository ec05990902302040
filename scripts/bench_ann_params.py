"""The knn ANN index's projection size, build effort and beam against recall, certification, time.

    OPENBLAS_NUM_THREADS=1 python -m scripts.bench_ann_params --size 200000 --dims 256 128

In one process, on the store scripts/bench_service.py fills (Wikipedia-like text items): the
gallery is loaded once, then for each projection size one knn index is built (the service's
own Gallery._build_knn_index) and the test images are searched through it
(Gallery.search_approximate, i.e. app.ann.certified_top_k) for each beam multiplier, against
the exact top 10 (Gallery.search_exact), once with the sparse term bounded gallery-wide
only and once with the per-cluster weight caps too (app.knn_certificate; the cosine clusters
are built once for them), side by side on the same index. Prints recall@10, the share of
certified answers, the median time per query in-process, and the index's bytes per item.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

import app.ann
from scripts.bench_service import fill_store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=Path("models/wikipedia"))
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--candidates", type=int, nargs="+", default=[1024])
    parser.add_argument(
        "--items-per-candidate",
        type=int,
        nargs="+",
        default=[app.ann.ITEMS_PER_CANDIDATE],
        help="the first list is at least gallery size / this (app.ann.ITEMS_PER_CANDIDATE)",
    )
    parser.add_argument("--ef", type=float, nargs="+", default=[2.0, 3.0], help="beam / candidates")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument(
        "--ef-construction",
        type=int,
        nargs="+",
        default=[app.ann.AnnParams().hnsw.ef_construction],
    )
    args = parser.parse_args()
    data_dir = args.data_dir or Path(".bench") / f"data-{args.size}"  # bench_service's
    data_dir.mkdir(parents=True, exist_ok=True)
    fill_store(data_dir, args.bundle, args.size)

    from app.bundle import load_bundle
    from app.engine import Engine
    from app.store import SqliteStore

    bundle = load_bundle(args.bundle)
    engine = Engine(bundle, SqliteStore(data_dir), ann_min_items=10**9, snapshot_dir=None)
    engine.load()
    gallery = engine.replicas["text"].gallery
    with np.load(args.bundle / "default_gallery.npz") as default:  # real test images
        images = np.random.default_rng(1).permutation(default["image"])[: args.queries]
    queries = engine.embed_queries("image", images, "knn")
    rows = [queries.part(i, i + 1) for i in range(len(queries))]
    exact = [[h.id for h in gallery.search_exact(one, 10, "knn")[0]] for one in rows]
    gallery.build_cosine_clusters(app.ann.AnnParams())
    cluster_caps = gallery.cluster_caps

    print(
        "| projection | ef_construction | build s | candidates | first list | beam | sparse bound "
        "| recall@10 | certified | p50 ms | index B / item |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dim, ef_construction in itertools.product(args.dims, args.ef_construction):
        hnsw = app.ann.AnnParams().hnsw.model_copy(update={"ef_construction": ef_construction})
        started = time.perf_counter()
        index = gallery._build_knn_index(app.ann.AnnParams(hnsw=hnsw, dim=dim))
        build_s = time.perf_counter() - started
        per_item = index.size_bytes() / index.index.get_max_elements()
        for candidates in args.candidates:
            index.params = app.ann.AnnParams(hnsw=hnsw, dim=dim, candidates=candidates)
            gallery.ann = index
            for per, ef, caps in itertools.product(
                args.items_per_candidate, args.ef, (None, cluster_caps)
            ):
                app.ann.ITEMS_PER_CANDIDATE = per
                app.ann.EF_PER_CANDIDATE = ef
                first = index.search_sizes(len(gallery), 10)[0]
                gallery.cluster_caps = caps
                seconds, found, certified = [], 0, 0
                for one, truth in zip(rows, exact, strict=True):
                    started = time.perf_counter()
                    hits, paths = gallery.search_approximate(one, 10, "knn")
                    seconds.append(time.perf_counter() - started)
                    found += len({h.id for h in hits[0]} & set(truth))
                    certified += paths[0] == "approximate"
                bound = "gallery-wide" if caps is None else "per cluster"
                print(
                    f"| {dim} | {ef_construction} | {build_s:.0f} | {candidates} | {first} | "
                    f"{ef} L | "
                    f"{bound} | "
                    f"{found / (10 * len(rows)):.4f} | {certified / len(rows):.3f} | "
                    f"{1e3 * float(np.median(seconds)):.2f} | {per_item:.0f} |",
                    flush=True,
                )
        gallery.ann = None
        del index


if __name__ == "__main__":
    main()
