"""The model bundle: the contract between training and serving.

A bundle is one directory (models/README.md describes it) written by
`cdpae train`. This module reads it: it checks the manifest and the sha256 of
every file before anything is loaded, and refuses a bundle that is missing a
file, has an altered file, or comes from a newer format, naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import hnswlib
import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.hnsw import HnswParams
from app.retrieval import ItemCodes, TrainingPool, item_codes, unit_rows, z_from_cosine_distance

FORMAT_VERSION = 1

MANIFEST = "manifest.json"
IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
TRAIN_INDEX = "train_index.bin"
TRAIN_EMBEDDINGS = "train_embeddings.npy"
DEFAULT_GALLERY = "default_gallery.npz"
# Every bundle has these; report.json and plots are listed in the manifest too
# (and checksummed) but the service does not need them to start.
REQUIRED_FILES = (IMAGE_ENCODER, TEXT_ENCODER, TRAIN_INDEX, TRAIN_EMBEDDINGS, DEFAULT_GALLERY)

# Training pools of at most this many items are searched by an exact scan instead of the
# bundle's HNSW index: exact where it is cheap. The scan costs at most 0.18 ms more per query
# up to here and finds every true neighbour, where HNSW misses 0.25-1.3 % of them at 1,000-2,000
# items (python -m scripts.bench_training_knn, 2026-12-04; docs/service.md). A size rule, not a
# timing taken at startup, so every process serving a bundle finds the same neighbours.
EXACT_KNN_MAX_POOL = 2048

ENCODER_INPUT = "features"
ENCODER_OUTPUT = "embedding"

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, Modality] = ("image", "text")


class BundleError(Exception):
    """The bundle can't be served; the message says which file and why."""


# The training pool's HNSW index as export builds it unless told otherwise (manifest.json's
# "hnsw" says what a bundle was built with). Cosine: the service reads its distances as
# 1 - cos (app.retrieval.z_from_cosine_distance), so a bundle's index is never of another space.
TRAIN_INDEX_HNSW = HnswParams(space="cosine", M=32, ef_construction=400, ef=200)


