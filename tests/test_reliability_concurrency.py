"""Concurrency: threads searching (exact, filtered, cosine, approximate) while others upsert and
delete the same ids. No crash, no hit naming an item whose delete was acknowledged before the
search began (and not re-added since), no acknowledged live item missing, counts consistent."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import numpy as np

from app.ann import AnnParams
from app.bundle import load_bundle
from app.engine import Engine
from app.store import SqliteStore

N_IDS = 24  # contested ids, split between the writer threads (one writer per id: a history)
WRITERS = 2
SEARCHERS = 4
SECONDS = 3.0


@dataclass(frozen=True)
class Event:
    kind: str  # "put" or "del"
    started: float
    acked: float


def _history_state(events: list[Event], t0: float, t1: float) -> tuple[bool, bool]:
    """(must be absent, must be present) for a search that ran over [t0, t1]."""
    before = [e for e in events if e.acked < t0]
    overlapping = [e for e in events if e.acked >= t0 and e.started <= t1]
    last = before[-1] if before else None
    if last is None or last.kind == "del":
        # absent unless an upsert overlapping the search could have become visible
        return not any(e.kind == "put" for e in overlapping), False
    return False, not any(e.kind == "del" for e in overlapping)


def test_searches_during_contested_writes(synthetic_bundle, tmp_path):
    bundle = load_bundle(synthetic_bundle)
    store = SqliteStore(tmp_path / "data")
    engine = Engine(bundle, store, ann_params=AnnParams(candidates=8), ann_min_items=0)
    engine.seed_if_empty()
    engine.load()
    base = {i for i in engine.replicas["text"].gallery.row_of}
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(N_IDS, 8)).astype(np.float32)
    queries = bundle.default_gallery().features["image"][:6]
    ids = [f"c-{i}" for i in range(N_IDS)]
    history: dict[str, list[Event]] = {i: [] for i in ids}
    stop = threading.Event()
    errors: list[BaseException] = []
    violations: list[str] = []
    searches = [0]

    def writer(mine: list[str], seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                item_id = r.choice(mine)
                live = bool(history[item_id]) and history[item_id][-1].kind == "put"
                started = time.monotonic()
                if live and r.random() < 0.6:
                    assert engine.delete("text", item_id) is not None
                    kind = "del"
                else:
                    n = int(item_id[2:])
                    engine.upsert(
                        "text", [item_id], vectors[n : n + 1], [{"category": "contested"}]
                    )
                    kind = "put"
                history[item_id].append(Event(kind, started, time.monotonic()))
        except BaseException as exc:
            errors.append(exc)

    def searcher(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                similarity = r.choice(["knn", "cosine"])
                mode = r.choice(["exact", "approximate", "auto"]) if similarity == "knn" else "auto"
                flt = {"category": "contested"} if r.random() < 0.3 else None
                q = queries[r.randrange(len(queries)) :][:1]
                t0 = time.monotonic()
                hits = engine.search("image", q, 1000, similarity, flt, mode)[0]
                t1 = time.monotonic()
                searches[0] += 1
                found = [h.id for h in hits]
                assert len(found) == len(set(found)), found
                scores = [h.score for h in hits]
                assert scores == sorted(scores, reverse=True)
                assert all(np.isfinite(scores))
                if flt is None:
                    assert base <= set(found)  # untouched items are always there
                for item_id in ids:
                    must_be_absent, must_be_present = _history_state(history[item_id], t0, t1)
                    if must_be_absent and item_id in found:
                        violations.append(f"{item_id} deleted before the search, still found")
                    if must_be_present and item_id not in found:
                        violations.append(f"{item_id} acknowledged before the search, missing")
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(ids[w::WRITERS], w)) for w in range(WRITERS)
    ] + [threading.Thread(target=searcher, args=(100 + s,)) for s in range(SEARCHERS)]
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert not violations, violations[:5]
    writes = sum(len(h) for h in history.values())
    print(f"{writes} contested writes, {searches[0]} searches in {SECONDS:.0f} s, 0 violations")
    assert writes > 50 and searches[0] > 50, (writes, searches[0])

    # counts consistent: the history, memory and the store agree, and so does a fresh load
    live = {i for i, h in history.items() if h and h[-1].kind == "put"}
    gallery = engine.replicas["text"].gallery
    assert set(gallery.row_of) == base | live
    assert engine.count("text") == store.count("text") == len(base) + len(live)
    assert int(gallery.alive[: gallery.n_rows].sum()) == len(gallery)
    assert sum(gallery.metadata_index.value_counts("category").values()) == len(gallery)
    fresh = Engine(bundle, store, ann_min_items=0)
    fresh.load()
    assert set(fresh.replicas["text"].gallery.row_of) == base | live
    store.close()
