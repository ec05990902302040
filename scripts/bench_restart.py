"""First start vs restart of `cdpae serve` on a large gallery, SQLite and PostgreSQL.

    python -m scripts.bench_restart --bundle models/wikipedia --size 200000

For each store it fills a gallery of `size` Wikipedia-like text items (the 693 real test
texts plus synthetic texts drawn around them, as scripts/bench_service.py makes them: raw
features only, no derived data), then starts a real `cdpae serve` twice and times each
start to a 200 from /readyz: the first start embeds every item and writes its derived data
back; the restart loads it. The ANN indexes of a large gallery are built in the background
after ready; the time until they are in place is reported too (from the server's log).
PostgreSQL is a throwaway server from tests/support/postgres.py.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import httpx

from app.store import SqliteStore, open_store
from scripts.bench_service import fill_store
from tests.support.postgres import PostgresServer
from tests.support.service import Server


def _copy_to(target_url: str, source_dir: Path) -> None:
    """The SQLite store's items into the PostgreSQL store (raw features and metadata)."""
    source = SqliteStore(source_dir)
    target = open_store(target_url, source_dir)
    target.seed({"text": [], "image": []}, marker="bench")
    for modality in ("text", "image"):
        for chunk in source.iter_items(modality, chunk=10_000):
            target.upsert(modality, [(it.id, it.vector, it.metadata) for it in chunk])
    source.close()
    target.close()


ANN_MIN_ITEMS = 50_000  # the service's default CDPAE_ANN_MIN_ITEMS


def _time_start(
    bundle: Path, data_dir: Path, log: Path, store: str | None, size: int
) -> tuple[float, float]:
    """(seconds to ready, seconds until the ANN indexes were built; 0: none to build)."""
    extra = ("--store", store) if store else ()
    server = Server(bundle, data_dir, log, *extra, env={"CDPAE_LOG_LEVEL": "info"})
    try:
        ready = server.wait_ready(3600)
        started = time.monotonic() - ready
        ann = 0.0
        if size >= ANN_MIN_ITEMS:
            deadline = time.monotonic() + 1800
            while "built in the background" not in log.read_text():
                assert time.monotonic() < deadline, "ANN indexes not built within 30 min"
                time.sleep(0.5)
            ann = time.monotonic() - started
        with httpx.Client(base_url=server.url) as http:
            assert http.get("/gallery/text").json()["count"] > 0
    finally:
        server.stop(timeout=60)
    return ready, ann


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--size", type=int, default=200_000)
    p.add_argument("--stores", nargs="+", default=["sqlite", "postgres"])
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    rows = []
    postgres = PostgresServer() if "postgres" in args.stores else None
    try:
        for kind in args.stores:
            data_dir = work / f"data-{kind}"
            print(f"== {kind}: filling {args.size:,} text items", flush=True)
            fill_store(data_dir, args.bundle.resolve(), args.size)
            url = None
            if kind == "postgres":
                assert postgres is not None
                url = postgres.create_database("bench")
                _copy_to(url, data_dir)
                for name in Path(data_dir).glob("gallery.sqlite3*"):
                    name.unlink()
            bundle = args.bundle.resolve()
            first = _time_start(bundle, data_dir, work / f"{kind}-1.log", url, args.size)
            print(f"  first start: ready {first[0]:.1f} s, ANN {first[1]:.1f} s", flush=True)
            again = _time_start(bundle, data_dir, work / f"{kind}-2.log", url, args.size)
            print(f"  restart:     ready {again[0]:.1f} s, ANN {again[1]:.1f} s", flush=True)
            embedded = re.findall(r"\((\d+) embedded", (work / f"{kind}-2.log").read_text())
            rows.append((kind, first, again, embedded))
    finally:
        if postgres is not None:
            postgres.destroy()
    print(f"\n{args.size:,} text items (+ 693 images), seconds from start to /readyz 200")
    print("| store | first start: ready | ANN built | restart: ready | ANN built | "
          "items embedded at restart |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, first, again, embedded in rows:
        print(f"| {kind} | {first[0]:.1f} | {first[1]:.1f} | {again[0]:.1f} | {again[1]:.1f} | "
              f"{', '.join(embedded)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
