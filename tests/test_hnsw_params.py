"""app.hnsw.HnswParams: the one description of an HNSW graph, for the bundle's training index
(written by training.export into manifest.json, read by app.bundle) and for each gallery's
approximate index (app.ann.AnnParams.hnsw)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from pydantic import ValidationError

from app.ann import KNN_INDEX_HNSW, AnnIndex, AnnParams
from app.bundle import (
    MANIFEST,
    TRAIN_INDEX_HNSW,
    BundleError,
    Manifest,
    load_bundle,
    read_manifest,
)
from app.hnsw import HnswParams
from app.settings import Settings
from tests.support.service import service
from tests.support.synthetic import write_synthetic_bundle
from training.export import build_train_index

# manifest.json's "hnsw" as every bundle written so far has it
WRITTEN = {"space": "cosine", "M": 32, "ef_construction": 400, "ef": 200}


def test_the_bundle_and_the_gallery_describe_their_graphs_with_one_type():
    assert type(TRAIN_INDEX_HNSW) is HnswParams
    assert Manifest.model_fields["hnsw"].annotation is HnswParams
    assert type(AnnParams().hnsw) is HnswParams


def test_the_defaults():
    assert TRAIN_INDEX_HNSW.model_dump() == WRITTEN
    assert AnnParams().hnsw.model_dump() == {
        "space": "l2",
        "M": 16,
        "ef_construction": 200,
        "ef": 64,
    }


def test_new_index_has_the_asked_graph_and_beam():
    params = HnswParams(space="l2", M=7, ef_construction=33, ef=21)
    index = params.new_index(5, 40)
    assert (index.M, index.ef_construction, index.ef) == (7, 33, 21)
    assert (index.space, index.dim, index.get_max_elements()) == ("l2", 5, 40)


def test_load_index_reads_back_what_new_index_built(tmp_path):
    rng = np.random.default_rng(0)
    built = HnswParams(space="cosine", M=6, ef_construction=30, ef=12).new_index(4, 50, seed=3)
    built.add_items(rng.normal(size=(50, 4)).astype(np.float32), np.arange(50))
    built.save_index(str(tmp_path / "i.bin"))
    # the graph is the file's; the beam is the loader's
    loaded = HnswParams(space="cosine", M=99, ef_construction=99, ef=17).load_index(
        tmp_path / "i.bin", 4, 60
    )
    assert (loaded.M, loaded.ef_construction, loaded.ef) == (6, 30, 17)
    assert (loaded.get_current_count(), loaded.get_max_elements()) == (50, 60)
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    assert (built.knn_query(queries, k=5)[0] == loaded.knn_query(queries, k=5)[0]).all()


@pytest.mark.parametrize(
    "fields",
    [
        {"space": "ip", "M": 16, "ef_construction": 200, "ef": 64},
        {"space": "l2", "M": 1, "ef_construction": 200, "ef": 64},
        {"space": "l2", "M": 16, "ef_construction": 0, "ef": 64},
        {"space": "l2", "M": 16, "ef_construction": 200, "ef": 0},
        {"space": "l2", "M": 16, "ef_construction": 200},  # no defaults: every field said
    ],
)
def test_invalid_params_are_refused(fields):
    with pytest.raises(ValidationError):
        HnswParams(**fields)


def test_params_are_frozen():
    with pytest.raises(ValidationError):
        TRAIN_INDEX_HNSW.M = 8  # type: ignore[misc]


def test_the_gallery_index_is_built_and_loaded_through_its_params(tmp_path):
    params = AnnParams(hnsw=HnswParams(space="l2", M=5, ef_construction=25, ef=9), dim=0)
    index = AnnIndex(3, 20, params)
    assert (index.index.M, index.index.ef_construction, index.index.ef) == (5, 25, 9)
    assert index.index.space == "l2" and index.index.dim == 4  # lifted: one more
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(20, 3))
    index.put(np.arange(20), dense / (2 * np.linalg.norm(dense, axis=1, keepdims=True)))
    index.save(tmp_path / "knn.hnsw")
    restored = AnnIndex.restore(tmp_path / "knn.hnsw", 3, 30, params, None, 0.0, [])
    assert (restored.index.M, restored.index.ef_construction) == (5, 25)
    assert restored.index.get_current_count() == 20
    assert index.size_bytes() == (4 * 4 + (2 * 5 + 1) * 4 + 8) * 20


def test_the_gallery_index_is_of_space_l2():
    with pytest.raises(ValueError, match="'l2'"):
        AnnParams(hnsw=TRAIN_INDEX_HNSW)


def test_export_builds_the_training_index_from_its_params():
    units = np.random.default_rng(2).normal(size=(30, 6)).astype(np.float32)
    params = HnswParams(space="cosine", M=9, ef_construction=45, ef=11)
    index = build_train_index(units, params)
    assert (index.space, index.M, index.ef_construction, index.ef) == ("cosine", 9, 45, 11)
    assert index.get_current_count() == 30


def test_a_written_manifest_reads_back_as_the_same_params(tmp_path):
    bundle = write_synthetic_bundle(tmp_path / "b", knn_k=5)
    raw = json.loads((bundle / MANIFEST).read_text())
    assert raw["hnsw"] == WRITTEN  # the bytes every existing bundle has
    assert read_manifest(bundle).hnsw == TRAIN_INDEX_HNSW
    loaded = load_bundle(bundle, for_queries=False)
    assert (loaded.index.M, loaded.index.ef_construction, loaded.index.ef) == (32, 400, 200)


def test_export_writes_and_the_service_reads_other_params(tmp_path):
    params = HnswParams(space="cosine", M=6, ef_construction=20, ef=3)
    bundle = write_synthetic_bundle(tmp_path / "b", knn_k=5, hnsw=params)
    manifest = read_manifest(bundle)
    assert manifest.hnsw == params
    assert json.loads((bundle / MANIFEST).read_text())["hnsw"] == params.model_dump()
    loaded = load_bundle(bundle, for_queries=False)
    # the graph as exported; the beam at least knn_k (a query asks for knn_k neighbours)
    assert (loaded.index.M, loaded.index.ef_construction, loaded.index.ef) == (6, 20, 5)


def test_a_manifest_whose_training_index_is_not_cosine_is_refused(synthetic_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(synthetic_bundle, bundle)
    raw = json.loads((bundle / MANIFEST).read_text())
    raw["hnsw"]["space"] = "l2"
    (bundle / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="is malformed") as refused:
        read_manifest(bundle)
    assert "the training index's space is 'l2': it must be 'cosine'" in str(refused.value)
    with pytest.raises(BundleError, match="must be 'cosine'"):
        load_bundle(bundle)
    raw["hnsw"]["space"] = "ip"  # not a space at all
    (bundle / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="malformed"):
        read_manifest(bundle)


def test_settings_override_the_gallery_defaults_and_nothing_else(monkeypatch):
    assert Settings().ann_params() == AnnParams()
    monkeypatch.setenv("CDPAE_ANN_M", "12")
    monkeypatch.setenv("CDPAE_ANN_EF_CONSTRUCTION", "77")
    params = Settings().ann_params()
    assert params.hnsw == HnswParams(space="l2", M=12, ef_construction=77, ef=64)
    assert (params.candidates, params.max_candidates, params.dim) == (
        AnnParams().candidates,
        AnnParams().max_candidates,
        AnnParams().dim,
    )


def test_cdpae_ann_m_reaches_the_service_engine(synthetic_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CDPAE_ANN_M", "12")
    with service(synthetic_bundle, tmp_path / "data") as client:
        for replica in client.app.state.engine.replicas.values():
            assert replica.ann_params.hnsw == KNN_INDEX_HNSW.model_copy(update={"M": 12})


def test_export_refuses_a_training_index_that_is_not_cosine(tmp_path):
    with pytest.raises(ValidationError, match="must be 'cosine'"):
        write_synthetic_bundle(tmp_path / "b", hnsw=AnnParams().hnsw)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing left behind
