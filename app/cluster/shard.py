"""One slice of one modality's gallery, held by a Ray actor.

`GalleryShard` is a plain class (Ray makes it an actor in app.cluster.frontend; tests can
use it directly): an app.replica.GalleryReplica over the items with
`shard_of(id, count) == index`, loaded from PostgreSQL with their stored derived data, so it
ranks its slice with exactly the code the single process uses. It answers exact (or
certified approximate) partial top-ks; the front end merges them.

Ray keeps no application state: a restarted actor runs this constructor again, with empty
memory, possibly on another node. So the constructor reloads the slice: from the node's
snapshot of it when there is one (written after the slice's load and after its ANN build),
else from the database,
and keeps retrying while the database is unreachable (a constructor that raised would leave
the actor dead for good). Between writes it follows the change log (app.store.changes);
a write is acknowledged only after the owning shard has caught up to it (`catch_up_to`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from app.ann import AnnParams
from app.bundle import MANIFEST, Bundle, Modality, load_bundle, sha256_of
from app.gallery import Hit, QueryBatch, SearchMode, Similarity
from app.replica import GalleryReplica
from app.store import StoreUnavailableError

log = logging.getLogger("cdpae.shard")


@dataclass(frozen=True)
class ShardConfig:
    """Everything a shard needs to (re)build itself; the same on every restart."""

    bundle: str  # bundle directory, present on every node (a volume or the image)
    bundle_key: str  # the front end's bundle identity: a node with another bundle refuses
    store_url: str  # postgresql://...
    modality: Modality
    index: int
    count: int
    ann_params: AnnParams
    ann_min_items: int
    # Where the shard keeps its snapshot (app.snapshot) on the node it runs on: the same path
    # on every node. A restarted shard reads it if it lands on a node that has one of its
    # slice (checked against the store, then caught up); None: always load from the store.
    snapshot_dir: str | None = None


class BundleMismatchError(Exception):
    """The bundle directory on this node is not the front end's bundle."""


class GalleryShard:
    """One slice of a gallery in memory (a Ray actor's state; see the module docstring)."""

    def __init__(self, config: ShardConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        self.config = config
        started = time.perf_counter()
        bundle = load_bundle(config.bundle, for_queries=False)
        key = sha256_of(bundle.path / MANIFEST)
        if key != config.bundle_key:
            raise BundleMismatchError(
                f"bundle {config.bundle} on this node has manifest hash {key[:12]}, the front "
                f"end serves {config.bundle_key[:12]}"
            )
        self.replica = self._load_until_done(bundle)
        log.info("%s ready in %.1f s", self.replica.name, time.perf_counter() - started)
        # psycopg's LISTEN/NOTIFY wakes the shard for other front ends' writes; polling
        # catches anything missed (app/store/changes.py).
        from app.store.changes import ChangeFollower

        self.follower = ChangeFollower(config.store_url, self.replica.catch_up)
        self.follower.start()

    def _load_until_done(self, bundle: Bundle) -> GalleryReplica:
        from app.store.postgres import PostgresStore  # the `cluster` extra

        delay = 0.5
        while True:
            store = None
            try:
                store = PostgresStore(self.config.store_url)
                replica = GalleryReplica(
                    bundle,
                    store,
                    self.config.modality,
                    self.config.bundle_key,
                    ann_params=self.config.ann_params,
                    ann_min_items=self.config.ann_min_items,
                    shard=(self.config.index, self.config.count),
                    snapshot_dir=Path(self.config.snapshot_dir)
                    if self.config.snapshot_dir
                    else None,
                )
                replica.load()
                replica.catch_up()
                return replica
            except StoreUnavailableError as exc:
                if store is not None:  # reached, then lost mid-load: a fresh pool next time
                    store.close()
                log.warning("shard can't load from the database yet (%s); retrying", exc)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    # --- what the front end calls --------------------------------------------------------------

    def ready(self) -> int:
        """Answers once the constructor finished: the slice's item count."""
        return len(self.replica)

    def search(
        self,
        queries: QueryBatch,
        k: int,
        similarity: Similarity,
        flt: dict[str, object] | None,
        mode: SearchMode,
    ) -> tuple[list[list[Hit]], list[str]]:
        return self.replica.search(queries, k, similarity, flt, mode)

    def catch_up_to(self, seq: int) -> int:
        """Apply this slice's changes up to at least `seq` (a committed write's sequence
        number); the slice's count afterwards."""
        self.replica.catch_up(seq)
        return len(self.replica)

    def count(self) -> int:
        return len(self.replica)

    def stats(self) -> tuple[str, int, int, bool]:
        return self.replica.stats()

    def whereabouts(self) -> tuple[int, str]:
        """(process id, Ray node id) of this actor: fault tests kill one or its node."""
        import ray  # a shard always runs inside Ray

        return os.getpid(), ray.get_runtime_context().get_node_id()
