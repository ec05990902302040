"""What every gallery store offers: items by modality and id, a change sequence, derived data.

Two stores implement it: app.store.sqlite (one file, the embedded default) and
app.store.postgres (shared by replicas and by the shards of a cluster). Both keep:
- items: raw features (so a new bundle can re-embed them) and metadata;
- a change log: every put and delete stamped with a sequence number that grows in commit
  order, so any copy of a gallery (a replica's memory, a shard) catches up from where it
  was by asking for the changes after the last one it applied;
- derived data: what a bundle computes from an item (its kNN code and unit embedding),
  keyed by the bundle's identity, so a restart with the same bundle loads instead of
  re-embedding. It is written in the same transaction as the item.
A write is durable when the method returns; a failed write changes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

# (id, raw feature vector, metadata) of one item to write
ItemRow = tuple[str, np.ndarray, dict]


@dataclass(frozen=True)
class Derived:
    """One bundle's derived data for a batch of items (rows in the order of the items)."""

    neighbours: np.ndarray  # (n, k) int32: the k nearest training items
    weights: np.ndarray  # (n, k) float32: their weights
    units: np.ndarray  # (n, C) float32: the unit embeddings

    def __len__(self) -> int:
        return len(self.neighbours)

    def assign(self, rows: Sequence[int], values: Derived) -> None:
        """Fill the given rows from another batch (in order)."""
        self.neighbours[rows] = values.neighbours
        self.weights[rows] = values.weights
        self.units[rows] = values.units

    def encode(self, i: int) -> bytes:
        """Row i as bytes: k int32 ids, k float32 weights, C float32 units (little-endian)."""
        return (
            np.ascontiguousarray(self.neighbours[i], dtype="<i4").tobytes()
            + np.ascontiguousarray(self.weights[i], dtype="<f4").tobytes()
            + np.ascontiguousarray(self.units[i], dtype="<f4").tobytes()
        )

    @staticmethod
    def decode(blobs: Sequence[bytes], k: int) -> Derived:
        """The inverse of `encode` for a batch of rows of one bundle (k neighbours each)."""
        raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), -1)
        neighbours = raw[:, : 4 * k].copy().view("<i4").astype(np.int32)
        weights = raw[:, 4 * k : 8 * k].copy().view("<f4").astype(np.float32)
        units = raw[:, 8 * k :].copy().view("<f4").astype(np.float32)
        return Derived(neighbours, weights, units)


@dataclass(frozen=True)
class StoredItem:
    id: str
    vector: np.ndarray  # raw features, float32
    metadata: dict
    derived: bytes | None = None  # this bundle's derived data (Derived.encode), if stored


@dataclass(frozen=True)
class Change:
    """One entry of the change log; `item` is the item's state now (None once deleted)."""

    seq: int
    modality: str
    id: str
    kind: Literal["put", "delete"]
    item: StoredItem | None


class StoreFullError(Exception):
    """The disk under the store is full: the write was rolled back, nothing changed."""


class StoreUnavailableError(Exception):
    """The database can't be reached (down, restarting, network): nothing was written."""


def id_hash(item_id: str) -> int:
    """A stable 63-bit hash of an id (the same in every process, unlike Python's hash)."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def shard_of(item_id: str, n_shards: int) -> int:
    """Which of n_shards slices of a gallery an item belongs to."""
    return id_hash(item_id) % n_shards


Shard = tuple[int, int]  # (index, count): the items with shard_of(id, count) == index


class GalleryStore(Protocol):
    """The interface both stores implement (module docstring)."""

    def upsert(
        self,
        modality: str,
        items: Sequence[ItemRow],
        derived: Derived | None = None,
        bundle_key: str | None = None,
    ) -> int:
        """Insert or replace items in one transaction; the sequence number of the batch."""
        ...

    def delete(self, modality: str, item_id: str) -> int | None:
        """Delete one item; its sequence number, or None if it was not there."""
        ...

    def get(self, modality: str, item_id: str) -> StoredItem | None: ...

    def count(self, modality: str) -> int: ...

    def iter_items(
        self,
        modality: str,
        chunk: int = 8192,
        *,
        bundle_key: str | None = None,
        shard: Shard | None = None,
    ) -> Iterator[list[StoredItem]]:
        """Every item of a modality (of one shard), in chunks, with bundle_key's derived data."""
        ...

    def last_seq(self) -> int:
        """The sequence number of the last committed change (0: none yet)."""
        ...

    def changes_since(
        self,
        modality: str,
        seq: int,
        limit: int = 10_000,
        *,
        bundle_key: str | None = None,
        shard: Shard | None = None,
    ) -> list[Change]:
        """Changes of a modality after `seq`, oldest first, with the items' current state."""
        ...

    def put_derived(
        self, bundle_key: str, modality: str, ids: Sequence[str], derived: Derived
    ) -> None:
        """Store derived data of items already in the store (re-embedding for a new bundle)."""
        ...

    def drop_derived_except(self, bundle_key: str) -> None:
        """Forget every other bundle's derived data (once bundle_key's is complete)."""
        ...

    def change_signature(self, seq: int) -> str | None:
        """`modality:kind:id` of change `seq` (None if there is none): with the store's
        `store_id` meta value, what tells a snapshot taken at `seq` belongs to this history."""
        ...

    def get_meta(self, key: str) -> str | None: ...

    def seed(self, items_by_modality: dict[str, Sequence[ItemRow]], marker: str) -> bool:
        """Fill an empty store once, atomically; False if it was seeded before."""
        ...

    def close(self) -> None: ...
