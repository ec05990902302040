"""The search engine: the bundle, the durable store and the galleries.

What is left here is the order of things: loading the galleries from the store, the
store-then-memory write order, and search dispatch (embed the queries once, then ask the
galleries). The galleries are either in this process (one app.replica.GalleryReplica per
modality) or sharded on a Ray cluster (app.cluster.frontend.ShardedGalleries); both rank with
the same code. No HTTP: bad input raises app.validation.InvalidInput, which app/errors.py
maps to 422.

A write commits to the store first and only then updates memory (here: under the
modality's writer lock; on a cluster: the owning shards catch up to the write's sequence
number before the write is acknowledged), so an acknowledged write is visible to every
search that starts after it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.ann import AnnParams
from app.bundle import MANIFEST, MODALITIES, Bundle, Modality, sha256_of
from app.gallery import Hit, QueryBatch, SearchMode, Similarity
from app.metadata_index import canonical_json
from app.replica import GalleryReplica, derive
from app.retrieval import query_profile
from app.store import GalleryStore, StoredItem
from app.validation import feature_matrix, finite_embeddings

if TYPE_CHECKING:
    from app.cluster.frontend import ShardedGalleries
    from app.store.changes import ChangeFollower

log = logging.getLogger("cdpae.engine")

GalleryStats = tuple[str, int, int, bool]  # modality, items, bytes, ANN being built

# A search of one query over at most this many gallery rows (dead or alive) runs on the event
# loop: handing it to a worker thread and back cost ~0.5 ms on this machine's 2 busy cores
# (knn over the 693-item default gallery 3.68 ms p50 over HTTP inline, 4.19 in a worker
# thread; at 4,093 rows 3.57 and 4.01: scripts/bench_latency.py, docs/service.md). There a
# request takes 2.2 ms more than /healthz, which bounds how long it holds the loop; larger
# searches go to a worker thread.
INLINE_MAX_ROWS = 4096


def other_modality(modality: Modality) -> Modality:
    return "text" if modality == "image" else "image"


class Engine:
    """The bundle, the durable store and the two galleries (here, or sharded on Ray)."""

    def __init__(
        self,
        bundle: Bundle,
        store: GalleryStore,
        *,
        ann_params: AnnParams | None = None,
        ann_min_items: int = 50_000,
        cluster: ShardedGalleries | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.bundle = bundle
        self.store = store
        # The bundle's identity: derived data in the store is keyed by it.
        self.bundle_key = sha256_of(bundle.path / MANIFEST)
        self.cluster = cluster
        # In this process unless sharded on a cluster.
        self.replicas: dict[Modality, GalleryReplica] = (
            {}
            if cluster is not None
            else {
                m: GalleryReplica(
                    bundle,
                    store,
                    m,
                    self.bundle_key,
                    ann_params=ann_params,
                    ann_min_items=ann_min_items,
                    snapshot_dir=snapshot_dir,
                )
                for m in MODALITIES
            }
        )
        self.follower: ChangeFollower | None = None  # following a shared store
        self.loaded = False  # load() has finished: the galleries are worth a snapshot
        self._paths_lock = threading.Lock()  # searches in several threads count paths
        # (similarity, path) -> queries: a knn answer ending uncertified means something else
        # than a cosine one, so they are counted apart
        self._search_paths: Counter[tuple[str, str]] = Counter()

    @property
    def name(self) -> str:
        return self.bundle.path.name

    def input_dim(self, modality: Modality) -> int:
        return self.bundle.manifest.input_dims[modality]

    @property
    def search_paths(self) -> dict[tuple[str, str], int]:
        """Queries answered so far by (similarity, path): exact / approximate / uncertified
        (a copy)."""
        with self._paths_lock:
            return dict(self._search_paths)

    def _count_paths(self, similarity: Similarity, paths: Sequence[str]) -> None:
        with self._paths_lock:
            self._search_paths.update((similarity, path) for path in paths)

    # --- loading ------------------------------------------------------------------------------

    def seed_if_empty(self) -> bool:
        """First start: fill the store from the bundle's default gallery (once, ever)."""
        if self.store.get_meta("seeded") is not None:
            return False
        default = self.bundle.default_gallery()
        items = {
            m: [
                (str(i), default.features[m][n], {"category": str(c)})
                for n, (i, c) in enumerate(zip(default.ids, default.categories, strict=True))
            ]
            for m in MODALITIES
        }
        seeded = self.store.seed(items, marker=f"{self.bundle.manifest.dataset}")
        if seeded:
            log.info("seeded the gallery with %d default items per modality", len(default.ids))
        return seeded

    def load(self) -> None:
        """Make the galleries reflect the store (startup), then follow it.

        Here: each replica loads its modality. On a cluster: the shards load their slices
        (or are already loaded: they outlive front ends) and this waits until all are ready.
        """
        if self.cluster is not None:
            self.cluster.start()
            return
        embedded = sum(replica.load() for replica in self.replicas.values())
        if embedded:
            # Every item now has this bundle's derived data: other bundles' can go.
            self.store.drop_derived_except(self.bundle_key)
        if getattr(self.store, "shared", False):
            self._follow()
        self.loaded = True

    # --- following a shared store -------------------------------------------------------------

    def _follow(self) -> None:
        url = getattr(self.store, "url", None)
        if url is None or self.follower is not None:
            return
        # psycopg comes with the `cluster` extra: the SQLite-only service image has none.
        from app.store.changes import ChangeFollower

        self.follower = ChangeFollower(url, self.catch_up)
        self.follower.start()

    @property
    def stale(self) -> str | None:
        """Why the galleries may lag the store (it can't be reached), or None."""
        return None if self.follower is None else self.follower.error

    def catch_up(self) -> int:
        """Apply the store's changes after the last one applied; how many were applied."""
        return sum(replica.catch_up() for replica in self.replicas.values())

    def close(self) -> None:
        """Stop following the store and, in this process, write the galleries' snapshots (so
        the next start reads them instead of the store; a failure only costs that)."""
        if self.follower is not None:
            self.follower.stop()
        if self.cluster is not None:
            self.cluster.close()
        if not self.loaded:
            return
        for replica in self.replicas.values():
            try:
                replica.save_snapshot()
            except Exception:
                log.warning("%s: no snapshot written at shutdown", replica.name, exc_info=True)

    # --- validation ---------------------------------------------------------------------------

    def check_vectors(
        self, modality: Modality, rows: Sequence[Sequence[float]], field: str
    ) -> np.ndarray:
        """Raw feature rows -> (n, d) float32, or InvalidInput naming the bad row."""
        what = f"{modality} features of bundle '{self.name}'"
        return feature_matrix(rows, self.input_dim(modality), what, field)

    # --- search -------------------------------------------------------------------------------

    def embed_queries(
        self, query_modality: Modality, features: np.ndarray, similarity: Similarity
    ) -> QueryBatch:
        """Embed once; for knn also the codes and the profile over the training pool."""
        units = finite_embeddings(
            self.bundle.embed(query_modality, features), query_modality, "vectors[{i}]"
        )
        if similarity != "knn":
            return QueryBatch(units)
        codes = self.bundle.codes(units)
        return QueryBatch(units, codes, query_profile(self.bundle.pool, codes))

    def is_quick(self, query_modality: Modality, n_queries: int, mode: SearchMode) -> bool:
        """Whether this search may run on the caller's thread (the event loop): one query, an
        exact scan of a small gallery in this process. Not the approximate path (asking for it
        may build the index first), not a cluster (its calls wait on the network)."""
        if self.cluster is not None or n_queries != 1:
            return False
        replica = self.replicas[other_modality(query_modality)]
        return replica.searches_exactly(mode) and replica.gallery.n_rows <= INLINE_MAX_ROWS

    def search(
        self,
        query_modality: Modality,
        features: np.ndarray,
        k: int,
        similarity: Similarity = "knn",
        flt: dict[str, object] | None = None,
        mode: SearchMode = "auto",
    ) -> list[list[Hit]]:
        """Top k of the other modality's gallery for each query row, best first."""
        target = other_modality(query_modality)
        queries = self.embed_queries(query_modality, features, similarity)
        if self.cluster is not None:
            results, paths = self.cluster.search(target, queries, k, similarity, flt, mode)
        else:
            results, paths = self.replicas[target].search(queries, k, similarity, flt, mode)
        self._count_paths(similarity, paths)
        return results

    # --- writes -------------------------------------------------------------------------------

    def upsert(
        self, modality: Modality, ids: Sequence[str], features: np.ndarray, metadata: Sequence[dict]
    ) -> int:
        """Embed (outside any lock), commit to the store with the derived data, then update
        memory (read-your-writes). Returns the gallery's count."""
        derived = derive(self.bundle, modality, features)
        rows = list(zip(ids, features, metadata, strict=True))
        if self.cluster is not None:
            seq = self.store.upsert(modality, rows, derived, self.bundle_key)
            return self.cluster.caught_up(modality, ids, seq)
        replica = self.replicas[modality]
        metadata_json = [canonical_json(m) for m in metadata]
        with replica.writer:
            self.store.upsert(modality, rows, derived, self.bundle_key)
            replica.put(ids, features, derived, metadata_json)
            return len(replica)

    def delete(self, modality: Modality, item_id: str) -> int | None:
        """Delete one item; the new count, or None if it was not there."""
        if self.cluster is not None:
            seq = self.store.delete(modality, item_id)
            if seq is None:
                return None
            return self.cluster.caught_up(modality, [item_id], seq)
        replica = self.replicas[modality]
        with replica.writer:
            if not self.store.delete(modality, item_id):
                return None
            replica.remove(item_id)
            return len(replica)

    def get(self, modality: Modality, item_id: str) -> StoredItem | None:
        return self.store.get(modality, item_id)

    def count(self, modality: Modality) -> int:
        if self.cluster is not None:
            return self.cluster.count(modality)
        return len(self.replicas[modality])

    def gallery_stats(self) -> list[GalleryStats]:
        """(modality, items, bytes, ANN being built) of each gallery (each shard on a cluster)."""
        if self.cluster is not None:
            return self.cluster.stats()
        return [replica.stats() for replica in self.replicas.values()]

    def example_item(self, modality: Modality) -> StoredItem | None:
        """Some item of the gallery (for the ready-to-paste example), or None if empty."""
        for chunk in self.store.iter_items(modality, chunk=1):
            return chunk[0]
        return None
