"""The front end's side of a cluster: the shard actors of both galleries, fan-out and merge.

`ShardedGalleries` is what app.engine.Engine asks instead of its in-process replicas when
`--ray` is given. The engine embeds a query once (ONNX, the kNN over the training pool, the
profile); every shard of the target gallery scores its slice with the same code
(app.replica) and returns a partial top-k; merging is a top-k of top-ks with ties by id, so
the answer is the single process's, bit for bit (the per-item sums do not depend on the
split: app.retrieval).

Completeness: a search asks every shard and waits at most `call_timeout_s`; if any shard
fails or is late the request gets 503 + Retry-After (ShardUnavailableError), never a
ranking of the shards that happened to answer. A write is acknowledged only after the store
committed it and its owning shards caught up to its sequence number.

Shards are named, detached actors: they outlive the front end that created them, so several
front ends (and a restarted one) share them, and Ray restarts them (max_restarts=-1) when
their process or node dies; each reloads its slice from PostgreSQL (app.cluster.shard).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from app.bundle import MODALITIES, Modality
from app.cluster import ShardUnavailableError
from app.cluster.shard import GalleryShard, ShardConfig
from app.gallery import Hit, QueryBatch, SearchMode, Similarity, merge_hits
from app.store import shard_of

log = logging.getLogger("cdpae.cluster")

NAMESPACE = "cdpae"
# A query batch above this goes through Ray's object store once instead of once per shard.
_PUT_ABOVE_BYTES = 256 * 1024

# Calls are never re-executed by Ray (max_task_retries=0): a search is retried by the client
# after a 503, and a catch-up is idempotent anyway; an automatic retry would only hide
# that the answer came late.
ShardActor = ray.remote(
    max_restarts=-1,
    max_task_retries=0,
    num_cpus=0,  # shards are memory, not CPU reservations; searches are short
    max_concurrency=8,  # threaded: searches run side by side (the gallery's RW lock)
)(GalleryShard)


def connect(address: str) -> None:
    """Join the Ray cluster at `address` as a driver (`local`: start a one-node Ray)."""
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)


def actor_name(bundle_key: str, modality: Modality, index: int, count: int) -> str:
    """The shard's name in the cluster: front ends (and tests) find running shards by it."""
    return f"cdpae-{bundle_key[:12]}-{modality}-shard{index}of{count}"


class ShardedGalleries:
    """Both modalities' galleries, each split across `shards` GalleryShard actors."""

    def __init__(
        self,
        address: str,
        config: ShardConfig,
        *,
        call_timeout_s: float = 5.0,
        ready_timeout_s: float = 900.0,
    ) -> None:
        """config: any shard's configuration; modality and index are set per shard."""
        self.address = address
        self.config = config
        self.n_shards = config.count
        self.call_timeout_s = call_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.shards: dict[Modality, list[Any]] = {}

    def start(self) -> None:
        """Connect, create the shards (or find them: they outlive front ends) and wait until
        every one has loaded its slice, logging progress."""
        connect(self.address)
        for modality in MODALITIES:
            self.shards[modality] = [
                ShardActor.options(
                    name=actor_name(self.config.bundle_key, modality, i, self.n_shards),
                    namespace=NAMESPACE,
                    get_if_exists=True,
                    lifetime="detached",
                    scheduling_strategy="SPREAD",
                ).remote(replace(self.config, modality=modality, index=i))
                for i in range(self.n_shards)
            ]
        pending = {
            a.ready.remote(): (m, i) for m, s in self.shards.items() for i, a in enumerate(s)
        }
        deadline = time.monotonic() + self.ready_timeout_s
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=10.0)
            for ref in done:
                modality, index = pending.pop(ref)
                count = ray.get(ref)  # a shard that failed for good (bundle) raises here
                log.info("%s shard %d/%d ready: %d items", modality, index, self.n_shards, count)
            if pending and time.monotonic() > deadline:
                raise ShardUnavailableError(f"{len(pending)} shards not ready after start-up")
            if pending:
                log.info("waiting for %d of %d shards", len(pending), 2 * self.n_shards)

    def _gather(self, refs: Sequence[Any], what: str) -> list[Any]:
        try:
            return ray.get(list(refs), timeout=self.call_timeout_s)
        except GetTimeoutError as exc:
            raise ShardUnavailableError(
                f"{what}: a shard did not answer within {self.call_timeout_s:g} s "
                "(recovering); retry"
            ) from exc
        except RayError as exc:
            raise ShardUnavailableError(
                f"{what}: a shard failed ({type(exc).__name__}); it restarts by itself, retry"
            ) from exc

    # --- search --------------------------------------------------------------------------------

    def search(
        self,
        modality: Modality,
        queries: QueryBatch,
        k: int,
        similarity: Similarity,
        flt: dict[str, object] | None,
        mode: SearchMode,
    ) -> tuple[list[list[Hit]], list[str]]:
        """The top k over every shard of `modality`'s gallery, and each answer's path (the
        worst over the shards: uncertified > exact > approximate)."""
        size = queries.units.nbytes + (0 if queries.profile is None else queries.profile.nbytes)
        arg: Any = ray.put(queries) if size > _PUT_ABOVE_BYTES else queries
        parts = self._gather(
            [s.search.remote(arg, k, similarity, flt, mode) for s in self.shards[modality]],
            "search not answered",
        )
        results = [merge_hits([hits[q] for hits, _ in parts], k) for q in range(len(queries))]
        rank = {"approximate": 0, "exact": 1, "uncertified": 2}
        paths = [max((p[q] for _, p in parts), key=rank.__getitem__) for q in range(len(queries))]
        return results, paths

    # --- writes --------------------------------------------------------------------------------

    def caught_up(self, modality: Modality, ids: Sequence[str], seq: int) -> int:
        """Wait until the shards owning `ids` have applied the store up to `seq`; the
        gallery's count afterwards (the other shards' counts come in the same round trip)."""
        owners = {shard_of(item_id, self.n_shards) for item_id in ids}
        counts = self._gather(
            [
                shard.catch_up_to.remote(seq) if i in owners else shard.count.remote()
                for i, shard in enumerate(self.shards[modality])
            ],
            "the write was committed to the database but not confirmed by every shard "
            "(retrying the same write is safe)",
        )
        return int(sum(counts))

    def count(self, modality: Modality) -> int:
        counts = self._gather(
            [s.count.remote() for s in self.shards[modality]], "count not answered"
        )
        return int(sum(counts))

    def stats(self) -> list[tuple[str, int, int, bool]]:
        """Per modality: items, bytes and whether an ANN index is being built, over shards."""
        if not self.shards:
            return []
        every = self._gather(
            [s.stats.remote() for shards in self.shards.values() for s in shards],
            "stats not answered",
        )
        totals = []
        for modality in MODALITIES:
            mine = [s for s in every if s[0] == modality]
            totals.append(
                (
                    modality,
                    sum(s[1] for s in mine),
                    sum(s[2] for s in mine),
                    any(s[3] for s in mine),
                )
            )
        return totals

    def close(self) -> None:
        """Leave the cluster; the shards stay for the other front ends."""
        if ray.is_initialized():
            ray.shutdown()
