"""The refit step of `cdpae train`, measured on held-out pairs (exploration, never test).

    python scripts/train_protocol_cv.py wikipedia '{"lr":1e-3,"zscore_text":true}' \
        --multipliers 1 1.5 2

`cdpae train` chooses the stopping point and k on a validation split, then
retrains on train + validation for the same number of evaluation periods and
serves that. Whether the refit helps, and whether it should train longer on
the larger set, can't be read off the test split without choosing on test, so
here the whole step is repeated inside six outer 80/20 splits of the non-test
pairs: the outer training part is split again (inner 80/20), the configuration
is trained on the inner part with early stopping and k is chosen on the inner
validation part; then it is scored on the outer validation part (a) as is and
(b) refitted on the whole outer training part for round(m * periods) periods.
CCA fitted on the outer training part is the reference, as on test.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from app.retrieval import TrainingPool, unit_rows
from training.data import Split, carve_validation, load_dataset
from training.evaluate import best_k, cca_rows, knn_and_cosine_map50, metrics_from_scores
from training.selection import validation_knn_table
from training.trainer import TrainConfig, TrainResult, train_cdpae

K_GRID = (10, 20, 50, 100, 200, 500)


def held_out_knn(trained: TrainResult, pool_split: Split, held_out: Split, k: int) -> float:
    pool = TrainingPool(unit_rows(trained.train_embeddings(pool_split)))
    image = unit_rows(trained.embed(image=held_out.image))
    text = unit_rows(trained.embed(text=held_out.text))
    assert held_out.labels is not None
    return knn_and_cosine_map50(pool, image, text, held_out.labels, k)[0]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("config")
    parser.add_argument("--folds", type=int, default=6)
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 1.5])
    args = parser.parse_args()
    config = TrainConfig(**json.loads(args.config))
    pairs = load_dataset(args.data).train_and_validation()
    rows: dict[str, list[float]] = {"cca": [], "no refit": []}
    rows.update({f"refit x{m:g}": [] for m in args.multipliers})
    start = time.perf_counter()
    for fold in range(args.folds):
        outer_train, held_out = carve_validation(pairs, 0.2, seed=1 + fold)
        inner_train, inner_val = carve_validation(outer_train, 0.2, seed=101 + fold)
        scores, _, _ = cca_rows(outer_train, held_out, held_out)
        rows["cca"].append(metrics_from_scores(scores["cca"], held_out.labels)["mean_map50"])
        inner = train_cdpae(config, inner_train, inner_val, seed=fold)
        k = best_k(validation_knn_table(inner, inner_train, inner_val, K_GRID))
        rows["no refit"].append(held_out_knn(inner, inner_train, held_out, k))
        for m in args.multipliers:
            refit = train_cdpae(
                replace(config, max_evals=max(1, round(m * (inner.best_index + 1)))),
                outer_train,
                inner_val,
                seed=fold,
                keep_best=False,
            )
            rows[f"refit x{m:g}"].append(held_out_knn(refit, outer_train, held_out, k))
        print(
            f"split {fold}: k={k} periods={inner.best_index + 1} "
            + " ".join(f"{name} {values[-1]:.4f}" for name, values in rows.items()),
            flush=True,
        )
    cca = np.array(rows["cca"])
    for name, values in rows.items():
        v = np.array(values)
        diff = v - np.array(rows["no refit"])
        print(
            f"{name:>10}: held-out mean MAP@50 {v.mean():.4f} ({v.mean() / cca.mean():.3f}x CCA), "
            f"vs no refit {diff.mean():+.4f} +- {diff.std(ddof=1) / np.sqrt(len(v)):.4f}",
            flush=True,
        )
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
