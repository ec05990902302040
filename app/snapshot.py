"""A gallery saved to local files, so a restart reads them instead of the store.

Why: loading from the store pays per item (SQL rows, derived-data blobs, JSON, Python) and the
ANN indexes of a large gallery are rebuilt afterwards (minutes at 1M items). A snapshot is
the gallery's arrays as .npy files, its ids and metadata as JSON, its filter's value codes
as .npy files (their spellings in the JSON), its knn hnswlib index as hnswlib saves it and its
cosine clusters (app.clusters) as .npy files: read back at disk speed.

A snapshot is a cache, never the truth. It records where in the store's change log it was
taken (`seq`), which store (the store's random `store_id` and the signature of the change at
`seq`, so a store wiped and refilled, or restored from an older backup, does not match) and
which bundle (its key). Loading it is followed by catching up from `seq`, as any replica that
was behind does. Anything that does not match, or a file that is missing or of the wrong
size, makes the caller load from the store instead (`SnapshotMismatch`).

Written atomically: the files go into a fresh generation directory `NAME.<random>/`, are
fsynced (and so is the directory holding it, so the new entry is on disk), and then the
pointer `NAME.json` is replaced (os.replace, then the directory fsynced again) to name it;
older generations are removed afterwards. A crash at any point, a power loss included, leaves
the previous snapshot (or none) in force. What is not checked: bit rot inside a file of the
right size (no checksum: hashing gigabytes would cost the restart time this saves).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from app.ann import AnnIndex, AnnParams
from app.clusters import ClusterIndex
from app.gallery import ARRAYS, Gallery
from app.metadata_index import KeyColumn

# The cosine clusters' arrays (ClusterIndex.state), saved as cosine-<name>.npy.
CLUSTER_ARRAYS = ("centroids", "radius", "max_residual", "cluster_of")

# 2: cosine items as projection + residual + raw features (app.projection), not unit embeddings
# 3: neighbour ids as int32 or, once the gallery has ANN indexes, in the narrowest type the
#    pool allows (Gallery.compact_neighbour_ids); the metadata filter as value codes
#    (app.metadata_index)
FORMAT = 3


class SnapshotMismatch(Exception):
    """No usable snapshot: missing, of another store, bundle or format, or damaged."""


@dataclass(frozen=True)
class SnapshotOrigin:
    """What a snapshot must agree with to be used: the gallery's place and its store."""

    name: str  # e.g. "text", or "text-shard-1-of-4"
    bundle_key: str
    store_id: str
    k: int
    dim: int


@dataclass(frozen=True)
class SnapshotInfo:
    seq: int  # the change log position the gallery reflected (at least) when it was saved
    seq_signature: str | None  # the store's change_signature(seq)
    items: int
    has_ann: bool
    path: Path


