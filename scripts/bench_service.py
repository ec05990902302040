"""Benchmark the service over HTTP against a real uvicorn, per gallery size.

For each size N it
1. fills a gallery store directly (SQLite, cached under --work): the text gallery holds the
   693 real Wikipedia test texts plus N - 693 synthetic texts drawn around them (a random
   test text + Gaussian noise of 0.1 x each feature's std, clipped at 0 and renormalised,
   since LDA proportions sum to 1); the image gallery is the real test images;
2. starts `cdpae serve` (a real uvicorn subprocess) on it and waits for /readyz (the service
   rebuilds its in-memory gallery from the store, as after a restart);
3. sends real test images to POST /search/image-to-text one at a time (latency p50/p99) and
   in batches of 256 (throughput), for knn (served: exact below CDPAE_ANN_MIN_ITEMS,
   approximate above), knn forced exact, knn forced approximate and cosine;
4. measures recall@10 of the approximate path against the exact ranking (same queries);
5. reads the server's RSS and its gallery memory gauge;
6. times the literal formula (tests.support.reference.literal_code_scores: W_q H W_g^T with the
   (2N, 2N) matrix H and the dense (N, 2N) W_g built the dense way) in this process for one
   query, where its memory fits in --literal-max-gb, and says how much it would need elsewhere.

    python -m scripts.bench_service --bundle .bench/wiki-quick --sizes 1000 10000 100000
    python -m scripts.bench_service --bundle .bench/wiki-quick --sizes 1000000 --queries 100

Results are printed as a markdown table and written to --out (JSON, one entry per size).
The client runs on the same machine as the server (2 shared cores): latencies include it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np

from app.bundle import load_bundle
from app.retrieval import (
    gallery_weight_matrix,
    profile_scores,
    query_profile,
    top_k,
)
from app.store import SqliteStore
from tests.support.reference import literal_code_scores
from tests.support.service import Server

ROOT = Path(__file__).resolve().parents[1]
# The server trims its freed heap after this many idle seconds; RSS is read again after 3x.
IDLE_TRIM_S = 2.0


def synthetic_texts(
    text: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n Wikipedia-like texts: (which real text each is drawn around, their features). A
    random real text + Gaussian noise of 0.1 x each feature's std, clipped at 0 and
    renormalised, since LDA proportions sum to 1."""
    base = rng.integers(0, len(text), size=n)
    noisy = np.clip(
        text[base] + 0.1 * text.std(axis=0) * rng.normal(size=(n, text.shape[1])), 0, None
    )
    noisy /= np.maximum(noisy.sum(axis=1, keepdims=True), 1e-12)
    return base, noisy.astype(np.float32)


