"""Does an ensemble of independently trained CDPAE encoders help? (diagnosis only)

    python scripts/train_ensemble_check.py wikipedia \
        '{"lr":1e-3,"zscore_text":true,"p_text":0.2,"eval_passes":2}' --members 4 --seeds 0 1 2

For each seed: train `members` models of the configuration on the carved train
split (member m uses seed * 100 + m, early stopping on validation), score on
validation the single first member and the ensembles of the first 2..members
(embeddings concatenated: cosine of the concatenation = norm-weighted mean of
the members' cosines), choose k on validation for each; then refit every member
on train + validation for its own number of evaluation periods and report test
MAP@50 at the validation-chosen k. Test numbers only diagnose.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from app.retrieval import TrainingPool, unit_rows
from training.data import Split, load_dataset
from training.evaluate import (
    best_k,
    cca_rows,
    knn_and_cosine_map50,
    metrics_from_scores,
    sweep_knn_k,
)
from training.trainer import TrainConfig, TrainResult, train_cdpae

K_GRID = (10, 20, 50, 100, 200, 500)


def embed(members: list[TrainResult], split: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool of 2N, image, text) embeddings of the concatenated members."""
    image = np.hstack([m.embed(image=split.image) for m in members])
    text = np.hstack([m.embed(text=split.text) for m in members])
    return image, text, np.vstack([image, text])


def scores_at(
    members: list[TrainResult], pool_split: Split, query: Split, k: int
) -> tuple[float, float]:
    _, _, pool_rows = embed(members, pool_split)
    pool = TrainingPool(unit_rows(pool_rows))
    image, text, _ = embed(members, query)
    ti, tt = unit_rows(image), unit_rows(text)
    return knn_and_cosine_map50(pool, ti, tt, query.labels, k)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("config")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    ds = load_dataset(args.data)
    config = TrainConfig(**json.loads(args.config))
    full = ds.train_and_validation()
    scores, _, _ = cca_rows(full, ds.validation, ds.test)
    cca = metrics_from_scores(scores["cca"], ds.test.labels)["mean_map50"]
    print(f"{args.data} {args.config}: test CCA (train+validation) {cca:.4f}", flush=True)
    for seed in args.seeds:
        start = time.perf_counter()
        members = [
            train_cdpae(config, ds.train, ds.validation, seed=seed * 100 + m)
            for m in range(args.members)
        ]
        trained_s = time.perf_counter() - start
        refits = [
            train_cdpae(
                replace(config, max_evals=m.best_index + 1),
                full,
                ds.validation,
                seed=m.seed,
                keep_best=False,
            )
            for m in members
        ]
        refit_s = time.perf_counter() - start - trained_s
        for size in sorted({1, 2, args.members}):
            _, _, pool_rows = embed(members[:size], ds.train)
            image, text, _ = embed(members[:size], ds.validation)
            table = sweep_knn_k(
                TrainingPool(unit_rows(pool_rows)),
                unit_rows(image),
                unit_rows(text),
                ds.validation.labels,
                K_GRID,
            )
            k = best_k(table)
            knn, cos = scores_at(refits[:size], full, ds.test, k)
            print(
                f"seed {seed} members {size}: val kNN {table[k]:.4f} @k={k}; "
                f"test kNN {knn:.4f} ({knn / cca:.3f}x CCA) cos {cos:.4f}",
                flush=True,
            )
        print(f"seed {seed}: train {trained_s:.1f} s, refit {refit_s:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