def _fsync(path: Path) -> None:
    """fsync a file or a directory (its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: object) -> None:
    with open(path, "wb") as f:
        write(f)  # type: ignore[operator]
        f.flush()
        os.fsync(f.fileno())


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy file `f`, left at the start of its data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _read_npy_into(path: Path, out: np.ndarray) -> None:
    """Read a .npy file into the first rows of `out` (preallocated with room to grow), with
    no second copy of the data in memory."""
    with open(path, "rb") as f:
        shape, fortran, dtype = _npy_header(f)
        if fortran or dtype != out.dtype or tuple(shape[1:]) != out.shape[1:]:
            raise SnapshotMismatch(
                f"{path.name}: {shape} {dtype}, expected rows of {out.shape[1:]} {out.dtype}"
            )
        if shape[0] > out.shape[0]:
            raise SnapshotMismatch(f"{path.name}: {shape[0]} rows, room for {out.shape[0]}")
        if shape[0] == 0:  # an empty gallery (or shard slice): nothing to read
            return
        target = memoryview(out[: shape[0]]).cast("B")
        if f.readinto(target) != target.nbytes:
            raise SnapshotMismatch(f"{path.name}: shorter than its header says")


def save(
    directory: Path,
    origin: SnapshotOrigin,
    gallery: Gallery,
    seq: int,
    seq_signature: str | None,
    ann_params: AnnParams | None,
) -> SnapshotInfo:
    """Write `gallery` as the snapshot `origin.name` at change log position `seq`.

    The caller holds the gallery's read lock (nothing changes while it is written) and makes
    sure the gallery reflects every change up to `seq`. ANN indexes are written when the
    gallery has both and ann_params (what they were built with) is given.
    """
    if not directory.exists():
        directory.mkdir(parents=True, exist_ok=True)
        _fsync(directory.parent)  # the snapshot directory's own entry, on disk too
    generation = directory / f"{origin.name}.{uuid.uuid4().hex[:12]}"
    generation.mkdir()
    pointer = directory / f"{origin.name}.json"
    temporary = directory / f".{origin.name}.json.{uuid.uuid4().hex[:8]}"
    try:
        manifest = _write_generation(generation, origin, gallery, seq, seq_signature, ann_params)
        _fsync(generation)
        # The generation's own entry in `directory` must be on disk before a pointer naming
        # it can be: otherwise a power loss may keep the new pointer and lose the directory.
        _fsync(directory)
        _write_file(temporary, lambda f: f.write(json.dumps(manifest, indent=1).encode("utf-8")))
        os.replace(temporary, pointer)  # the switch: from here on this generation is in force
    except BaseException:
        # A full disk (or anything else) leaves the previous snapshot in force, and no half of
        # this one behind.
        shutil.rmtree(generation, ignore_errors=True)
        temporary.unlink(missing_ok=True)
        raise
    # The rename is an entry of `directory`, durable only once that is fsynced. Outside the
    # `try`: the pointer already names this generation, which must not be removed now.
    _fsync(directory)
    _remove_leftovers(directory, origin.name, generation.name)
    return SnapshotInfo(seq, seq_signature, len(gallery), manifest["ann"] is not None, generation)


def _remove_leftovers(directory: Path, name: str, current: str) -> None:
    """Remove what earlier writes of snapshot `name` left: older generations and temporary
    pointers (a crash between writing one and the switch leaves it behind).

    Matched by the exact shape of the names this module writes, not by prefix: other galleries
    and shards share `directory`, and "text" must not take "text-shard-1-of-4"'s files (or
    those of a name with a dot in it)."""
    generation = re.compile(rf"{re.escape(name)}\.[0-9a-f]{{12}}")
    temporary = re.compile(rf"\.{re.escape(name)}\.json\.[0-9a-f]{{8}}")
    for path in directory.iterdir():
        if path.name != current and generation.fullmatch(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif temporary.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _write_generation(
    generation: Path,
    origin: SnapshotOrigin,
    gallery: Gallery,
    seq: int,
    seq_signature: str | None,
    ann_params: AnnParams | None,
) -> dict:
    """The snapshot's files, fsynced, in `generation`; its manifest."""
    n = gallery.n_rows
    files: dict[str, int] = {}

    def put(name: str, write: object) -> None:
        _write_file(generation / name, write)
        files[name] = (generation / name).stat().st_size

    for array in ARRAYS:
        rows = getattr(gallery, array)[:n]
        put(f"{array}.npy", lambda f, rows=rows: np.save(f, rows, allow_pickle=False))
    put("free.npy", lambda f: np.save(f, np.asarray(gallery.free, dtype=np.int64)))
    filter_keys = []
    for i, (key, column) in enumerate(gallery.metadata_index.columns.items()):
        codes = column.codes[:n]
        put(f"filter-{i}.npy", lambda f, codes=codes: np.save(f, codes, allow_pickle=False))
        filter_keys.append({"key": key, "spellings": column.spellings})
    rows_json = {"ids": gallery.ids[:n], "metadata": gallery.metadata[:n], "filter": filter_keys}
    put("rows.json", lambda f: f.write(json.dumps(rows_json).encode("utf-8")))
    ann = None
    if ann_params is not None and gallery.ann is not None and gallery.cosine_clusters is not None:
        path = generation / "knn.hnsw"
        gallery.ann.save(path)
        _fsync(path)
        files[path.name] = path.stat().st_size
        for name, values in gallery.cosine_clusters.state(n).items():
            put(f"cosine-{name}.npy", lambda f, v=values: np.save(f, v, allow_pickle=False))
        ann = {
            "params": _params_json(ann_params),
            "max_residual": {"knn": gallery.ann.max_residual},
            "deleted": {"knn": sorted(gallery.ann.deleted)},
            "cosine_clusters": True,
        }
    return {
        "format": FORMAT,
        **asdict(origin),
        "seq": seq,
        "seq_signature": seq_signature,
        "n_rows": n,
        "items": len(gallery),
        "ann": ann,
        "generation": generation.name,
        "files": files,
        "written_at": time.time(),
    }


def _params_json(params: AnnParams) -> dict:
    """AnnParams as a snapshot's manifest records them (its "hnsw" nested)."""
    return {**asdict(params), "hnsw": params.hnsw.model_dump()}


