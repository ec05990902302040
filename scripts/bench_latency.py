"""Latency of one query over HTTP at the default gallery, against the HTTP floor.

    python -m scripts.bench_latency --bundle models/wikipedia --requests 1000 \\
        [--baseline-src /path/to/an/older/checkout] [--extra-items 3400]

Starts `cdpae serve` (a real uvicorn) on the bundle with a fresh, seeded store (the bundle's
default gallery: 693 items per modality for Wikipedia) and sends, round robin,
GET /healthz (the floor: routing, middleware, JSON), one knn search and one cosine search
(top_k 10, a real test image each time) over one keep-alive connection. With
--baseline-src the same runs against a second server started from another checkout, in
the same rounds, so the two are measured side by side on this shared machine. With
--extra-items the text gallery first grows by that many items (real text features of the
default gallery, each with a little noise), to time galleries larger than the default.
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
    p.add_argument("--extra-items", type=int, default=0, help="text items added before timing")
    args = p.parse_args(argv)
    default = load_bundle(args.bundle).default_gallery()
    queries = default.features["image"]
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
        for client in clients.values():
            _add_text_items(client, default.features["text"], args.extra_items)
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
        gallery_size = len(default.features["text"]) + args.extra_items
        print(f"{args.requests} rounds, p50 / p99 ms, a text gallery of {gallery_size} items")
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


def _add_text_items(client: httpx.Client, features: np.ndarray, n: int) -> None:
    rng = np.random.default_rng(1)
    for start in range(0, n, 1000):
        count = min(1000, n - start)
        base = features[rng.integers(len(features), size=count)]
        noisy = base + rng.normal(scale=0.01 * base.std(), size=base.shape)
        items = [
            {"id": f"extra-{start + i}", "vector": v.tolist(), "metadata": {}}
            for i, v in enumerate(noisy)
        ]
        client.put("/gallery/text/items", json={"items": items}).raise_for_status()


if __name__ == "__main__":
    raise SystemExit(main())
