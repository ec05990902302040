"""Latency of one query over HTTP at the default gallery, against the HTTP floor.

    python -m scripts.bench_latency --bundle models/wikipedia --requests 1000 \\
        [--baseline-src /path/to/an/older/checkout]

Starts `cdpae serve` (a real uvicorn) on the bundle with a fresh, seeded store (the bundle's
default gallery: 693 items per modality for Wikipedia) and sends, round robin,
GET /healthz (the floor: routing, middleware, JSON), one knn search and one cosine search
(top_k 10, a real test image each time) over one keep-alive connection. With
--baseline-src the same runs against a second server started from another checkout, in
the same rounds, so the two are measured side by side on this shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from app.bundle import load_bundle
from tests.support.service import Server


def _percentiles(samples: list[float]) -> str:
    ms = np.asarray(samples) * 1e3
    return f"{np.median(ms):.2f} / {np.percentile(ms, 99):.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--requests", type=int, default=1000, help="rounds (one of each request)")
    p.add_argument("--baseline-src", type=Path, help="another checkout to serve side by side")
    args = p.parse_args(argv)
    queries = load_bundle(args.bundle).default_gallery().features["image"]
    sources = {"this checkout": None}
    if args.baseline_src:
        sources[f"baseline ({args.baseline_src})"] = args.baseline_src
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    servers = {
        name: Server(
            args.bundle.resolve(),
            work / f"data-{i}",
            work / f"server-{i}.log",
            env={"CDPAE_LOG_LEVEL": "warning"},
            cwd=src,
        )
        for i, (name, src) in enumerate(sources.items())
    }
    try:
        for server in servers.values():
            server.wait_ready(120)
        clients = {name: httpx.Client(base_url=s.url, timeout=30) for name, s in servers.items()}
        times: dict[str, dict[str, list[float]]] = {
            name: {"healthz": [], "knn": [], "cosine": []} for name in servers
        }
        rng = np.random.default_rng(0)
        for round_no in range(args.requests + 20):  # the first 20 rounds warm up
            vector = queries[rng.integers(len(queries))].tolist()
            for name, client in clients.items():
                for kind in ("healthz", "knn", "cosine"):
                    started = time.perf_counter()
                    if kind == "healthz":
                        r = client.get("/healthz")
                    else:
                        body = {"vectors": [vector], "top_k": 10, "similarity": kind}
                        r = client.post("/search/image-to-text", json=body)
                    elapsed = time.perf_counter() - started
                    r.raise_for_status()
                    if round_no >= 20:
                        times[name][kind].append(elapsed)
        print(f"{args.requests} rounds, p50 / p99 ms, default gallery of {len(queries)} items")
        print("| server | GET /healthz | knn search | cosine search | knn - healthz |")
        print("| --- | --- | --- | --- | --- |")
        for name, t in times.items():
            gap = np.median(t["knn"]) - np.median(t["healthz"])
            print(
                f"| {name} | {_percentiles(t['healthz'])} | {_percentiles(t['knn'])} | "
                f"{_percentiles(t['cosine'])} | {gap * 1e3:.2f} |"
            )
    finally:
        for server in servers.values():
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
