"""Compare CDPAE configurations on repeated validation splits (exploration, never test).

    python scripts/train_cv.py wikipedia --folds 6 '{"lr":1e-3,"zscore_text":true}' ...

One 20 % validation split of Wikipedia (435 pairs) scores a configuration with
noise (~0.01 MAP@50) as large as the differences being looked for. Here every
configuration is trained on `folds` different 80/20 splits of the non-test
pairs (split f carved with seed 1 + f, training seed f) and scored on each
split's validation part; the mean over splits and its standard error decide.
Printed per configuration: validation MAP@50 with cosine at the kept state,
the kNN similarity at each k (mean over splits), the best k of that mean curve,
and the standard error over splits at that k.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from training.baselines import CCA
from training.data import Split, carve_validation, load_dataset
from training.evaluate import cca_rows, metrics_from_scores
from training.selection import validation_knn_table
from training.trainer import TrainConfig, train_cdpae

K_GRID = (10, 20, 50, 100, 200, 500)


def _whitener(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection) of PCA whitening with a small ridge (rank-deficient inputs)."""
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    values, vectors = np.linalg.eigh(cov + 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    return mean, vectors / np.sqrt(values)


def _whiten(train: Split, validation: Split, which: str) -> tuple[Split, Split]:
    out = []
    for part in (train, validation):
        image, text = part.image, part.text
        if which in ("image", "both"):
            mean, proj = _whitener(train.image)
            image = ((image - mean) @ proj).astype(np.float32)
        if which in ("text", "both"):
            mean, proj = _whitener(train.text)
            text = ((text - mean) @ proj).astype(np.float32)
        out.append(replace(part, image=image, text=text))
    return out[0], out[1]


def _sample(split: Split, fraction: float, seed: int) -> Split:
    rng = np.random.default_rng(1000 + seed)
    rows = rng.choice(len(split), size=round(fraction * len(split)), replace=False)
    return split.subset(np.sort(rows))


def _cca_inputs(train: Split, validation: Split, how: str) -> tuple[Split, Split]:
    cca = CCA.fit(train.image, train.text)
    out = []
    for part in (train, validation):
        image = cca.embed_image(part.image).astype(np.float32)
        text = cca.embed_text(part.text).astype(np.float32)
        if how == "append":
            image, text = np.hstack([part.image, image]), np.hstack([part.text, text])
        out.append(replace(part, image=image, text=text))
    return out[0], out[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--folds", type=int, default=6)
    parser.add_argument("--log-text", action="store_true", help="log of the text features")
    parser.add_argument(
        "--whiten",
        choices=["image", "text", "both"],
        help="PCA-whiten these features (fitted on each split's training part) before training",
    )
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="train (CDPAE and CCA) on this random fraction of each split's training part",
    )
    parser.add_argument(
        "--cca-inputs",
        choices=["replace", "append"],
        help="feed CDPAE the CCA projections (fitted on each split's training part) "
        "instead of / next to the raw features",
    )
    args = parser.parse_args()
    pairs = load_dataset(args.data).train_and_validation()
    if args.log_text:
        pairs = replace(pairs, text=np.log(pairs.text).astype(np.float32))
    folds = [carve_validation(pairs, 0.2, seed=1 + fold) for fold in range(args.folds)]
    if args.train_fraction < 1.0:
        folds = [
            (_sample(train, args.train_fraction, fold), val)
            for fold, (train, val) in enumerate(folds)
        ]
    if args.cca_inputs:
        folds = [_cca_inputs(train, val, args.cca_inputs) for train, val in folds]
    if args.whiten:
        folds = [_whiten(train, validation, args.whiten) for train, validation in folds]
    cca, cca_knn = [], []
    for train, validation in folds:
        scores, _, _ = cca_rows(train, validation, validation)
        cca.append(metrics_from_scores(scores["cca"], validation.labels)["mean_map50"])
        cca_knn.append(metrics_from_scores(scores["cca_knn"], validation.labels)["mean_map50"])
    print(
        f"CCA per split: {' '.join(f'{c:.4f}' for c in cca)}; mean {np.mean(cca):.4f}; "
        f"CCA-kNN (k on the same split) mean {np.mean(cca_knn):.4f}"
    )
    first: np.ndarray | None = None
    for spec in args.configs:
        fields = json.loads(spec)
        if "hidden" in fields:
            fields["hidden"] = tuple(fields["hidden"])
        config = TrainConfig(**fields)
        start = time.perf_counter()
        cosine, tables = [], []
        for fold, (train, validation) in enumerate(folds):
            run = train_cdpae(config, train, validation, seed=fold)
            cosine.append(run.best.val_mean)
            tables.append(validation_knn_table(run, train, validation, K_GRID))
        by_k = {k: np.array([t[k] for t in tables]) for k in tables[0]}
        k = max(by_k, key=lambda k: by_k[k].mean())
        sem = by_k[k].std(ddof=1) / np.sqrt(len(tables))
        curve = " ".join(f"{kk}:{v.mean():.4f}" for kk, v in by_k.items())
        # Per split: the best k of that split's own curve (what selection would pick).
        own = np.array([max(t.values()) for t in tables])
        paired = ""
        if first is None:
            first = own
        else:
            diff = own - first
            paired = f" vs first: {diff.mean():+.4f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}"
        print(
            f"{spec}: cos {np.mean(cosine):.4f} kNN {by_k[k].mean():.4f} +- {sem:.4f} @k={k} "
            f"own-k {own.mean():.4f} ({own.mean() / np.mean(cca):.3f}x CCA){paired} "
            f"[{curve}] per split {' '.join(f'{v:.4f}' for v in own)} "
            f"{time.perf_counter() - start:.0f}s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
