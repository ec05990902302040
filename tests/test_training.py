"""`cdpae train` end to end on a tiny synthetic set, and the pieces it relies on."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from app.bundle import MANIFEST, load_bundle
from tests.support.synthetic import write_synthetic_npz
from training.baselines import CCA
from training.data import load_dataset
from training.evaluate import evaluate, metrics_from_scores
from training.evaluate_cli import main as evaluate_main
from training.export import onnx_max_difference
from training.model import encoder_weights
from training.preprocess import Preprocessor, with_canonical_directions
from training.selection import Candidate, run_selection
from training.train_cli import main as train_main
from training.trainer import TrainConfig, train_cdpae

SMALL = TrainConfig(common_dim=32, lr=1e-3, eval_passes=2.0, max_evals=3)


@pytest.fixture(scope="module")
def trained_bundle(synthetic_npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "bundle"
    args = ["--data", str(synthetic_npz), "--out", str(out), "--quiet", "--quick"]
    assert train_main(args) == 0
    return out


def test_train_writes_a_servable_bundle_with_report_and_plots(trained_bundle):
    bundle = load_bundle(trained_bundle)  # verifies every sha256
    manifest = json.loads((trained_bundle / MANIFEST).read_text())
    hyper = manifest["hyperparameters"]
    for key in ("knn_k", "zscore_text", "zscore_image", "lr", "w1", "w2", "config_name", "seed"):
        assert key in hyper
    assert bundle.knn_k == hyper["knn_k"] == manifest["knn_k"]
    assert set(manifest["metrics"]) >= {"validation", "test"}
    for name in (
        "report.json",
        "plots/training_curves.png",
        "plots/tsne.png",
        "plots/precision_recall.png",
        "plots/knn_k_validation.png",
    ):
        assert name in manifest["files"] and (trained_bundle / name).stat().st_size > 0
    report = json.loads((trained_bundle / "report.json").read_text())
    assert report["hnsw_recall_at_k"] >= 0.99
    assert max(report["onnx_max_abs_difference"].values()) <= 1e-5
    assert hyper["config_name"] == "quick" and report["candidates"][0]["knn_k"] == hyper["knn_k"]
    # the gallery is the test split with category names
    gallery = bundle.default_gallery()
    assert len(gallery.ids) == 40 and set(gallery.categories) <= {"cat0", "cat1", "cat2", "cat3"}
    # no staging directories are left behind
    assert [p.name for p in trained_bundle.parent.iterdir()] == ["bundle"]


def test_evaluate_json_equals_the_numbers_recorded_at_training(
    trained_bundle, synthetic_npz, capsys
):
    code = evaluate_main(["--bundle", str(trained_bundle), "--data", str(synthetic_npz), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["dataset"] == "synthetic"
    assert set(result["metrics"]) == {"cdpae_knn", "cdpae_cosine", "cca", "cca_knn"}
    for row in result["metrics"].values():
        assert set(row) == {
            "i2t_map50",
            "t2i_map50",
            "mean_map50",
            "i2t_map_all",
            "t2i_map_all",
            "mean_map_all",
        }
        assert row["mean_map50"] == pytest.approx((row["i2t_map50"] + row["t2i_map50"]) / 2)
    manifest = json.loads((trained_bundle / MANIFEST).read_text())
    assert result["metrics"] == manifest["metrics"]["test"]
    assert result["knn_k"] == manifest["knn_k"]
    # the synthetic classes are easy: the trained model must rank far above chance (~0.25)
    assert result["metrics"]["cdpae_knn"]["mean_map50"] > 0.5


@pytest.mark.parametrize("cca_inputs", [False, True])
def test_onnx_equals_torch_at_batch_1_2_64(synthetic_npz, cca_inputs):
    # With cca_inputs the canonical directions are folded into the first layer at export.
    ds = load_dataset(synthetic_npz)
    config = replace(SMALL, cca_inputs=cca_inputs, zscore_text=cca_inputs)
    trained = train_cdpae(config, ds.train, ds.validation, seed=0)
    if cca_inputs:
        assert trained.image_input(ds.test.image).shape[1] > ds.test.image.shape[1]
    for modality, preprocessor, encoder, raw in (
        ("image", trained.image_input, trained.model.image_encoder, ds.test.image),
        ("text", trained.text_input, trained.model.text_encoder, ds.test.text),
    ):
        weights = encoder_weights(encoder, preprocessor)

        def torch_forward(x, modality=modality):
            return trained.embed(**{modality: x})

        assert onnx_max_difference(weights, torch_forward, raw, (1, 2, 64)) <= 1e-5


def test_cca_inputs_append_the_canonical_coordinates(synthetic_npz):
    ds = load_dataset(synthetic_npz)
    image, text = Preprocessor.fit(ds.train.image), Preprocessor.fit(ds.train.text, False)
    image_cca, text_cca = with_canonical_directions(image, text, ds.train.image, ds.train.text)
    cca = CCA.fit(image.zscore(ds.train.image), text.zscore(ds.train.text))
    for pre, pre_cca, raw, embed in (
        (image, image_cca, ds.test.image, cca.embed_image),
        (text, text_cca, ds.test.text, cca.embed_text),
    ):
        out = pre_cca(raw)
        d = raw.shape[1]
        assert out.shape == (len(raw), d + len(cca.correlations))
        np.testing.assert_array_equal(out[:, :d], pre(raw))  # the z-scored features, unchanged
        np.testing.assert_allclose(out[:, d:], embed(pre.zscore(raw)), atol=1e-4)
    # on the training pairs the first appended image and text coordinates correlate by the
    # first canonical correlation
    first_image = image_cca(ds.train.image)[:, ds.train.image.shape[1]]
    first_text = text_cca(ds.train.text)[:, ds.train.text.shape[1]]
    assert np.corrcoef(first_image, first_text)[0, 1] == pytest.approx(
        cca.correlations[0], abs=1e-3
    )


def test_canonical_directions_stay_well_scaled_on_features_that_sum_to_one():
    # Topic proportions (and word histograms) sum to 1: after z-scoring one direction has no
    # variance, and CCA's ridge-regularised whitening scales it up ~100x. Exported weights that
    # large turned float32 rounding into 7.5e-6 of ONNX-vs-torch difference on Wikipedia.
    rng = np.random.default_rng(0)
    topics = rng.dirichlet(np.full(10, 0.5), size=400).astype(np.float32)
    image = (topics @ rng.normal(size=(10, 32)) + 0.3 * rng.normal(size=(400, 32))).astype(
        np.float32
    )
    image_input, text_input = Preprocessor.fit(image), Preprocessor.fit(topics)
    _, text_cca = with_canonical_directions(image_input, text_input, image, topics)
    cca = CCA.fit(image_input.zscore(image), text_input.zscore(topics))
    # the training coordinates are still CCA's ...
    np.testing.assert_allclose(
        text_cca(topics)[:, 10:], cca.embed_text(text_input.zscore(topics)), atol=1e-4
    )
    # ... but without the degenerate direction's blow-up
    assert text_cca.canonical is not None
    assert np.abs(text_cca.canonical.directions).max() < 2 < 20 < np.abs(cca.text.linear_map).max()


@pytest.mark.parametrize(
    ("n_train", "n_test", "d_img", "d_txt"),
    [(60, 20, 1, 1), (12, 8, 5, 3), (30, 10, 300, 400)],
    ids=["one-dimensional features", "12 pairs", "wider than the pairs"],
)
def test_train_handles_unusual_shapes(tmp_path, n_train, n_test, d_img, d_txt):
    # Any .npz of the format must train: the CCA input directions included (1-d features once
    # crashed there), with PCA for inputs over 256 dimensions and more dimensions than pairs.
    data = write_synthetic_npz(
        tmp_path / "odd.npz", n_train=n_train, n_test=n_test, d_img=d_img, d_txt=d_txt
    )
    out = tmp_path / "bundle"
    args = ["--data", str(data), "--out", str(out), "--quiet", "--no-plots", "--quick"]
    assert train_main(args) == 0
    assert load_bundle(out).manifest.input_dims == {"image": d_img, "text": d_txt}


def test_training_is_reproducible_for_a_seed(synthetic_npz):
    ds = load_dataset(synthetic_npz)
    a = train_cdpae(SMALL, ds.train, ds.validation, seed=3)
    b = train_cdpae(SMALL, ds.train, ds.validation, seed=3)
    c = train_cdpae(SMALL, ds.train, ds.validation, seed=4)
    wa, wb, wc = (r.model.image_encoder[0].weight for r in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert [p.val_mean for p in a.history] == [p.val_mean for p in b.history]


def test_selection_keeps_the_best_validation_candidate(synthetic_npz):
    ds = load_dataset(synthetic_npz)
    grid = [
        Candidate("tiny", replace(SMALL, common_dim=4, max_evals=1)),
        Candidate("small", SMALL),
    ]
    selection = run_selection(ds, grid, seed=0, k_grid=(5, 10, 500), confirm_top=1)
    assert [r.candidate.name for r in selection.results] == ["tiny", "small"]
    # the screening leader is trained again with a second seed and is the only finalist
    leader = max(selection.results, key=lambda r: max(r.runs[0].knn_table.values()))
    assert [len(r.runs) for r in selection.results].count(2) == 1
    assert len(leader.runs) == 2 and selection.winner is leader
    assert [run.result.seed for run in leader.runs] == [0, 1000]
    # its scores are means over its two runs
    k = leader.knn_k
    assert leader.val_knn == pytest.approx(np.mean([run.knn_table[k] for run in leader.runs]))
    for r in selection.results:
        # k is capped at the pool size 2N and chosen as the best on validation
        assert sorted(r.knn_table) == [5, 10, 2 * len(ds.train)]
        assert r.val_knn == max(r.knn_table.values())


def test_cli_errors_exit_2_with_a_message(tmp_path, synthetic_npz, trained_bundle, capsys):
    assert train_main(["--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "b")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert evaluate_main(["--bundle", str(tmp_path / "nope"), "--data", str(synthetic_npz)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a data set of other dimensions than the bundle's encoders
    assert evaluate_main(["--bundle", str(trained_bundle), "--data", "cub"]) == 2
    assert "takes image 24 / text 12 features" in capsys.readouterr().err


def test_cca_finds_the_shared_direction():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 2))
    x = z @ rng.normal(size=(2, 300)) + 0.1 * rng.normal(size=(2000, 300))  # > 256: PCA first
    y = z @ rng.normal(size=(2, 6)) + 0.1 * rng.normal(size=(2000, 6))
    cca = CCA.fit(x, y, n_components=3)
    assert cca.image.pca is not None and cca.image.pca.shape == (300, 128)
    assert cca.correlations[:2].min() > 0.95 and cca.correlations[2] < 0.5
    assert cca.embed_image(x).shape == (2000, 3) and cca.embed_text(y).shape == (2000, 3)


def test_metrics_from_scores_known_answer():
    # 2 queries, 3 gallery items; labels [0, 1, 0]
    labels = np.array([0, 1, 0])
    i2t = np.array([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1], [0.1, 0.2, 0.3]])
    # query 0 (label 0): relevant at ranks 1, 3 -> AP (1 + 2/3) / 2
    # query 1 (label 1): relevant at rank 2 -> AP 1/2
    # query 2 (label 0): ranking [2, 1, 0] -> relevant at ranks 1, 3 -> AP (1 + 2/3) / 2
    expected = ((1 + 2 / 3) / 2 + 0.5 + (1 + 2 / 3) / 2) / 3
    m = metrics_from_scores((i2t, i2t), labels)
    assert m["i2t_map_all"] == pytest.approx(expected, abs=1e-6)
    assert m["mean_map50"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_goes_through_the_bundle(trained_bundle, synthetic_npz):
    bundle = load_bundle(trained_bundle)
    ds = load_dataset(synthetic_npz)
    result = evaluate(bundle, ds)
    # the CDPAE embeddings evaluated are the ONNX encoders' (what the service computes)
    np.testing.assert_allclose(result.image_units, bundle.embed("image", ds.test.image))
    assert result.hnsw_recall >= 0.99
