"""The .npz loader: any shape of valid file loads; every malformed file is refused, saying why."""

import pickle

import numpy as np
import pytest

from training.data import DatasetError, load_dataset
from training.train_cli import main as train_main


def _arrays(n_train=40, n_test=12, d_img=7, d_txt=3, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "img_train": rng.random((n_train, d_img), dtype=np.float32),
        "txt_train": rng.random((n_train, d_txt), dtype=np.float32),
        "label_train": np.arange(n_train) % n_classes,
        "img_test": rng.random((n_test, d_img), dtype=np.float32),
        "txt_test": rng.random((n_test, d_txt), dtype=np.float32),
        "label_test": np.arange(n_test) % n_classes,
    }


def _write(tmp_path, arrays, name="d.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_builtin_sets_load_with_their_canonical_shapes():
    wiki = load_dataset("wikipedia")
    assert (wiki.image_dim, wiki.text_dim) == (128, 10)
    assert len(wiki.train) + len(wiki.validation) == 2173 and len(wiki.test) == 693
    assert list(wiki.class_names[:2]) == ["art", "biology"]
    cub = load_dataset("cub")
    assert (cub.image_dim, cub.text_dim) == (1024, 300)
    assert len(cub.train) + len(cub.validation) == 480 and len(cub.test) == 120


def test_any_dimensions_and_default_names(tmp_path):
    ds = load_dataset(_write(tmp_path, _arrays(d_img=5, d_txt=2, n_classes=4)))
    assert (ds.image_dim, ds.text_dim) == (5, 2)
    assert list(ds.class_names) == ["class_0", "class_1", "class_2", "class_3"]
    assert ds.name == "d" and ds.train.ids[0].startswith("train-")


def test_validation_is_carved_from_train_with_a_fixed_seed(tmp_path):
    path = _write(tmp_path, _arrays(n_train=100, n_classes=4))
    a, b = load_dataset(path), load_dataset(path)
    assert np.array_equal(a.validation.ids, b.validation.ids)
    assert not set(a.train.ids) & set(a.validation.ids)
    assert len(a.train) + len(a.validation) == 100
    # stratified: every class keeps ~20% of its pairs in validation
    assert np.bincount(a.validation.labels).tolist() == [5, 5, 5, 5]
    # the test split is never touched
    assert len(a.test) == 12


def test_a_validation_split_in_the_file_is_used(tmp_path):
    arrays = _arrays()
    arrays |= {
        "img_val": arrays["img_test"][:5],
        "txt_val": arrays["txt_test"][:5],
        "label_val": arrays["label_test"][:5],
    }
    ds = load_dataset(_write(tmp_path, arrays))
    assert len(ds.validation) == 5 and len(ds.train) == 40


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("img_train"), "missing key 'img_train'"),
        (lambda a: a.pop("txt_test"), "missing key 'txt_test'"),
        (lambda a: a.pop("label_test"), "missing key 'label_test'.*category"),
        (
            lambda a: a.update(txt_train=a["txt_train"][:-1]),
            "img_train has 40 rows but txt_train has 39",
        ),
        (
            lambda a: a["img_train"].__setitem__((3, 2), np.nan),
            "img_train has NaN or infinite values in 1 of 40 rows, the first at row 3, column 2",
        ),
        (lambda a: a["txt_test"].__setitem__((0, 0), np.inf), "txt_test has NaN or infinite"),
        (
            lambda a: a.update(img_test=a["img_test"][:, :-1]),
            "test features have dimensions image 6",
        ),
        (lambda a: a.update(label_train=a["label_train"][:-2]), "label_train must be 40 integers"),
        (
            lambda a: a.update(label_train=a["label_train"].astype(float)),
            "label_train must be 40 integers",
        ),
        (lambda a: a.update(label_test=a["label_test"] - 1), "negative labels"),
        (lambda a: a.update(img_train=np.zeros((40,), np.float32)), "non-empty 2-D"),
        (lambda a: a.update(txt_train=np.zeros((40, 0), np.float32)), "non-empty 2-D"),
        (lambda a: a.update(img_train=np.full((40, 7), "x")), "must be numeric"),
        (lambda a: a.update(class_names=np.array(["a", "b"])), "class_names has 2 names"),
        (lambda a: a.update(id_train=np.array(["same"] * 40)), "duplicate ids"),
        (lambda a: a.update(id_test=np.array(["x"])), "one id per pair"),
    ],
)
def test_malformed_files_are_refused_with_the_reason(tmp_path, change, message):
    arrays = _arrays()
    change(arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(_write(tmp_path, arrays))


def test_validation_with_other_dimensions_is_refused(tmp_path):
    arrays = _arrays()
    arrays |= {
        "img_val": arrays["img_test"][:5, :-1],
        "txt_val": arrays["txt_test"][:5],
        "label_val": arrays["label_test"][:5],
    }
    with pytest.raises(DatasetError, match="validation features have dimensions image 6"):
        load_dataset(_write(tmp_path, arrays))


def test_object_arrays_and_plain_npy_are_refused(tmp_path):
    arrays = _arrays()
    arrays["id_train"] = np.array([object()] * 40, dtype=object)
    with pytest.raises(DatasetError, match="'id_train' holds Python objects") as info:
        load_dataset(_write(tmp_path, arrays))
    assert "allow_pickle" not in str(info.value)
    npy = tmp_path / "plain.npz"
    with npy.open("wb") as f:
        np.save(f, np.zeros((3, 3)))
    with pytest.raises(DatasetError, match=r"not an \.npz archive"):
        load_dataset(npy)


def test_labels_may_be_absent_when_evaluation_is_not_needed(tmp_path):
    arrays = _arrays()
    del arrays["label_train"], arrays["label_test"]
    ds = load_dataset(_write(tmp_path, arrays), require_labels=False)
    assert ds.train.labels is None and len(ds.validation) == 8


def test_too_small_train_split(tmp_path):
    with pytest.raises(DatasetError, match="at least 4"):
        load_dataset(_write(tmp_path, _arrays(n_train=3)))


def test_not_a_file_and_not_an_npz(tmp_path):
    with pytest.raises(DatasetError, match="no such file, and not a built-in"):
        load_dataset(tmp_path / "nope.npz")
    # numpy's message for these is about allow_pickle, which points the wrong way
    junk = tmp_path / "junk.npz"
    junk.write_text("img_train,txt_train\n1,2\n")
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps({"img_train": [[1.0]]}))
    for path in (junk, pickled):
        with pytest.raises(DatasetError, match=r"not an \.npz file \(a zip archive") as info:
            load_dataset(path)
        assert "allow_pickle" not in str(info.value)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 40)  # a zip header and nothing valid after
    with pytest.raises(DatasetError, match=r"not a readable \.npz"):
        load_dataset(broken)


def test_train_cli_rejects_a_malformed_file_before_training(tmp_path, capsys):
    arrays = _arrays()
    arrays["img_train"][0, 0] = np.nan
    code = train_main(["--data", str(_write(tmp_path, arrays)), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2
    assert "img_train has NaN" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
