"""Write a bundle (models/README.md) from trained numpy weights. No torch here.

The encoders are written as ONNX graphs built node by node from the weights:
z-scoring (x - mean) / scale first, then Gemm + Tanh per layer. Building the
graph directly keeps export exact and independent of torch's exporter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import hnswlib
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.bundle import (
    DEFAULT_GALLERY,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    FORMAT_VERSION,
    IMAGE_ENCODER,
    MANIFEST,
    TEXT_ENCODER,
    TRAIN_EMBEDDINGS,
    TRAIN_INDEX,
    TRAIN_INDEX_HNSW,
    Manifest,
    read_manifest,
    sha256_of,
)
from app.hnsw import HnswParams
from app.retrieval import unit_rows

ONNX_OPSET = 17


@dataclass(frozen=True)
class EncoderWeights:
    """An encoder as numpy arrays: z-scoring statistics, then tanh(W x + b) layers."""

    mean: np.ndarray  # (d,) subtracted from raw features
    scale: np.ndarray  # (d,) divides them afterwards (ones where not z-scored)
    layers: Sequence[tuple[np.ndarray, np.ndarray]]  # [(W (out, in), b (out,)), ...]

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.layers[-1][0].shape[0])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """The same computation as the ONNX graph, in numpy (float64)."""
        h = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        for weight, bias in self.layers:
            h = np.tanh(h @ np.asarray(weight, dtype=np.float64).T + bias)
        return h


def encoder_to_onnx(encoder: EncoderWeights, name: str) -> onnx.ModelProto:
    """An ONNX model taking RAW features [batch, d] and returning embeddings [batch, C]."""
    f32 = np.float32
    initializers = [
        numpy_helper.from_array(np.asarray(encoder.mean, dtype=f32), "mean"),
        numpy_helper.from_array(np.asarray(encoder.scale, dtype=f32), "scale"),
    ]
    nodes = [
        helper.make_node("Sub", [ENCODER_INPUT, "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["h0"]),
    ]
    for i, (weight, bias) in enumerate(encoder.layers):
        initializers += [
            numpy_helper.from_array(np.asarray(weight, dtype=f32), f"W{i}"),
            numpy_helper.from_array(np.asarray(bias, dtype=f32), f"b{i}"),
        ]
        out = ENCODER_OUTPUT if i == len(encoder.layers) - 1 else f"h{i + 1}"
        nodes += [
            helper.make_node("Gemm", [f"h{i}", f"W{i}", f"b{i}"], [f"pre{i}"], transB=1),
            helper.make_node("Tanh", [f"pre{i}"], [out]),
        ]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info(
                ENCODER_INPUT, TensorProto.FLOAT, ["batch", encoder.input_dim]
            )
        ],
        [
            helper.make_tensor_value_info(
                ENCODER_OUTPUT, TensorProto.FLOAT, ["batch", encoder.output_dim]
            )
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 8  # readable by onnxruntime releases of the last few years
    onnx.checker.check_model(model)
    return model


def build_train_index(units: np.ndarray, settings: HnswParams, seed: int = 0) -> hnswlib.Index:
    """HNSW cosine index over the 2N training embeddings; label a = pool row a."""
    index = settings.new_index(units.shape[1], units.shape[0], seed=seed)
    index.add_items(units, np.arange(units.shape[0]))
    return index


def package_version() -> str:
    try:
        return version("cdpae")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class GalleryArrays:
    """The default gallery: the test split with ids and category names."""

    ids: np.ndarray
    categories: np.ndarray
    image: np.ndarray
    text: np.ndarray


def write_bundle(
    out_dir: Path,
    *,
    dataset: str,
    image_encoder: EncoderWeights,
    text_encoder: EncoderWeights,
    train_embeddings: np.ndarray,
    gallery: GalleryArrays,
    knn_k: int,
    hnsw: HnswParams | None = None,
    hyperparameters: dict | None = None,
    metrics: dict | None = None,
    extra_files: Callable[[Path], None] | None = None,
    seed: int = 0,
) -> Path:
    """Write a complete bundle atomically and return its path.

    Everything goes into a temporary sibling directory, is fsynced, and then
    renamed over `out_dir`, so a reader sees the old bundle or the new one,
    never half of one. `extra_files(tmp_dir)` may add report.json, plots, ...;
    they are checksummed in the manifest like the rest.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    hnsw = hnsw or TRAIN_INDEX_HNSW
    n_rows = train_embeddings.shape[0]
    if n_rows % 2:
        raise ValueError("train_embeddings must hold 2N rows: N images then N texts")
    units = unit_rows(train_embeddings)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the service may run as another user
    try:
        onnx.save(encoder_to_onnx(image_encoder, "image_encoder"), tmp / IMAGE_ENCODER)
        onnx.save(encoder_to_onnx(text_encoder, "text_encoder"), tmp / TEXT_ENCODER)
        np.save(tmp / TRAIN_EMBEDDINGS, units)
        build_train_index(units, hnsw, seed).save_index(str(tmp / TRAIN_INDEX))
        np.savez(
            tmp / DEFAULT_GALLERY,
            ids=np.asarray(gallery.ids, dtype=str),
            categories=np.asarray(gallery.categories, dtype=str),
            image=np.asarray(gallery.image, dtype=np.float32),
            text=np.asarray(gallery.text, dtype=np.float32),
        )
        if extra_files is not None:
            extra_files(tmp)
        files = {
            str(p.relative_to(tmp)): sha256_of(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        Manifest(
            format_version=FORMAT_VERSION,
            dataset=dataset,
            input_dims={"image": image_encoder.input_dim, "text": text_encoder.input_dim},
            common_dim=image_encoder.output_dim,
            n_train_pairs=n_rows // 2,
            knn_k=int(knn_k),
            hnsw=hnsw,
            files=files,
            hyperparameters=hyperparameters or {},
            metrics=metrics or {},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            package_version=package_version(),
        ).write(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing target is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(new, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finalise_bundle(
    staged: Path,
    out_dir: Path,
    *,
    metrics: dict | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Add metrics and files to a bundle written by `write_bundle`, then move it to `out_dir`.

    Training evaluates the staged bundle through the service's loader first and
    only then knows its test metrics and report; this adds them without
    touching the encoders, embeddings, index or gallery that were evaluated,
    re-checksums, and renames atomically over `out_dir`.
    """
    staged, out_dir = Path(staged), Path(out_dir)
    manifest = read_manifest(staged)
    served = dict(manifest.files)
    if extra_files is not None:
        extra_files(staged)
    files = {
        str(p.relative_to(staged)): sha256_of(p)
        for p in sorted(staged.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    changed = [name for name, digest in served.items() if files.get(name) != digest]
    if changed:
        raise RuntimeError(f"finalising must not alter evaluated files, but {changed} changed")
    manifest.model_copy(
        update={"files": files, "metrics": {**manifest.metrics, **(metrics or {})}}
    ).write(staged)
    _fsync_tree(staged)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _replace_dir(staged, out_dir)
    return out_dir


def onnx_max_difference(
    encoder: EncoderWeights,
    reference: Callable[[np.ndarray], np.ndarray],
    features: np.ndarray,
    batch_sizes: Sequence[int] = (1, 2, 64),
) -> float:
    """Largest |ONNX - reference| over batches of raw `features` of each size.

    `reference` is the trained model (torch) on the same raw features; the
    ONNX graph runs in onnxruntime, as the service runs it.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(
        encoder_to_onnx(encoder, "check").SerializeToString(), providers=["CPUExecutionProvider"]
    )
    worst = 0.0
    for size in batch_sizes:
        rows = np.resize(np.arange(len(features)), size)  # repeat rows if there are too few
        x = np.ascontiguousarray(features[rows], dtype=np.float32)
        got = session.run(None, {ENCODER_INPUT: x})[0]
        worst = max(worst, float(np.abs(got - reference(x)).max()))
    return worst