def fill_store(data_dir: Path, bundle_dir: Path, size: int, seed: int = 0) -> float:
    """A store with `size` text items (real + synthetic) and the real test images; seconds."""
    marker = f"bench-{size}-{seed}"
    probe = SqliteStore(data_dir)
    try:
        if probe.get_meta("seeded") == marker:
            return 0.0
    finally:
        probe.close()
    for name in ("gallery.sqlite3", "gallery.sqlite3-wal", "gallery.sqlite3-shm"):
        (data_dir / name).unlink(missing_ok=True)
    started = time.perf_counter()
    with np.load(bundle_dir / "default_gallery.npz") as g:
        ids, cats, image, text = g["ids"], g["categories"], g["image"], g["text"]
    rng = np.random.default_rng(seed)
    store = SqliteStore(data_dir)
    texts = [(str(i), v, {"category": str(c)}) for i, v, c in zip(ids, text, cats, strict=True)]
    images = [(str(i), v, {"category": str(c)}) for i, v, c in zip(ids, image, cats, strict=True)]
    remaining = max(0, size - len(texts))
    chunk = 100_000
    # One transaction per chunk; the seed marker goes in with the first.
    first = True
    for start in range(0, max(remaining, 1), chunk):
        n = min(chunk, remaining - start)
        base, synthetic = synthetic_texts(text, n, rng)
        items = [
            (f"syn-{start + j}", synthetic[j], {"category": str(cats[b])})
            for j, b in enumerate(base)
        ]
        if first:
            items = texts[: min(size, len(texts))] + items
            store.seed({"text": items, "image": images}, marker=marker)
            first = False
        else:
            store.upsert("text", items)
        print(f"  store: {start + n + len(texts):,} text items", flush=True)
    store.close()
    return time.perf_counter() - started


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident size now (VmRSS) or at its peak (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def single_latencies(http: httpx.Client, queries: np.ndarray, extra: dict) -> np.ndarray:
    times = []
    for q in queries:
        body = {"vectors": [q.tolist()], "top_k": 10, **extra}
        t0 = time.perf_counter()
        r = http.post("/search/image-to-text", json=body)
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
    return np.array(times)


def batch_throughput(http: httpx.Client, queries: np.ndarray, extra: dict, batches: int) -> float:
    body = {"vectors": queries[:256].tolist(), "top_k": 10, **extra}
    http.post("/search/image-to-text", json=body).raise_for_status()  # warm
    t0 = time.perf_counter()
    for _ in range(batches):
        http.post("/search/image-to-text", json=body).raise_for_status()
    return batches * len(body["vectors"]) / (time.perf_counter() - t0)


def hits_of(
    http: httpx.Client, queries: np.ndarray, mode: str, similarity: str = "knn"
) -> list[list[dict]]:
    out = []
    for start in range(0, len(queries), 64):
        body = {
            "vectors": queries[start : start + 64].tolist(),
            "top_k": 10,
            "mode": mode,
            "similarity": similarity,
        }
        r = http.post("/search/image-to-text", json=body, timeout=600)
        r.raise_for_status()
        out += [res["hits"] for res in r.json()["results"]]
    return out


def recalls(approx: list[list[dict]], exact: list[list[dict]]) -> tuple[float, float]:
    """recall@10 of the approximate ids against the exact ones, strict and tie-aware.

    Tie-aware: an approximate hit also counts when its (exactly rescored) score equals the
    exact 10th score to 1e-6, i.e. it is as good as the item it replaced; float32 sums in a
    different order can swap such items, which no ranking can tell apart.
    """
    strict, tied = [], []
    for a, e in zip(approx, exact, strict=True):
        ids = {h["id"] for h in e}
        strict.append(sum(h["id"] in ids for h in a) / len(e))
        floor = e[-1]["score"] - 1e-6
        tied.append(sum(h["id"] in ids or h["score"] >= floor for h in a) / len(e))
    return float(np.mean(strict)), float(np.mean(tied))


def literal_seconds(
    bundle_dir: Path, data_dir: Path, size: int, query: np.ndarray, max_gb: float
) -> tuple[float | None, int, float | None]:
    """One query through literal_code_scores, or the memory it would need."""
    bundle = load_bundle(bundle_dir)
    two_n = bundle.pool.size
    need = 8 * (two_n * two_n * 2 + size * two_n + two_n)  # H (+ its product temp), W_g, W_q
    if need > max_gb * 1e9:
        return None, need, None
    store = SqliteStore(data_dir)
    features = np.concatenate(
        [np.stack([it.vector for it in chunk]) for chunk in store.iter_items("text", 50_000)]
    )
    store.close()
    gallery = bundle.codes(bundle.embed("text", features), num_threads=os.cpu_count() or 1)
    q = bundle.codes(bundle.embed("image", query[None, :]))
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        literal = literal_code_scores(bundle.pool, q, gallery)
        runs.append(time.perf_counter() - t0)
    # The served math for the same query in this process (no HTTP): raw features in,
    # ranked top 10 out, over the same gallery, checked equal to the literal scores.
    weights = gallery_weight_matrix(bundle.pool, gallery.neighbours, gallery.weights)
    served_runs = []
    for _ in range(20):
        t0 = time.perf_counter()
        codes = bundle.codes(bundle.embed("image", query[None, :]))
        scores = profile_scores(query_profile(bundle.pool, codes), weights)
        top_k(scores, 10)
        served_runs.append(time.perf_counter() - t0)
    assert np.allclose(scores, literal, atol=1e-5)
    return float(np.median(runs)), need, float(np.median(served_runs))


def bench_size(args: argparse.Namespace, size: int, queries: np.ndarray) -> dict:
    data_dir = args.work / f"data-{size}"
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"== {size:,} items", flush=True)
    fill_s = fill_store(data_dir, args.bundle, size)
    env = {
        "CDPAE_ANN_MIN_ITEMS": str(args.ann_min_items),
        "CDPAE_MAX_BODY_BYTES": str(64 << 20),
        "CDPAE_LOG_LEVEL": args.log_level,
        "CDPAE_IDLE_TRIM_S": str(IDLE_TRIM_S),
    }
    server = Server(args.bundle, data_dir, args.work / f"server-{size}.log", env=env)
    result: dict = {"size": size, "fill_store_s": round(fill_s, 1)}
    try:
        result["startup_s"] = round(server.wait_ready(args.startup_timeout), 1)
        print(f"  ready in {result['startup_s']} s", flush=True)
        result["ann_built_s"] = round(result["startup_s"] + _wait_for_ann(server.url), 1)
        n_single = min(args.queries, len(queries))
        with httpx.Client(base_url=server.url, timeout=600) as http:
            count = http.get("/gallery/text").json()["count"]
            assert count == max(size, 693) or count == size, count
            variants = {
                "knn": {"similarity": "knn"},
                "knn_exact": {"similarity": "knn", "mode": "exact"},
                "cosine": {"similarity": "cosine"},
                "cosine_exact": {"similarity": "cosine", "mode": "exact"},
                "knn_approx": {"similarity": "knn", "mode": "approximate"},
            }
            for name, extra in variants.items():
                if name == "knn_approx":
                    # measured before a forced approximate search builds an index below the
                    # size threshold
                    result["rss_bytes"] = rss_bytes(server.proc.pid)
                    # The server gives freed heap back once idle (CDPAE_IDLE_TRIM_S):
                    # what a replica holds between bursts of searches.
                    time.sleep(3 * IDLE_TRIM_S)
                    result["rss_idle_bytes"] = rss_bytes(server.proc.pid)
                    result["rss_peak_bytes"] = rss_bytes(server.proc.pid, "VmHWM")
                    metrics = http.get("/metrics").text
                    result["gallery_bytes"] = _gauge(
                        metrics, 'cdpae_gallery_memory_bytes{modality="text"}'
                    )
                single_latencies(http, queries[:5], extra)  # warm up
                lat = single_latencies(http, queries[:n_single], extra)
                qps = batch_throughput(http, queries, extra, args.batches)
                result[name] = {
                    "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 2),
                    "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 2),
                    "batch_qps": round(qps, 1),
                }
                print(f"  {name:<11} {result[name]}", flush=True)
            exact = hits_of(http, queries[: args.recall_queries], "exact")
            approx = hits_of(http, queries[: args.recall_queries], "approximate")
            strict, tied = recalls(approx, exact)
            result["ann_recall_at_10"] = round(strict, 4)
            result["ann_recall_at_10_ties"] = round(tied, 4)
            exact = hits_of(http, queries[: args.recall_queries], "exact", "cosine")
            approx = hits_of(http, queries[: args.recall_queries], "approximate", "cosine")
            strict, tied = recalls(approx, exact)
            result["cosine_recall_at_10"] = round(strict, 4)
            result["cosine_recall_at_10_ties"] = round(tied, 4)
            metrics = http.get("/metrics").text
            result["ann_gallery_bytes"] = _gauge(
                metrics, 'cdpae_gallery_memory_bytes{modality="text"}'
            )
            result["paths"] = {
                f"{similarity} {p}": _gauge(
                    metrics,
                    f'cdpae_search_queries_by_path{{path="{p}",similarity="{similarity}"}}',
                )
                for similarity in ("knn", "cosine")
                for p in ("exact", "approximate", "uncertified")
            }
            print(
                f"  recall@10 {result['ann_recall_at_10']} (ties {result['ann_recall_at_10_ties']})"
                f"  paths {result['paths']}",
                flush=True,
            )
    finally:
        server.stop(timeout=30)
    seconds, need, served = literal_seconds(
        args.bundle, data_dir, size, queries[0], args.literal_max_gb
    )
    result["literal_s"] = None if seconds is None else round(seconds, 3)
    result["served_inprocess_ms"] = None if served is None else round(1e3 * served, 2)
    result["literal_needs_gb"] = round(need / 1e9, 2)
    print(
        f"  literal: {result['literal_s']} s/query (needs {result['literal_needs_gb']} GB), "
        f"served math in-process {result['served_inprocess_ms']} ms",
        flush=True,
    )
    return result


