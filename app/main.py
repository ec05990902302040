"""The FastAPI application: `create_app(settings)`.

The lifespan loads and verifies the bundle (a broken bundle fails startup with
the BundleError naming the file), opens the gallery store, then rebuilds the
in-memory galleries: in a background thread by default, so /healthz answers at
once and /readyz turns 200 when the gallery is built.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from app.ann import AnnParams
from app.bundle import MANIFEST, MODALITIES, Bundle, load_bundle, sha256_of
from app.cluster import ShardUnavailableError
from app.engine import Engine
from app.errors import install_error_handlers
from app.memory import IdleTrimmer
from app.metrics import ServiceMetrics, ServiceMiddleware
from app.openapi import app_options, install_docs, install_openapi
from app.routes import gallery, health, search
from app.settings import Settings
from app.store import open_store

if TYPE_CHECKING:
    from app.cluster.frontend import ShardedGalleries

log = logging.getLogger("cdpae.service")


def create_app(
    settings: Settings | None = None,
    *,
    bundle: Bundle | None = None,
    background_load: bool = True,
    on_ready: Callable[[Engine], None] | None = None,
) -> FastAPI:
    """The service. `bundle` may be passed already loaded (cdpae serve verifies it first)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        loaded = bundle if bundle is not None else load_bundle(settings.bundle)
        store = open_store(settings.store, settings.data_dir)
        ann_params = settings.ann_params()
        engine = Engine(
            loaded,
            store,
            ann_params=ann_params,
            ann_min_items=settings.ann_min_items,
            cluster=_cluster(settings, loaded, ann_params) if settings.ray else None,
            snapshot_dir=settings.snapshot_path,
        )
        state.engine = engine

        def build() -> None:
            try:
                if settings.seed_default_gallery:
                    engine.seed_if_empty()
                engine.load()
            except Exception as exc:  # reported by /readyz; the process stays up to say so
                log.exception("loading the gallery failed")
                state.load_error = f"{type(exc).__name__}: {exc}"
                return
            state.ready.set()
            log.info(
                "ready: bundle %s, gallery %s",
                loaded.path,
                ", ".join(f"{m} {engine.count(m)}" for m in MODALITIES),
            )
            if on_ready is not None:
                on_ready(engine)

        loader = threading.Thread(target=build, name="gallery-loader", daemon=True)
        if background_load:
            loader.start()
        else:
            build()
        trimmer = IdleTrimmer(lambda: (state.inflight, state.admitted), settings.idle_trim_s)
        if settings.idle_trim_s > 0:
            trimmer.start()
        state.trimmer = trimmer
        try:
            yield
        finally:
            trimmer.stop()
            if background_load:
                loader.join(timeout=5)
            engine.close()
            store.close()

    app = FastAPI(lifespan=lifespan, **app_options())
    app.state.settings = settings
    app.state.engine = None
    app.state.ready = threading.Event()
    app.state.load_error = None
    app.state.inflight = 0
    app.state.admitted = 0
    app.state.metrics = ServiceMetrics(
        gallery_stats=lambda: _gallery_stats(app),
        search_paths=lambda: app.state.engine.search_paths if app.state.engine else {},
        neighbour_search=lambda: _neighbour_search(app),
    )
    install_error_handlers(app)
    app.include_router(search.router)
    app.include_router(gallery.router)
    app.include_router(health.router)
    install_openapi(app, settings)
    install_docs(app)
    app.add_middleware(
        ServiceMiddleware,
        metrics=app.state.metrics,
        max_body_bytes=settings.max_body_bytes,
        max_inflight_body_bytes=settings.max_inflight_body_bytes,
    )
    return app


def _gallery_stats(app: FastAPI) -> list[tuple[str, int, int, bool]]:
    engine: Engine | None = app.state.engine
    if engine is None:
        return []
    try:
        return engine.gallery_stats()
    except ShardUnavailableError:  # /metrics still answers, without the gallery gauges
        return []


def _neighbour_search(app: FastAPI) -> str | None:
    engine: Engine | None = app.state.engine
    if engine is None:
        return None
    return "exact" if engine.bundle.exact_knn else "hnsw"


def _cluster(settings: Settings, bundle: Bundle, ann_params: AnnParams) -> ShardedGalleries:
    """The galleries sharded on the Ray cluster of settings.ray (ray imported only here)."""
    from app.cluster.frontend import ShardedGalleries
    from app.cluster.shard import ShardConfig

    config = ShardConfig(
        bundle=str(bundle.path.resolve()),
        bundle_key=sha256_of(bundle.path / MANIFEST),
        store_url=settings.store or "",
        modality="image",  # set per shard
        index=0,
        count=settings.shards,
        ann_params=ann_params,
        ann_min_items=settings.ann_min_items,
        snapshot_dir=str(settings.snapshot_path.resolve()) if settings.snapshot_path else None,
    )
    return ShardedGalleries(
        settings.ray or "local", config, call_timeout_s=settings.shard_timeout_s
    )
