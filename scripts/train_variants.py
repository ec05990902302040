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

from app.retrieval import TrainingPool, unit_rows
from training.data import load_dataset
from training.evaluate import best_k, knn_and_cosine_map50
from training.selection import validation_knn_table
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
            table = validation_knn_table(r, ds.train, ds.validation, K_GRID)
            k = best_k(table)
            pool = TrainingPool(unit_rows(r.train_embeddings(ds.train)))
            ti, tt = unit_rows(r.embed(image=ds.test.image)), unit_rows(r.embed(text=ds.test.text))
            test_knn, test_cos = knn_and_cosine_map50(pool, ti, tt, ds.test.labels, k)
            print(
                f"{spec} s{seed} {seconds:.0f}s steps={r.steps} val_cos={r.best.val_mean:.4f} "
                f"val_knn={table[k]:.4f}@{k} | test knn={test_knn:.4f} "
                f"cos={test_cos:.4f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