def _wait_for_ann(url: str, timeout: float = 3600) -> float:
    """Seconds until no ANN index is being built in the background (measure the served
    paths, not the exact fallback of a gallery still indexing)."""
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        metrics = httpx.get(f"{url}/metrics").text
        if not _gauge(metrics, 'cdpae_gallery_ann_building{modality="text"}'):
            return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError("ANN indexes still building")


def _gauge(metrics: str, name: str) -> int:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[-1]))
    return 0


def _rss_cell(r: dict, unit: float, fmt: str, peak: bool = True) -> str:
    names = ["rss_bytes", "rss_idle_bytes"] + (["rss_peak_bytes"] if peak else [])
    return " / ".join(format(r[n] / unit, fmt) if n in r else "-" for n in names)


def table(results: list[dict]) -> str:
    head = (
        "| items | knn served p50 / p99 ms | knn exact p50 / p99 ms | knn approx p50 / p99 ms "
        "| cosine served p50 / p99 ms | cosine exact p50 / p99 ms "
        "| batch q/s knn / exact / approx / cosine "
        "| recall@10 knn approx (tie-aware) | recall@10 cosine approx (tie-aware) "
        "| literal s/query | literal / knn served | RSS MB after searches / idle / peak "
        "| RSS KB / item after searches / idle "
        "| gallery arrays KB / item | startup s |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in results:

        def cell(name: str, r: dict = r) -> str:
            return f"{r[name]['p50_ms']} / {r[name]['p99_ms']}"

        qps = " / ".join(
            f"{r[n]['batch_qps']:.0f}" for n in ("knn", "knn_exact", "knn_approx", "cosine")
        )
        if r["literal_s"] is None:
            literal, ratio = f"needs {r['literal_needs_gb']} GB", "-"
        else:
            literal = f"{r['literal_s']}"
            ratio = f"{1e3 * r['literal_s'] / r['knn']['p50_ms']:.0f}x"
            if r.get("served_inprocess_ms"):
                ratio += f" ({r['literal_s'] * 1e3 / r['served_inprocess_ms']:.0f}x in-process)"
        lines.append(
            f"| {r['size']:,} | {cell('knn')} | {cell('knn_exact')} | {cell('knn_approx')} | "
            f"{cell('cosine')} | {cell('cosine_exact')} | {qps} | {r['ann_recall_at_10']} "
            f"({r.get('ann_recall_at_10_ties', '-')}) | {r['cosine_recall_at_10']} "
            f"({r['cosine_recall_at_10_ties']}) | {literal} | {ratio} | "
            f"{_rss_cell(r, 1e6, '.0f')} | {_rss_cell(r, 1e3 * r['size'], '.2f', peak=False)} | "
            f"{r['ann_gallery_bytes'] / r['size'] / 1e3:.2f} | {r['startup_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", type=Path, required=True, help="a real Wikipedia bundle")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--queries", type=int, default=300, help="single queries per variant")
    p.add_argument("--batches", type=int, default=3, help="batches of 256 per variant")
    p.add_argument("--recall-queries", type=int, default=300)
    p.add_argument("--ann-min-items", type=int, default=50_000)
    p.add_argument("--literal-max-gb", type=float, default=4.0)
    p.add_argument("--startup-timeout", type=float, default=3600)
    p.add_argument("--log-level", default="warning", help="the server's CDPAE_LOG_LEVEL")
    p.add_argument("--work", type=Path, default=ROOT / ".bench")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default: WORK/results.json)"
    )
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work / "results.json"
    with np.load(args.bundle / "default_gallery.npz") as g:
        queries = np.random.default_rng(1).permutation(g["image"])
    previous = json.loads(out.read_text()) if out.exists() else {}
    for size in args.sizes:
        previous[str(size)] = bench_size(args, size, queries)
        out.write_text(json.dumps(previous, indent=2) + "\n")
    print(table([previous[k] for k in sorted(previous, key=int)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
