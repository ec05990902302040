"""A small gallery's search runs on the event loop; any other in a worker thread."""

from __future__ import annotations

import asyncio

import app.engine
from app.bundle import load_bundle
from app.engine import Engine
from app.store import SqliteStore
from tests.support.service import service


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_quick_searches_run_on_the_event_loop_and_others_in_a_worker(
    synthetic_bundle, tmp_path, monkeypatch
):
    where: list[bool] = []
    search = Engine.search

    def recording_search(self, *args, **kwargs):
        where.append(_on_event_loop())
        return search(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "search", recording_search)
    with service(synthetic_bundle, tmp_path / "data", ann_min_items=0) as client:
        vectors = load_bundle(synthetic_bundle).default_gallery().features["image"][:2].tolist()

        def ask(n: int, **extra) -> dict:
            body = {"vectors": vectors[:n], "top_k": 5, **extra}
            response = client.post("/search/image-to-text", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        one = ask(1)
        ask(1, similarity="cosine")
        ask(2)  # two queries: a worker thread
        ask(1, mode="approximate")  # may build the index first: a worker thread
        monkeypatch.setattr(app.engine, "INLINE_MAX_ROWS", 10)  # the gallery is too large now
        threaded = ask(1)
        assert where == [True, True, False, False, False]
        assert threaded == one  # the same answer wherever it was computed


def test_a_gallery_over_the_limit_or_on_the_approximate_path_is_not_quick(
    synthetic_bundle, tmp_path, monkeypatch
):
    store = SqliteStore(tmp_path / "store")
    engine = Engine(load_bundle(synthetic_bundle), store, ann_min_items=50)
    engine.seed_if_empty()
    engine.load()
    try:
        n_rows = engine.replicas["text"].gallery.n_rows
        assert n_rows < 50  # the synthetic default gallery: exact under "auto"
        assert engine.is_quick("image", 1, "auto")
        assert engine.is_quick("image", 1, "exact")
        assert not engine.is_quick("image", 1, "approximate")
        assert not engine.is_quick("image", 3, "exact")
        monkeypatch.setattr(app.engine, "INLINE_MAX_ROWS", n_rows - 1)
        assert not engine.is_quick("image", 1, "exact")
        monkeypatch.setattr(app.engine, "INLINE_MAX_ROWS", n_rows)
        engine.replicas["text"].ann_min_items = n_rows  # "auto" now means approximate
        assert not engine.is_quick("image", 1, "auto")
        assert engine.is_quick("image", 1, "exact")
    finally:
        store.close()
