"""Load and validate a paired data set in the project's .npz format.

Format (training/datasets/README.md): img_train, txt_train, label_train,
img_test, txt_test, label_test, optional id_*, class_names, and optional
img_val/txt_val/label_val. Any feature dimensions, any number of pairs or
categories. Numpy only, so benchmarks and the evaluator can use it without torch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS_DIR = Path(__file__).parent / "datasets"
BUILTIN = ("wikipedia", "cub")
VALIDATION_FRACTION = 0.2
VALIDATION_SEED = 0


class DatasetError(ValueError):
    """The file can't be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class Split:
    """Aligned pairs: row i of image and row i of text describe the same object."""

    image: np.ndarray  # (n, d_img) float32
    text: np.ndarray  # (n, d_txt) float32
    labels: np.ndarray | None  # (n,) int, for evaluation only
    ids: np.ndarray  # (n,) str

    def __len__(self) -> int:
        return self.image.shape[0]

    def subset(self, rows: np.ndarray) -> Split:
        return Split(
            image=self.image[rows],
            text=self.text[rows],
            labels=None if self.labels is None else self.labels[rows],
            ids=self.ids[rows],
        )


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    validation: Split
    test: Split
    class_names: np.ndarray  # (n_classes,) str

    @property
    def image_dim(self) -> int:
        return self.train.image.shape[1]

    @property
    def text_dim(self) -> int:
        return self.train.text.shape[1]

    def category_names(self, labels: np.ndarray) -> np.ndarray:
        return self.class_names[labels]

    def train_and_validation(self) -> Split:
        """Every pair that is not test: what the final model is refitted on after selection."""
        parts = (self.train, self.validation)
        labels = None
        if all(p.labels is not None for p in parts):
            labels = np.concatenate([p.labels for p in parts])
        return Split(
            image=np.vstack([p.image for p in parts]),
            text=np.vstack([p.text for p in parts]),
            labels=labels,
            ids=np.concatenate([p.ids for p in parts]),
        )


def resolve(data: str | Path) -> tuple[str, Path]:
    """`wikipedia` / `cub` name the shipped sets; anything else is a path."""
    if str(data) in BUILTIN:
        return str(data), DATASETS_DIR / f"{data}.npz"
    path = Path(data)
    if not path.is_file():
        raise DatasetError(
            f"data {data!r}: no such file, and not a built-in data set ({', '.join(BUILTIN)})"
        )
    return path.stem, path


