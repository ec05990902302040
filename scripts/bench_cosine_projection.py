"""Would a projection + residual bound do for cosine? What the route to 1 KB per item leaves.

    python -m scripts.bench_cosine_projection --bundle models/wikipedia --items 200000

For unit vectors u_q.u_g = Pu_q.Pu_g + r_q.r_g (P: the pool's top `--dim` principal
directions, r = u - Pu), so |u_q.u_g - Pu_q.Pu_g| <= |r_q| |r_g|. A gallery that kept P u_g
(1 KB at dim 256) and |r_g| instead of u_g (4 KB) could scan the projections and rescore
exactly only the items whose upper bound reaches the k-th best lower bound, re-embedding them
from raw features. This prints, on `--items` Wikipedia-like text items (real test texts plus
noise, as scripts/bench_service.py makes them) and the real test images as queries:
the residual norms, how many items remain to rescore for k = 10 and 100, whether the bound
ever failed, and the median time of a projected scan against today's full float32 scan.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from app.bundle import load_bundle
from app.projection import ROUNDING_SLACK, Projection, contenders
from app.retrieval import cosine_scores
from scripts.bench_service import synthetic_texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/wikipedia"))
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    gallery = bundle.default_gallery()
    # The same projection the gallery keeps (app.projection).
    projection = Projection.of(bundle.pool, args.dim)
    assert projection.basis is not None, f"--dim {args.dim} must be below {bundle.pool.dim}"
    _, features = synthetic_texts(gallery.features["text"], args.items, np.random.default_rng(0))
    units = np.vstack(
        [bundle.embed("text", features[i : i + 8192]) for i in range(0, len(features), 8192)]
    )
    projected, residual = projection.project(units)
    queries = bundle.embed("image", gallery.features["image"][: args.queries])
    q_projected, q_residual = projection.project(queries)
    print(f"{args.items:,} text items, {len(queries)} image queries, projection to {args.dim}")
    print(
        "gallery residual |r_g| p50/p90/p99/max:",
        np.round(np.percentile(residual, [50, 90, 99, 100]), 4),
    )
    print(
        "query residual |r_q| p50/p90/max:", np.round(np.percentile(q_residual, [50, 90, 100]), 4)
    )

    full_ms, projected_ms, remaining = [], [], {10: [], 100: []}
    violations = 0
    for i in range(len(queries)):
        started = time.perf_counter()
        exact = cosine_scores(queries[i : i + 1], units)[0]
        full_ms.append(1e3 * (time.perf_counter() - started))
        started = time.perf_counter()
        approx = cosine_scores(q_projected[i : i + 1], projected)[0]
        projected_ms.append(1e3 * (time.perf_counter() - started))
        slack = q_residual[i] * residual + ROUNDING_SLACK
        violations += int((np.abs(exact - approx) > slack).sum())
        for k in remaining:
            remaining[k].append(int(contenders(approx[None], slack[None], k).sum()))
    for k, counts in remaining.items():
        print(f"k={k}: left to rescore median {statistics.median(counts):.0f}, max {max(counts)}")
    print(f"bound violated for {violations} of {len(queries) * args.items:,} (query, item) pairs")
    print(
        f"scan median: full float32 {statistics.median(full_ms):.1f} ms, "
        f"projected {statistics.median(projected_ms):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
