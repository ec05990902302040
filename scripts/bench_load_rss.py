"""Resident size per item after a gallery load, with and without giving freed heap back.

    python -m scripts.bench_load_rss --bundle models/wikipedia --size 200000

Fills (once) a SQLite store of `size` Wikipedia-like text items (scripts/bench_service.py's
fill_store), then loads it in two fresh processes with the engine's first-start path
(embedding, no ANN index, no snapshot): one as the service does (app.memory's malloc_trim
after the load), one with that call disabled. Prints RSS growth and array bytes per item.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.bench_service import fill_store, rss_bytes


def measure(bundle_dir: Path, data_dir: Path, trim: bool) -> dict[str, float]:
    """One load in this process (call it in a fresh one)."""
    import app.replica
    from app.bundle import load_bundle
    from app.engine import Engine
    from app.store import SqliteStore

    if not trim:
        app.replica.release_freed_memory = lambda: None
    bundle = load_bundle(bundle_dir)
    before = rss_bytes(os.getpid())
    engine = Engine(bundle, SqliteStore(data_dir), ann_min_items=10**9, snapshot_dir=None)
    engine.load()
    grown = (rss_bytes(os.getpid()) - before) / 2**20
    items = sum(len(r.gallery) for r in engine.replicas.values())
    arrays = sum(r.gallery.nbytes() for r in engine.replicas.values()) / 2**20
    return {"items": items, "rss_kb": grown * 1024 / items, "arrays_kb": arrays * 1024 / items}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=Path("models/wikipedia"))
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--child", choices=["trim", "no-trim"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.gettempdir()) / f"cdpae-load-rss-{args.size}"
    if args.child:
        print(json.dumps(measure(args.bundle, data_dir, args.child == "trim")))
        return
    data_dir.mkdir(exist_ok=True)
    fill_store(data_dir, args.bundle, args.size)
    print("| load | items | RSS KB / item | arrays KB / item |")
    print("| --- | --- | --- | --- |")
    for child in ("no-trim", "trim"):
        out = (
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "scripts.bench_load_rss",
                    "--bundle",
                    str(args.bundle),
                    "--size",
                    str(args.size),
                    "--data-dir",
                    str(data_dir),
                    "--child",
                    child,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        row = json.loads(out)
        label = "malloc_trim after the load" if child == "trim" else "without it"
        print(f"| {label} | {row['items']:,} | {row['rss_kb']:.2f} | {row['arrays_kb']:.2f} |")


if __name__ == "__main__":
    main()
