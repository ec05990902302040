"""Where a large gallery's resident size goes: RSS and glibc's heap, stage by stage.

    OPENBLAS_NUM_THREADS=1 python -m scripts.bench_rss_stages --size 200000

In one process, with the service's own engine (no HTTP): the bundle loaded, the store's
items loaded (first start: embedded), the ANN indexes built, then single and batched
searches of each similarity and mode, as scripts/bench_service.py runs them (timed: the
median of the single queries, the batch's milliseconds). After each stage: RSS, the bytes
glibc's allocator hands out (in use), what it holds freed (free), its mmapped blocks, and
what the gallery's arrays and indexes account for. What RSS holds beyond the arrays and
malloc's in-use bytes is freed memory not given back, or memory allocated outside malloc.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np

from scripts.bench_service import fill_store, rss_bytes


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap() -> MallInfo2:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def report(stage: str, items: int, gallery_bytes: int, ms: str = "") -> None:
    info = heap()
    mb = 2**20
    rss = rss_bytes(os.getpid())
    print(
        f"| {stage} | {rss / mb:,.0f} | {(info.uordblks + info.hblkhd) / mb:,.0f} | "
        f"{info.hblkhd / mb:,.0f} | {info.fordblks / mb:,.0f} | {gallery_bytes / mb:,.0f} | "
        f"{rss / max(items, 1) / 1024:.2f} | {ms} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=Path("models/wikipedia"))
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--trace", action="store_true", help="print numpy's largest live blocks")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(".bench") / f"data-{args.size}"  # bench_service's
    data_dir.mkdir(parents=True, exist_ok=True)
    fill_store(data_dir, args.bundle, args.size)

    from app.ann import AnnParams
    from app.bundle import load_bundle
    from app.engine import Engine
    from app.memory import release_freed_memory
    from app.store import SqliteStore

    print(
        "| stage | RSS MB | malloc in use MB | of it mmapped | malloc free MB "
        "| arrays + indexes MB | RSS KB / item | ms (single: median per query) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    bundle = load_bundle(args.bundle)
    report("bundle loaded", args.size, 0)
    engine = Engine(bundle, SqliteStore(data_dir), ann_min_items=10**9, snapshot_dir=None)
    engine.load()
    gallery = engine.replicas["text"].gallery
    report("gallery loaded (trimmed)", len(gallery), gallery.nbytes())
    with gallery.lock.write():
        gallery.build_ann(AnnParams())
    report("ANN indexes built", len(gallery), gallery.nbytes())
    release_freed_memory()
    report("... trimmed", len(gallery), gallery.nbytes())

    with np.load(args.bundle / "default_gallery.npz") as default:  # real test images
        images = np.random.default_rng(1).permutation(default["image"])[:256]
    if args.trace:
        tracemalloc.start(8)
    for similarity in ("knn", "cosine"):
        for mode in ("approximate", "exact"):
            seconds = []
            for row in images[: args.queries]:
                started = time.perf_counter()
                engine.search("image", row[None, :], 10, similarity, None, mode)
                seconds.append(time.perf_counter() - started)
            median = f"{1e3 * float(np.median(seconds)):.2f}"
            report(
                f"{args.queries} single {similarity} {mode}", len(gallery), gallery.nbytes(), median
            )
            started = time.perf_counter()
            engine.search("image", images, 10, similarity, None, mode)
            batch = f"{1e3 * (time.perf_counter() - started):.0f}"
            report(f"batch of 256 {similarity} {mode}", len(gallery), gallery.nbytes(), batch)
            if args.trace:
                for stat in tracemalloc.take_snapshot().statistics("traceback")[:3]:
                    print(f"  {stat.size / 2**20:.0f} MB live, allocated at:")
                    print("    " + "\n    ".join(stat.traceback.format()))
    release_freed_memory()
    report("... trimmed", len(gallery), gallery.nbytes())


if __name__ == "__main__":
    main()