class Manifest(BaseModel):
    """manifest.json. Unknown keys are kept (extra='allow') so newer writers can add facts."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    dataset: str
    input_dims: dict[Modality, int]
    common_dim: int = Field(ge=1)
    n_train_pairs: int = Field(ge=1)
    knn_k: int = Field(ge=1)
    hnsw: HnswParams  # the training pool's index (train_index.bin)
    files: dict[str, str]  # file name (relative to the bundle) -> sha256 hex
    hyperparameters: dict = Field(default_factory=dict)
    metrics: dict = Field(default_factory=dict)
    created_at: str
    package_version: str

    @field_validator("hnsw")
    @classmethod
    def _cosine_index(cls, hnsw: HnswParams) -> HnswParams:
        if hnsw.space != TRAIN_INDEX_HNSW.space:
            raise ValueError(
                f"the training index's space is {hnsw.space!r}: it must be "
                f"{TRAIN_INDEX_HNSW.space!r} (the service reads its distances as 1 - cos)"
            )
        return hnsw

    def write(self, bundle_dir: Path) -> None:
        """manifest.json into bundle_dir: the one writer of the format read_manifest reads."""
        text = json.dumps(self.model_dump(mode="python"), indent=2, default=_json_default)
        (Path(bundle_dir) / MANIFEST).write_text(text + "\n")


def _json_default(value: object) -> object:
    """numpy scalars and arrays (hyperparameters, metrics) and paths as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is not valid JSON ({exc})") from exc
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise BundleError(
            f"bundle {bundle_dir}: {MANIFEST} has format_version {version}, newer than the "
            f"{FORMAT_VERSION} this service reads; upgrade the service"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is malformed: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise BundleError(
            f"bundle {bundle_dir}: format_version {manifest.format_version} is not supported "
            f"(this service reads {FORMAT_VERSION})"
        )
    return manifest


def verify_bundle(bundle_dir: Path) -> Manifest:
    """Manifest plus checksums: every required file present and unaltered."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleError(f"bundle {bundle_dir}: {MANIFEST} does not list required file {name}")
    for name, expected in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"bundle {bundle_dir}: file {name} is missing")
        actual = sha256_of(path)
        if actual != expected:
            raise BundleError(
                f"bundle {bundle_dir}: file {name} fails its checksum "
                f"(sha256 {actual[:12]}..., manifest says {expected[:12]}...): truncated or altered"
            )
    return manifest


class Encoder:
    """One modality's ONNX encoder: raw features in, common-space embedding out."""

    def __init__(self, path: Path, modality: Modality, input_dim: int, common_dim: int) -> None:
        options = ort.SessionOptions()
        # The service runs several requests at once; one intra-op thread each keeps
        # a 2-core machine from oversubscribing.
        options.intra_op_num_threads = 1
        # No memory arena: onnxruntime's keeps, for the life of the process, what it grew to
        # for the largest run (a batch of cosine queries re-embedding tens of thousands of
        # contenders left 260 MB behind, 1.3 KB per item at 200k: scripts/bench_rss_stages.py).
        # Plain malloc gives it back, and a one-row run is no slower (14 vs 17 us measured).
        options.enable_cpu_mem_arena = False
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own opaque types
            raise BundleError(f"{path.name}: onnxruntime can't load it ({exc})") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape_in, shape_out = inputs[0].shape, outputs[0].shape
        if shape_in[-1] != input_dim or shape_out[-1] != common_dim:
            raise BundleError(
                f"{path.name}: encoder maps {shape_in[-1]} -> {shape_out[-1]} features, "
                f"manifest says {modality} {input_dim} -> {common_dim}"
            )
        self.modality = modality
        self.input_dim = input_dim
        self.input_name = inputs[0].name

    def embed(self, features: np.ndarray) -> np.ndarray:
        """(n, input_dim) raw features -> (n, common_dim) float32 embeddings."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]


@dataclass(frozen=True)
class DefaultGallery:
    """The test split shipped in the bundle, so a fresh service can answer at once."""

    ids: np.ndarray  # (M,) str, shared by the image and the text of a pair
    categories: np.ndarray  # (M,) str category names
    features: dict[Modality, np.ndarray]  # raw features per modality, (M, d)


@dataclass
class Bundle:
    """A verified, loaded bundle: encoders, training pool and its HNSW index."""

    path: Path
    manifest: Manifest
    encoders: dict[Modality, Encoder]
    pool: TrainingPool
    index: hnswlib.Index

    @property
    def knn_k(self) -> int:
        return self.manifest.knn_k

    def embed(self, modality: Modality, features: np.ndarray) -> np.ndarray:
        """Unit-normalised common-space embeddings of raw features."""
        return unit_rows(self.encoders[modality].embed(features))

    def neighbours(
        self, units: np.ndarray, k: int | None = None, num_threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest training items (ids, Z): the HNSW index, or an exact scan of small pools.

        The training index is never modified after loading, and hnswlib queries
        alone are safe to run concurrently. num_threads > 1 is for bulk work
        (rebuilding a large gallery), not for requests.
        """
        k = self.knn_k if k is None else k
        if self.exact_knn:
            return self.pool.exact_neighbours(units, k)
        labels, distances = self.index.knn_query(units, k=k, num_threads=num_threads)
        return labels.astype(np.int64), z_from_cosine_distance(distances)

    @property
    def exact_knn(self) -> bool:
        """Whether a query's training neighbours come from an exact scan (small pools)."""
        return self.pool.size <= EXACT_KNN_MAX_POOL

    def codes(self, units: np.ndarray, k: int | None = None, num_threads: int = 1) -> ItemCodes:
        return item_codes(self.pool, *self.neighbours(units, k, num_threads))

    def default_gallery(self) -> DefaultGallery:
        with np.load(self.path / DEFAULT_GALLERY, allow_pickle=False) as data:
            return DefaultGallery(
                ids=data["ids"],
                categories=data["categories"],
                features={"image": data["image"], "text": data["text"]},
            )


# hnswlib's saveIndex header: offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData (size_t each); the vector sits between
# offsetData and label_offset, so its byte size tells the dimension (float32).
_HNSW_HEADER = struct.Struct("<6Q")


def hnsw_file_dim(path: Path) -> int | None:
    """The vector dimension an hnswlib index file was built with (None: not an index file)."""
    with path.open("rb") as f:
        header = f.read(_HNSW_HEADER.size)
    if len(header) < _HNSW_HEADER.size:
        return None
    *_, label_offset, offset_data = _HNSW_HEADER.unpack(header)
    data_size = label_offset - offset_data
    return data_size // 4 if data_size > 0 and data_size % 4 == 0 else None


def load_bundle(bundle_dir: Path | str, *, for_queries: bool = True) -> Bundle:
    """Verify then load a bundle; raises BundleError naming the problem.

    for_queries: build the pool's Gram matrix now (query profiles use it; 75 MB for 4,346
    pool items). A shard of a cluster scores gallery items only and never needs it.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    manifest = verify_bundle(bundle_dir)
    dims = manifest.input_dims
    if set(dims) != set(MODALITIES):
        raise BundleError(f"bundle {bundle_dir}: input_dims must name image and text, got {dims}")
    encoders = {
        "image": Encoder(bundle_dir / IMAGE_ENCODER, "image", dims["image"], manifest.common_dim),
        "text": Encoder(bundle_dir / TEXT_ENCODER, "text", dims["text"], manifest.common_dim),
    }
    units = np.load(bundle_dir / TRAIN_EMBEDDINGS, allow_pickle=False).astype(np.float32)
    expected_shape = (2 * manifest.n_train_pairs, manifest.common_dim)
    if units.shape != expected_shape:
        raise BundleError(
            f"bundle {bundle_dir}: {TRAIN_EMBEDDINGS} has shape {units.shape}, "
            f"manifest says {expected_shape}"
        )
    stored_dim = hnsw_file_dim(bundle_dir / TRAIN_INDEX)
    if stored_dim != manifest.common_dim:
        # hnswlib would load it anyway and read vectors of the wrong length (garbage neighbours
        # or reads past each element): refuse before loading.
        raise BundleError(
            f"bundle {bundle_dir}: {TRAIN_INDEX} holds vectors of dimension {stored_dim}, "
            f"the encoders and manifest say {manifest.common_dim}"
        )
    search = manifest.hnsw.searching_at_least(manifest.knn_k)  # a query asks for knn_k
    try:
        index = search.load_index(bundle_dir / TRAIN_INDEX, manifest.common_dim, expected_shape[0])
    except RuntimeError as exc:
        raise BundleError(f"bundle {bundle_dir}: {TRAIN_INDEX} can't be loaded ({exc})") from exc
    if index.dim != manifest.common_dim or index.get_current_count() != expected_shape[0]:
        raise BundleError(
            f"bundle {bundle_dir}: {TRAIN_INDEX} holds {index.get_current_count()} items of "
            f"dimension {index.dim}, expected {expected_shape[0]} of {manifest.common_dim}"
        )
    if manifest.knn_k > expected_shape[0]:
        raise BundleError(f"bundle {bundle_dir}: knn_k {manifest.knn_k} exceeds the pool size")
    pool = TrainingPool(unit_rows(units))
    if for_queries:
        _ = pool.gram  # built now (0.4 s for 4,346 items), not by the first query
    return Bundle(path=bundle_dir, manifest=manifest, encoders=encoders, pool=pool, index=index)
