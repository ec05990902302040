"""First start vs restart of `cdpae serve` on a large gallery, SQLite and PostgreSQL.

    python -m scripts.bench_restart --bundle models/wikipedia --size 200000

For each store it fills a gallery of `size` Wikipedia-like text items (the 693 real test
texts plus synthetic texts drawn around them, as scripts/bench_service.py makes them: raw
features only, no derived data), then starts a real `cdpae serve` five times and times each
start from spawning the process to a 200 from /readyz:
1. the first start embeds every item and writes its derived data back; its ANN indexes are
   built in the background after ready, then the snapshot (app/snapshot.py) is written;
2. a restart reads the snapshot (ANN indexes included);
3. a restart with CDPAE_SNAPSHOTS=false loads from the store (the derived data stored there);
4. a start from the snapshot takes `--crash-writes` upserts and is killed with kill -9;
5. the restart after it reads the (older) snapshot and catches up on those writes.
Exact rankings of 20 test images, asked of starts 1-4 (the same items), must be equal.
PostgreSQL is a throwaway server from tests/support/postgres.py.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

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
QUERIES = 20


@dataclass
class Start:
    """One start of `cdpae serve`, as measured and as its log tells it."""

    what: str
    ready: float = 0.0  # seconds from spawning the process to /readyz 200
    ann: str = "-"  # the text gallery's ANN indexes: seconds until built, or "loaded"
    snapshot_write: str = "-"  # seconds the text gallery's snapshot took to write
    embedded: int = 0
    caught_up: int = 0
    rss_gb: float = 0.0  # the server's resident size once ready (and its indexes in place)
    rankings: list = field(default_factory=list)


def _wait_for_line(log: Path, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for line in log.read_text().splitlines():
            if needle in line:
                return line
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {needle!r} in {log} within {timeout:.0f} s")
        time.sleep(0.5)


def _rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.findall(r"VmRSS:\s+(\d+) kB", status)[0]) * 1024


def _rankings(url: str, queries: np.ndarray) -> list:
    """Exact-mode rankings (ids and scores) of the queries: equal across starts of one store."""
    out = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for similarity in ("knn", "cosine"):
            body = {"vectors": queries.tolist(), "top_k": 10, "similarity": similarity,
                    "mode": "exact"}  # fmt: skip
            response = http.post("/search/image-to-text", json=body)
            response.raise_for_status()
            out.append(
                [[(h["id"], h["score"]) for h in r["hits"]] for r in response.json()["results"]]
            )
    return out


def _start(
    what: str,
    bundle: Path,
    data_dir: Path,
    log: Path,
    store: str | None,
    size: int,
    queries: np.ndarray,
    env: dict[str, str] | None = None,
    writes_then_kill: int = 0,
) -> Start:
    """Start a server, time it to ready, wait for its ANN indexes and snapshot, stop it
    (gracefully, or with kill -9 after `writes_then_kill` upserts)."""
    extra = ("--store", store) if store else ()
    server = Server(bundle, data_dir, log, *extra, env={"CDPAE_LOG_LEVEL": "info", **(env or {})})
    start = Start(what)
    try:
        server.wait_ready(3600)
        start.ready = time.monotonic() - server.started
        text = log.read_text()
        if "text gallery: " in text and "(ANN indexes loaded)" in text:
            start.ann = "loaded"
        elif size >= ANN_MIN_ITEMS:
            _wait_for_line(log, "text gallery: ANN indexes", 3600)
            start.ann = f"{time.monotonic() - server.started:.1f}"
        snapshots = (env or {}).get("CDPAE_SNAPSHOTS") != "false"
        if size >= ANN_MIN_ITEMS and snapshots and start.ann != "loaded":
            line = _wait_for_line(log, "text gallery: snapshot of", 3600)
            start.snapshot_write = re.findall(r"written in ([\d.]+) s", line)[0]
        start.rss_gb = _rss_bytes(server.proc.pid) / 1e9
        start.rankings = _rankings(server.url, queries)
        if writes_then_kill:
            rng = np.random.default_rng(1)
            dim = json.loads((bundle / "manifest.json").read_text())["input_dims"]["text"]
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for batch in range(writes_then_kill // 100):
                    vectors = np.abs(rng.normal(size=(100, dim))).astype(np.float32)
                    items = [{"id": f"crash-{batch}-{i}", "vector": v.tolist(), "metadata": {}}
                             for i, v in enumerate(vectors)]  # fmt: skip
                    http.put("/gallery/text/items", json={"items": items}).raise_for_status()
            server.kill9()
        else:
            server.stop(timeout=600)
    except BaseException:
        server.stop(timeout=60)
        raise
    text = log.read_text()
    start.embedded = sum(int(n) for n in re.findall(r"\((\d+) embedded", text))
    start.caught_up = sum(int(n) for n in re.findall(r"then (\d+) changes caught up", text))
    return start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--size", type=int, default=200_000)
    p.add_argument("--stores", nargs="+", default=["sqlite", "postgres"])
    p.add_argument("--crash-writes", type=int, default=1000,
                   help="upserts between the last snapshot and the kill -9")  # fmt: skip
    p.add_argument("--no-store-restart", action="store_true",
                   help="skip start 3 (a restart from the store; at 1M items its ANN indexes "
                   "take minutes to rebuild)")  # fmt: skip
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    bundle = args.bundle.resolve()
    with np.load(bundle / "default_gallery.npz") as g:
        queries = g["image"][:QUERIES].astype(np.float32)
    results: dict[str, list[Start]] = {}
    postgres = PostgresServer() if "postgres" in args.stores else None
    try:
        for kind in args.stores:
            data_dir = work / f"data-{kind}"
            print(f"== {kind}: filling {args.size:,} text items", flush=True)
            fill_store(data_dir, bundle, args.size)
            url = None
            if kind == "postgres":
                assert postgres is not None
                url = postgres.create_database("bench")
                _copy_to(url, data_dir)
                for name in Path(data_dir).glob("gallery.sqlite3*"):
                    name.unlink()
            plan = [
                ("first start (embeds every item)", {}, 0),
                ("restart from the snapshot", {}, 0),
                ("restart from the store (CDPAE_SNAPSHOTS=false)", {"CDPAE_SNAPSHOTS": "false"}, 0),
                (f"start, {args.crash_writes} upserts, kill -9", {}, args.crash_writes),
                ("restart after the kill -9 (snapshot + catch-up)", {}, 0),
            ]
            if args.no_store_restart:
                del plan[2]
            starts = results[kind] = []
            for n, (what, env, writes) in enumerate(plan):
                log = work / f"{kind}-{n}.log"
                start = _start(what, bundle, data_dir, log, url, args.size, queries, env, writes)
                starts.append(start)
                print(f"  {what}: ready {start.ready:.1f} s, ANN {start.ann}, "
                      f"snapshot written in {start.snapshot_write} s, embedded {start.embedded}, "
                      f"caught up {start.caught_up}, RSS {start.rss_gb:.2f} GB",
                      flush=True)  # fmt: skip
            same = all(s.rankings == starts[0].rankings for s in starts[:-1])
            print(f"  exact rankings of {QUERIES} queries equal before the kill: {same}")
            assert same, "a restart from the snapshot ranks differently from one from the store"
    finally:
        if postgres is not None:
            postgres.destroy()
    print(f"\n{args.size:,} text items (+ 693 images); seconds from spawning `cdpae serve` "
          "to /readyz 200")  # fmt: skip
    print("| store | start | ready s | text ANN indexes (s to built, or loaded) "
          "| snapshot write s | embedded | changes caught up | RSS GB |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, starts in results.items():
        for s in starts:
            print(f"| {kind} | {s.what} | {s.ready:.1f} | {s.ann} | {s.snapshot_write} | "
                  f"{s.embedded:,} | {s.caught_up:,} | {s.rss_gb:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
