"""Screen CDPAE configurations on the validation split (the exploration behind the grid).

    python scripts/train_variants.py wikipedia 0,1 '{"lr":1e-3,"zscore_text":true}' ...

Each argument after the seeds is a JSON object of TrainConfig fields. For each
configuration and seed it prints: steps, validation MAP@50 (cosine, at the
kept state), the best validation MAP@50 of the kNN similarity and its k, and,
for diagnosis only (never used to choose), the test MAP@50 of both
similarities with that model trained on the train split (no refit).
"""

from __future__ import annotations

import json
import sys
import time

from app.retrieval import TrainingPool, item_codes, unit_rows
from training.data import load_dataset
from training.evaluate import (
    best_k,
    cosine_score_pair,
    knn_score_pair,
    metrics_from_scores,
    sweep_knn_k,
)
from training.trainer import TrainConfig, train_cdpae

K_GRID = (10, 20, 50, 100, 200, 500)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, seeds, specs = argv[0], [int(s) for s in argv[1].split(",")], argv[2:]
    ds = load_dataset(name)
    for spec in specs:
        fields = json.loads(spec)
        if "hidden" in fields:
            fields["hidden"] = tuple(fields["hidden"])
        for seed in seeds:
            start = time.perf_counter()
            r = train_cdpae(TrainConfig(**fields), ds.train, ds.validation, seed=seed)
            seconds = time.perf_counter() - start
            pool = TrainingPool(unit_rows(r.train_embeddings(ds.train)))
            table = sweep_knn_k(
                pool,
                unit_rows(r.embed(image=ds.validation.image)),
                unit_rows(r.embed(text=ds.validation.text)),
                ds.validation.labels,
                K_GRID,
            )
            k = best_k(table)
            ti, tt = unit_rows(r.embed(image=ds.test.image)), unit_rows(r.embed(text=ds.test.text))
            ci = item_codes(pool, *pool.exact_neighbours(ti, k))
            ct = item_codes(pool, *pool.exact_neighbours(tt, k))
            test_knn = metrics_from_scores(knn_score_pair(pool, ci, ct), ds.test.labels)
            test_cos = metrics_from_scores(cosine_score_pair(ti, tt), ds.test.labels)
            print(
                f"{spec} s{seed} {seconds:.0f}s steps={r.steps} val_cos={r.best.val_mean:.4f} "
                f"val_knn={table[k]:.4f}@{k} | test knn={test_knn['mean_map50']:.4f} "
                f"cos={test_cos['mean_map50']:.4f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