def load_dataset(
    data: str | Path,
    *,
    require_labels: bool = True,
    validation_fraction: float = VALIDATION_FRACTION,
    validation_seed: int = VALIDATION_SEED,
) -> Dataset:
    """Read, validate and split a data set; raise DatasetError saying what is wrong.

    Where the file has no validation split, one is carved out of train with a
    fixed seed (stratified by label where labels exist), so selection never
    sees the test split.
    """
    name, path = resolve(data)
    _check_is_npz(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # a zip header, then garbage
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: a single .npy array, not an .npz archive of named arrays")
    with archive:
        arrays = {}
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:  # object arrays need pickle, which is never allowed
                # numpy's own message suggests allow_pickle, which this loader never sets
                raise DatasetError(
                    f"{path}: array {key!r} holds Python objects (dtype object), which are never "
                    "loaded; save it as numbers, or as fixed-width strings for ids and names"
                ) from exc

    train = _read_split(arrays, "train", path, require_labels)
    test = _read_split(arrays, "test", path, require_labels)
    _check_same_dims(train, test, "test", path)
    if "img_val" in arrays:
        validation = _read_split(arrays, "val", path, require_labels)
        _check_same_dims(train, validation, "validation", path)
    else:
        train, validation = carve_validation(train, validation_fraction, validation_seed)

    n_classes = (
        int(max(s.labels.max() for s in (train, validation, test) if s.labels is not None) + 1)
        if train.labels is not None
        else 0
    )
    if "class_names" in arrays:
        class_names = np.asarray(arrays["class_names"], dtype=str)
        if len(class_names) < n_classes:
            raise DatasetError(
                f"{path}: class_names has {len(class_names)} names "
                f"but labels go up to {n_classes - 1}"
            )
    else:
        class_names = np.array([f"class_{i}" for i in range(n_classes)])
    return Dataset(
        name=name, train=train, validation=validation, test=test, class_names=class_names
    )


# A .npz is a zip archive; a .npy starts with numpy's magic string.
_NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


def _check_is_npz(path: Path) -> None:
    """Say what the file is not before numpy does: for a text or pickle file numpy's error is
    about allow_pickle, which points the wrong way."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise DatasetError(f"{path}: can't be read ({exc.strerror})") from exc
    if head.startswith(_NPY_MAGIC):
        raise DatasetError(f"{path}: a single .npy array, not an .npz archive of named arrays")
    if not head.startswith(_NPZ_MAGIC):
        raise DatasetError(
            f"{path}: not an .npz file (a zip archive of named arrays, as numpy.savez writes); "
            f"it starts with {head!r}"
        )


def _check_same_dims(train: Split, other: Split, name: str, path: Path) -> None:
    if other.image.shape[1] != train.image.shape[1] or other.text.shape[1] != train.text.shape[1]:
        raise DatasetError(
            f"{path}: {name} features have dimensions image {other.image.shape[1]}, text "
            f"{other.text.shape[1]}; train has {train.image.shape[1]}, {train.text.shape[1]}"
        )


def _read_split(
    arrays: dict[str, np.ndarray], split: str, path: Path, require_labels: bool
) -> Split:
    keys = {"image": f"img_{split}", "text": f"txt_{split}", "labels": f"label_{split}"}
    for what in ("image", "text"):
        if keys[what] not in arrays:
            raise DatasetError(f"{path}: missing key {keys[what]!r} ({what} features of {split})")
    if require_labels and keys["labels"] not in arrays:
        raise DatasetError(
            f"{path}: missing key {keys['labels']!r}: evaluation needs the category of every pair"
        )
    image, text = arrays[keys["image"]], arrays[keys["text"]]
    for key, matrix in ((keys["image"], image), (keys["text"], text)):
        if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
            raise DatasetError(
                f"{path}: {key} must be a non-empty 2-D (pairs, features) array, "
                f"got shape {matrix.shape}"
            )
        if not np.issubdtype(matrix.dtype, np.number):
            raise DatasetError(f"{path}: {key} must be numeric, got dtype {matrix.dtype}")
        finite = np.isfinite(matrix)
        if not finite.all():
            bad_rows = (~finite).any(axis=1)
            row, column = (int(i) for i in np.argwhere(~finite)[0])
            raise DatasetError(
                f"{path}: {key} has NaN or infinite values in {int(bad_rows.sum())} of "
                f"{len(matrix)} rows, the first at row {row}, column {column} "
                f"({matrix[row, column]})"
            )
    if image.shape[0] != text.shape[0]:
        raise DatasetError(
            f"{path}: {keys['image']} has {image.shape[0]} rows but {keys['text']} has "
            f"{text.shape[0]}: row i of each must describe the same pair"
        )
    labels = None
    if keys["labels"] in arrays:
        labels = arrays[keys["labels"]]
        if labels.shape != (image.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"{path}: {keys['labels']} must be {image.shape[0]} integers (one per pair), "
                f"got shape {labels.shape} dtype {labels.dtype}"
            )
        if labels.min() < 0:
            raise DatasetError(f"{path}: {keys['labels']} has negative labels; they start at 0")
        labels = labels.astype(np.int64)
    id_key = f"id_{split}"
    ids = (
        np.asarray(arrays[id_key], dtype=str)
        if id_key in arrays
        else np.array([f"{split}-{i}" for i in range(image.shape[0])])
    )
    if ids.shape != (image.shape[0],):
        raise DatasetError(f"{path}: {id_key} must hold one id per pair ({image.shape[0]})")
    if len(np.unique(ids)) != len(ids):
        raise DatasetError(f"{path}: {id_key} has duplicate ids")
    return Split(
        image=image.astype(np.float32), text=text.astype(np.float32), labels=labels, ids=ids
    )


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    rng = np.random.default_rng(seed)
    n = len(train)
    if n < 4:
        raise DatasetError(f"train split has {n} pairs; at least 4 are needed to carve validation")
    if train.labels is None:
        rows = rng.permutation(n)
        n_val = max(1, round(fraction * n))
        return train.subset(np.sort(rows[n_val:])), train.subset(np.sort(rows[:n_val]))
    val_rows = []
    for label in np.unique(train.labels):
        members = rng.permutation(np.flatnonzero(train.labels == label))
        val_rows.extend(members[: round(fraction * len(members))])
    val_mask = np.zeros(n, dtype=bool)
    val_mask[val_rows] = True
    if not val_mask.any() or val_mask.all():
        raise DatasetError(f"train split of {n} pairs is too small to carve a validation split")
    return train.subset(np.flatnonzero(~val_mask)), train.subset(np.flatnonzero(val_mask))
