"""Where an exact scan of the training pool beats its HNSW index for a query's k neighbours.

    OPENBLAS_NUM_THREADS=1 python -m scripts.bench_training_knn --sizes 500 1000 2000 4346 8000

Random unit pools of each size (C = 1024, k = 100, the bundles' HNSW parameters
app.bundle.TRAIN_INDEX_HNSW: M = 32, ef = 200), one query at a time as the service asks:
median milliseconds of each path and the recall of HNSW against the scan. The crossover it
prints is what app.bundle.EXACT_KNN_MAX_POOL is set from (docs/service.md).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from app.bundle import TRAIN_INDEX_HNSW
from app.retrieval import TrainingPool, unit_rows


def _median_ms(fn: Callable[[np.ndarray], object], queries: np.ndarray) -> float:
    fn(queries[:1])
    times = []
    for q in queries:
        started = time.perf_counter()
        fn(q[None, :])
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 4346, 8000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    search = TRAIN_INDEX_HNSW.searching_at_least(args.k)  # as app.bundle.load_bundle does
    print("| pool size | exact scan ms | HNSW ms | HNSW recall@k |")
    print("| --- | --- | --- | --- |")
    for size in args.sizes:
        size -= size % 2
        # clustered like trained embeddings, not uniform on the sphere
        centres = rng.normal(size=(20, args.dim))
        units = unit_rows(centres[rng.integers(0, 20, size)] + rng.normal(size=(size, args.dim)))
        pool = TrainingPool(units)
        index = search.new_index(args.dim, size)
        index.add_items(units, np.arange(size))
        queries = unit_rows(
            units[rng.integers(0, size, args.queries)]
            + 0.5 * rng.normal(size=(args.queries, args.dim))
        )
        k = min(args.k, size)
        exact_ms = _median_ms(partial(pool.exact_neighbours, k=k), queries)
        hnsw_ms = _median_ms(partial(index.knn_query, k=k, num_threads=1), queries)
        exact_ids, _ = pool.exact_neighbours(queries, k)
        hnsw_ids, _ = index.knn_query(queries, k=k)
        pairs = zip(exact_ids, hnsw_ids, strict=True)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in pairs])
        print(f"| {size} | {exact_ms:.3f} | {hnsw_ms:.3f} | {recall:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
