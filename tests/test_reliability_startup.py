"""Startup safety: a damaged bundle is refused by the real `cdpae serve` with a message naming
the problem, before anything listens or writes; it never serves from a half-loaded bundle."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np
import pytest

from app.bundle import BundleError, hnsw_file_dim, load_bundle, sha256_of
from tests.support.ports import free_port
from tests.support.service import serve_argv


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _resign(bundle: Path, name: str) -> None:
    """Make the manifest agree with the file again: the damage is then past the checksum."""
    manifest = _manifest(bundle)
    manifest["files"][name] = sha256_of(bundle / name)
    _write_manifest(bundle, manifest)


def truncate(bundle: Path) -> None:
    path = bundle / "image_encoder.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncate_and_resign(bundle: Path) -> None:
    truncate(bundle)
    _resign(bundle, "image_encoder.onnx")


def remove(bundle: Path) -> None:
    (bundle / "train_embeddings.npy").unlink()


def alter_one_byte(bundle: Path) -> None:
    path = bundle / "default_gallery.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def newer_format(bundle: Path) -> None:
    manifest = _manifest(bundle)
    manifest["format_version"] = 2
    _write_manifest(bundle, manifest)


def manifest_not_json(bundle: Path) -> None:
    (bundle / "manifest.json").write_text('{"format_version": 1, ')


def index_of_another_dimension(bundle: Path) -> None:
    """A valid hnswlib index with the right item count but 24-d vectors (encoders say 12),
    checksummed into the manifest: hnswlib itself loads it without complaint."""
    manifest = _manifest(bundle)
    n, dim = 2 * manifest["n_train_pairs"], 2 * manifest["common_dim"]
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=n, M=8, ef_construction=20)
    index.add_items(np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32), np.arange(n))
    index.save_index(str(bundle / "train_index.bin"))
    _resign(bundle, "train_index.bin")


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated", truncate, "file image_encoder.onnx fails its checksum"),
    ("truncated-resigned", truncate_and_resign, "image_encoder.onnx: onnxruntime can't load it"),
    ("missing", remove, "file train_embeddings.npy is missing"),
    ("altered", alter_one_byte, "file default_gallery.npz fails its checksum"),
    ("newer-format", newer_format, "format_version 2, newer than the 1 this service reads"),
    ("manifest-not-json", manifest_not_json, "manifest.json is not valid JSON"),
    (
        "index-dimension",
        index_of_another_dimension,
        "train_index.bin holds vectors of dimension 24, the encoders and manifest say 12",
    ),
]


def _damaged(synthetic_bundle: Path, root: Path, name: str, damage: Callable) -> Path:
    bundle = root / name
    shutil.copytree(synthetic_bundle, bundle)
    damage(bundle)
    return bundle


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_every_damage_is_refused_by_the_real_command(synthetic_bundle, tmp_path):
    # All at once: each is a fresh interpreter importing onnxruntime.
    runs = []
    for name, damage, says in CASES:
        bundle = _damaged(synthetic_bundle, tmp_path, name, damage)
        port = free_port()
        data = tmp_path / f"data-{name}"
        proc = subprocess.Popen(
            serve_argv(bundle, data, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs.append((name, says, port, data, proc))
    deadline = time.monotonic() + 90
    for name, says, port, data, proc in runs:
        served = False
        while proc.poll() is None and time.monotonic() < deadline:
            served = served or _port_open(port)
            time.sleep(0.05)
        _out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert proc.returncode == 2, (name, proc.returncode, err)
        assert says in err, (name, err)
        assert "Traceback" not in err, (name, err)
        assert not served and not _port_open(port), name
        assert not data.exists(), name  # no store was opened, nothing written


@pytest.mark.parametrize(("name", "damage", "says"), CASES, ids=[c[0] for c in CASES])
def test_loader_raises_bundle_error_naming_the_problem(
    synthetic_bundle, tmp_path, name, damage, says
):
    bundle = _damaged(synthetic_bundle, tmp_path, name, damage)
    with pytest.raises(BundleError) as caught:
        load_bundle(bundle)
    assert says in str(caught.value)


def test_index_header_reader_agrees_with_hnswlib(synthetic_bundle, tmp_path):
    assert (
        hnsw_file_dim(synthetic_bundle / "train_index.bin")
        == _manifest(synthetic_bundle)["common_dim"]
    )
    for dim in (3, 7, 64):
        index = hnswlib.Index(space="cosine", dim=dim)
        index.init_index(max_elements=10, M=4)
        index.add_items(np.ones((2, dim), dtype=np.float32), [0, 1])
        index.save_index(str(tmp_path / "i.bin"))
        assert hnsw_file_dim(tmp_path / "i.bin") == dim
    (tmp_path / "short.bin").write_bytes(b"\x00" * 10)
    assert hnsw_file_dim(tmp_path / "short.bin") is None