def _graph(saved: dict) -> tuple | None:
    """What the knn index of recorded params was built with, which a service must match to
    use it as it is: space, M, ef_construction and the projection's dim (ef and the candidate
    lists are per query). None: unreadable. Snapshots from before app.hnsw record the params
    flat ({"M": .., "ef_construction": .., "dim": .., ...}), of an index always of space l2."""
    try:
        hnsw = saved.get("hnsw", {"space": "l2", **saved})
        return hnsw["space"], int(hnsw["M"]), int(hnsw["ef_construction"]), int(saved["dim"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def read_manifest(directory: Path, origin: SnapshotOrigin) -> dict:
    """The manifest of snapshot `origin.name`, if it belongs to `origin` (else SnapshotMismatch)."""
    pointer = directory / f"{origin.name}.json"
    try:
        manifest = json.loads(pointer.read_text())
    except FileNotFoundError:
        raise SnapshotMismatch("no snapshot yet") from None
    except (OSError, ValueError) as exc:
        raise SnapshotMismatch(f"{pointer.name} unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise SnapshotMismatch(f"format {manifest.get('format')!r}, this service reads {FORMAT}")
    for field, expected in asdict(origin).items():
        if manifest.get(field) != expected:
            raise SnapshotMismatch(f"taken with another {field} ({manifest.get(field)!r})")
    generation = directory / str(manifest["generation"])
    for name, size in manifest["files"].items():
        try:
            actual = (generation / name).stat().st_size
        except OSError:
            raise SnapshotMismatch(f"{generation.name}/{name} is missing") from None
        if actual != size:
            raise SnapshotMismatch(f"{generation.name}/{name} is {actual} bytes, not {size}")
    return manifest


def load(
    directory: Path,
    manifest: dict,
    gallery: Gallery,
    ann_params: AnnParams,
    headroom: int = 1024,
) -> bool:
    """Fill an empty `gallery` from the snapshot `manifest` describes; whether its ANN indexes
    came with it (they do when they were saved with the same HNSW parameters)."""
    generation = directory / str(manifest["generation"])
    n = int(manifest["n_rows"])
    gallery.reserve(n + headroom)
    with open(generation / "neighbours.npy", "rb") as f:
        if _npy_header(f)[2] != gallery.neighbours.dtype:  # saved with ANN indexes: compact
            gallery.compact_neighbour_ids()
    for array in ARRAYS:
        _read_npy_into(generation / f"{array}.npy", getattr(gallery, array))
    rows = json.loads((generation / "rows.json").read_text())
    ids, metadata = rows["ids"], rows["metadata"]
    if len(ids) != n or len(metadata) != n:
        raise SnapshotMismatch(f"rows.json has {len(ids)} ids for {n} rows")
    gallery.n_rows = n
    gallery.ids[:n] = ids
    gallery.metadata[:n] = metadata
    gallery.row_of = {item_id: row for row, item_id in enumerate(ids) if item_id is not None}
    gallery.free = np.load(generation / "free.npy").tolist()
    index = gallery.metadata_index
    for i, entry in enumerate(rows["filter"]):
        codes = np.load(generation / f"filter-{i}.npy")
        if len(codes) != n:
            raise SnapshotMismatch(f"filter-{i}.npy has {len(codes)} rows for {n}")
        try:
            index.columns[entry["key"]] = KeyColumn.restore(
                index.capacity, codes, entry["spellings"]
            )
        except ValueError as exc:
            raise SnapshotMismatch(f"filter-{i}.npy: {exc}") from exc
    if len(gallery.row_of) != int(manifest["items"]) or int(gallery.alive[:n].sum()) != len(
        gallery.row_of
    ):
        raise SnapshotMismatch("ids and live rows disagree")
    gallery.derive_weight_caps()  # not saved: 0.3 s at 1M items
    ann = manifest.get("ann")
    if not ann or _graph(ann["params"]) != _graph(_params_json(ann_params)):
        return False
    # The knn basis is a function of the bundle's pool and the index dim (checked above), so
    # nothing of it needs saving.
    gallery.ann = AnnIndex.restore(
        generation / "knn.hnsw",
        gallery.pool.dim,
        gallery.capacity,
        ann_params,
        gallery.pool.principal_basis(ann_params.dim),
        float(ann["max_residual"]["knn"]),
        ann["deleted"]["knn"],
    )
    if ann.get("cosine_clusters"):
        saved_state = {name: np.load(generation / f"cosine-{name}.npy") for name in CLUSTER_ARRAYS}
        if len(saved_state["cluster_of"]) != n:
            raise SnapshotMismatch(f"cosine clusters cover {len(saved_state['cluster_of'])} rows")
        gallery.install_cosine_clusters(
            ClusterIndex.restore(
                gallery.projection,
                capacity=gallery.capacity,
                probes=ann_params.cosine_probes,
                **saved_state,
            )
        )
    else:  # a snapshot from before the cosine clusters (an HNSW index then): fit them now
        gallery.build_cosine_clusters(ann_params)
    return True
