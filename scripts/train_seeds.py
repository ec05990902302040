"""Train and evaluate CDPAE over several seeds on the real data sets; print the results table.

    python scripts/train_seeds.py --data wikipedia cub --seeds 0 1 2 --out .bench/seeds

Each run is the full `cdpae train` (selection on validation, refit, export,
evaluation through the bundle); the script then re-runs `cdpae evaluate`'s code
on every bundle and reports mean and standard deviation over seeds of every
row, with the wall time of each training run. Results go to
<out>/results.json and a markdown table on stdout (pasted into docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from app.bundle import load_bundle
from training.data import load_dataset
from training.evaluate import ROWS, evaluate
from training.train_cli import main as train_main

KEYS = ("i2t_map50", "t2i_map50", "mean_map50", "mean_map_all")


def run(data: str, seed: int, out: Path) -> dict:
    bundle_dir = out / f"{data}-seed{seed}"
    start = time.perf_counter()
    code = train_main(["--data", data, "--out", str(bundle_dir), "--seed", str(seed), "--quiet"])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"cdpae train --data {data} --seed {seed} failed with {code}")
    result = evaluate(load_bundle(bundle_dir), load_dataset(data)).as_json(data)
    report = json.loads((bundle_dir / "report.json").read_text())
    return {
        "data": data,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "evaluate": result,
        "selected": report["selected"],
        "candidates": report["candidates"],
    }


def table(runs: list[dict]) -> str:
    lines = [
        "| data | row | " + " | ".join(KEYS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in KEYS) + " |",
    ]
    for data in dict.fromkeys(r["data"] for r in runs):
        mine = [r for r in runs if r["data"] == data]
        for row in ROWS:
            cells = []
            for key in KEYS:
                values = np.array([r["evaluate"]["metrics"][row][key] for r in mine])
                cells.append(
                    f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f}"
                )
            lines.append(f"| {data} | {row} | " + " | ".join(cells) + " |")
        ratios = [
            r["evaluate"]["metrics"]["cdpae_knn"]["mean_map50"]
            / r["evaluate"]["metrics"]["cca"]["mean_map50"]
            for r in mine
        ]
        seconds = [r["train_seconds"] for r in mine]
        lines.append(
            f"| {data} | cdpae_knn / cca (mean@50) | "
            + ", ".join(f"{x:.3f}" for x in ratios)
            + f" (seeds {[r['seed'] for r in mine]}) | train s: {seconds} | k: "
            + f"{[r['evaluate']['knn_k'] for r in mine]} | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["wikipedia", "cub"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(".bench/seeds"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for data in args.data:
        for seed in args.seeds:
            runs.append(run(data, seed, args.out))
            print(
                json.dumps({k: runs[-1][k] for k in ("data", "seed", "train_seconds")}), flush=True
            )
            (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
