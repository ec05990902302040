"""The bundle format: written by training/export.py, read and verified by app/bundle.py."""

import json
import shutil

import numpy as np
import pytest

from app.bundle import (
    IMAGE_ENCODER,
    MANIFEST,
    TRAIN_INDEX,
    BundleError,
    load_bundle,
)
from tests.support.synthetic import random_encoder, write_synthetic_bundle


def test_bundle_loads_and_encoders_match_numpy(synthetic_bundle):
    bundle = load_bundle(synthetic_bundle)
    assert bundle.manifest.input_dims == {"image": 16, "text": 8}
    assert bundle.pool.size == 120 and bundle.pool.dim == 12
    rng = np.random.default_rng(1)
    reference = random_encoder(16, 12, np.random.default_rng(0))  # same draw as the bundle's
    for batch in (1, 2, 64):
        x = rng.normal(size=(batch, 16)).astype(np.float32)
        np.testing.assert_allclose(bundle.encoders["image"].embed(x), reference(x), atol=1e-5)


def test_both_neighbour_paths_find_the_same_training_items(synthetic_bundle, monkeypatch):
    import app.bundle as bundle_module

    bundle = load_bundle(synthetic_bundle)
    queries = bundle.embed("text", bundle.default_gallery().features["text"])
    assert bundle.exact_knn  # 120 pool items: an exact scan
    exact, exact_z = bundle.neighbours(queries)
    monkeypatch.setattr(bundle_module, "EXACT_KNN_MAX_POOL", 0)
    assert not bundle.exact_knn
    approx, approx_z = bundle.neighbours(queries)
    recall = np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.99
    same = (approx == exact).all(axis=1)
    np.testing.assert_allclose(approx_z[same], exact_z[same], atol=1e-6)


def _copy(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_missing_file_is_named(synthetic_bundle, tmp_path):
    bad = _copy(synthetic_bundle, tmp_path)
    (bad / TRAIN_INDEX).unlink()
    with pytest.raises(BundleError, match=f"{TRAIN_INDEX} is missing"):
        load_bundle(bad)


def test_truncated_file_fails_checksum(synthetic_bundle, tmp_path):
    bad = _copy(synthetic_bundle, tmp_path)
    data = (bad / IMAGE_ENCODER).read_bytes()
    (bad / IMAGE_ENCODER).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=f"{IMAGE_ENCODER} fails its checksum"):
        load_bundle(bad)


def test_newer_format_is_refused(synthetic_bundle, tmp_path):
    bad = _copy(synthetic_bundle, tmp_path)
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["format_version"] = 99
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer"):
        load_bundle(bad)


def test_rewrite_replaces_bundle_atomically(tmp_path):
    out = tmp_path / "b"
    write_synthetic_bundle(out, seed=1)
    first = json.loads((out / MANIFEST).read_text())["files"]
    write_synthetic_bundle(out, seed=2)
    second = json.loads((out / MANIFEST).read_text())["files"]
    assert first != second
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary leftovers
    load_bundle(out)


def test_an_items_embedding_does_not_depend_on_the_batch_it_came_in(wikipedia_bundle):
    """Bit for bit: a gallery item's unit embedding could then be re-derived from its raw
    features whenever needed (docs/service.md, float16 unit embeddings)."""
    bundle = load_bundle(wikipedia_bundle)
    rng = np.random.default_rng(1)
    for modality, dim in bundle.manifest.input_dims.items():
        features = rng.normal(size=(3000, dim)).astype(np.float32)
        whole = bundle.embed(modality, features)
        for size in (1, 2, 3, 7, 64, 100, 1000, 2048):
            rows = rng.choice(len(features), size=size, replace=False)
            np.testing.assert_array_equal(bundle.embed(modality, features[rows]), whole[rows])
