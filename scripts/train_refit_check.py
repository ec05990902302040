"""Does refitting the selected configuration on train + validation help? (diagnosis only)

    python scripts/train_refit_check.py wikipedia \
        '{"lr":1e-3,"zscore_text":true,"p_text":0.2,"eval_passes":2}'

For seeds 0, 1, 2: train on the carved train split with validation early
stopping, choose k on validation, and report test MAP@50 (kNN and cosine); then
retrain the same configuration on train + validation for the same number of
evaluation periods (last state kept) and report test MAP@50 again. Also prints
CCA fitted on train + validation. The test numbers only diagnose; nothing is
chosen on them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from app.retrieval import TrainingPool, unit_rows
from training.data import Dataset, Split, load_dataset
from training.evaluate import (
    best_k,
    cca_rows,
    knn_and_cosine_map50,
    metrics_from_scores,
)
from training.selection import validation_knn_table
from training.trainer import TrainConfig, TrainResult, train_cdpae


def test_map50(ds: Dataset, trained: TrainResult, train: Split, k: int) -> tuple[float, float]:
    pool = TrainingPool(unit_rows(trained.train_embeddings(train)))
    ti = unit_rows(trained.embed(image=ds.test.image))
    tt = unit_rows(trained.embed(text=ds.test.text))
    return knn_and_cosine_map50(pool, ti, tt, ds.test.labels, k)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ds = load_dataset(argv[0])
    config = TrainConfig(**json.loads(argv[1]))
    full = ds.train_and_validation()
    scores, _, _ = cca_rows(full, ds.validation, ds.test)
    print("CCA on train+validation:", metrics_from_scores(scores["cca"], ds.test.labels))
    for seed in (0, 1, 2):
        r = train_cdpae(config, ds.train, ds.validation, seed=seed)
        table = validation_knn_table(r, ds.train, ds.validation, (10, 20, 50, 100, 200, 500))
        k = best_k(table)
        before = test_map50(ds, r, ds.train, k)
        refit = train_cdpae(
            replace(config, max_evals=r.best_index + 1),
            full,
            ds.validation,
            seed=seed,
            keep_best=False,
        )
        after = test_map50(ds, refit, full, k)
        print(f"seed {seed} k={k}: train split test kNN/cos {before}; refit {after}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
