"""`cdpae train`: train CDPAE, select on validation, export a bundle, evaluate it.

    cdpae train --data wikipedia --out models/wikipedia [--seed N] [--quick]

Steps: load and validate the data (a bad file stops here, exit 2); train every
candidate of the selection grid and choose the configuration and the k of the
kNN similarity on validation; export the winner into a staged bundle (ONNX
checked against torch); evaluate the staged bundle on the test split through
the service's own loader; add report.json, plots and metrics; move the bundle
into place atomically; print a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from app.bundle import load_bundle
from training.data import DatasetError, load_dataset
from training.evaluate import ROWS, TRAIN_PLUS_VALIDATION, Evaluation, evaluate
from training.export import (
    GalleryArrays,
    finalise_bundle,
    onnx_max_difference,
    write_bundle,
)
from training.model import encoder_weights
from training.report import plot_knn_k, plot_precision_recall, plot_training, plot_tsne
from training.selection import Selection, default_grid, quick_grid, run_selection
from training.trainer import TrainResult, train_cdpae

# ONNX must reproduce the torch encoder to this absolute tolerance (float32 math).
ONNX_TOLERANCE = 1e-5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdpae train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="wikipedia, cub, or a path to an .npz file")
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of training (default 0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="no grid search: one preset configuration, at most 6 validation evaluations",
    )
    parser.add_argument(
        "--no-refit",
        action="store_true",
        help="serve the selected model as trained on the train split, instead of refitting "
        "it on train + validation for as many evaluation periods as its kept state",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the plots (faster)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    try:
        dataset = load_dataset(args.data)
    except DatasetError as exc:
        print(f"cdpae train: {exc}", file=sys.stderr)
        return 2

    grid = quick_grid() if args.quick else default_grid()
    selection = run_selection(dataset, grid, seed=args.seed, progress=not args.quiet)
    winner = selection.winner
    timings = {"selection_s": round(time.perf_counter() - started, 2)}
    pool_split = dataset.train
    trained = winner.result
    if not args.no_refit:
        # Selection is done; the validation pairs now serve as more training data.
        # Same configuration, as many evaluation periods as the kept state, last state kept.
        pool_split = dataset.train_and_validation()
        trained = train_cdpae(
            replace(winner.candidate.config, max_evals=winner.eval_periods),
            pool_split,
            dataset.validation,
            seed=args.seed,
            progress=not args.quiet,
            description="refit train+validation",
            keep_best=False,
        )
        timings["refit_s"] = round(time.perf_counter() - started - timings["selection_s"], 2)

    export_started = time.perf_counter()  # the export's own time, the refit's excluded
    image_encoder = encoder_weights(trained.model.image_encoder, trained.image_input)
    text_encoder = encoder_weights(trained.model.text_encoder, trained.text_input)
    onnx_diff = {
        "image": onnx_max_difference(
            image_encoder, lambda x: trained.embed(image=x), dataset.validation.image
        ),
        "text": onnx_max_difference(
            text_encoder, lambda x: trained.embed(text=x), dataset.validation.text
        ),
    }
    if max(onnx_diff.values()) > ONNX_TOLERANCE:
        print(f"cdpae train: ONNX export differs from torch by {onnx_diff}", file=sys.stderr)
        return 1

    hyperparameters = {
        **winner.candidate.config.as_dict(),
        "config_name": winner.candidate.name,
        "knn_k": winner.knn_k,
        "seed": args.seed,
        "trained_on": "train" if args.no_refit else TRAIN_PLUS_VALIDATION,
        "steps": trained.steps,
        "selected_steps": winner.result.best.step,
        "selected_on": "validation mean MAP@50, kNN similarity",
    }
    validation = {
        "cosine_mean_map50": round(winner.val_cosine, 6),
        "knn_mean_map50": round(winner.val_knn, 6),
        "knn_k": winner.knn_k,
    }
    test = dataset.test
    staged = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.staged-", dir=_parent(args.out)))
    staged_bundle = staged / "bundle"
    try:
        write_bundle(
            staged_bundle,
            dataset=dataset.name,
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            train_embeddings=trained.train_embeddings(pool_split),
            gallery=GalleryArrays(
                ids=test.ids,
                categories=dataset.category_names(test.labels)
                if test.labels is not None
                else np.array([""] * len(test)),
                image=test.image,
                text=test.text,
            ),
            knn_k=winner.knn_k,
            hyperparameters=hyperparameters,
            metrics={"validation": validation},
            seed=args.seed,
        )
        # Evaluate the bundle as the service loads it: these are the served numbers.
        evaluation = evaluate(load_bundle(staged_bundle), dataset)
        timings["export_evaluate_s"] = round(time.perf_counter() - export_started, 2)
        report = {
            "dataset": dataset.name,
            "seed": args.seed,
            "quick": args.quick,
            "n_pairs": {
                "train": len(dataset.train),
                "validation": len(dataset.validation),
                "test": len(test),
            },
            "selected": hyperparameters,
            "validation": validation,
            "candidates": [r.summary() for r in selection.results],
            "cca_validation_knn_by_k": {str(k): v for k, v in evaluation.cca_k_table.items()},
            "test": evaluation.as_json(dataset.name),
            "onnx_max_abs_difference": onnx_diff,
            "hnsw_recall_at_k": evaluation.hnsw_recall,
            "history": [
                {
                    "step": p.step,
                    "epoch": round(p.epoch, 3),
                    "train_loss": p.train_loss,
                    "val_i2t_map50": p.val_i2t,
                    "val_t2i_map50": p.val_t2i,
                }
                for p in trained.history
            ],
        }

        def add_report(bundle_dir: Path) -> None:
            if not args.no_plots:
                _write_plots(
                    bundle_dir / "plots", selection, evaluation, dataset.class_names, args.seed
                )
            report["timings"] = {**timings, "total_s": round(time.perf_counter() - started, 2)}
            (bundle_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")

        finalise_bundle(
            staged_bundle,
            args.out,
            metrics={
                "test": evaluation.metrics,
                "cca_knn_k": evaluation.cca_knn_k,
                "hnsw_recall_at_k": evaluation.hnsw_recall,
                "onnx_max_abs_difference": onnx_diff,
            },
            extra_files=add_report,
        )
    finally:
        _remove_tree(staged)
    _print_summary(args.out, selection, trained, evaluation.as_json(dataset.name), report)
    if not args.no_refit:
        print(
            f"served model: refitted on {len(pool_split)} train+validation pairs, "
            f"{trained.steps} steps"
        )
    return 0


def _parent(out: Path) -> Path:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _write_plots(
    plots: Path, selection: Selection, evaluation: Evaluation, class_names: np.ndarray, seed: int
) -> None:
    plots.mkdir(exist_ok=True)
    plot_training(selection, plots / "training_curves.png")
    plot_knn_k(selection, evaluation.cca_k_table, plots / "knn_k_validation.png")
    plot_precision_recall(evaluation, plots / "precision_recall.png")
    plot_tsne(evaluation, class_names, plots / "tsne.png", seed)


def _print_summary(
    out: Path, selection: Selection, trained: TrainResult, test: dict, report: dict
) -> None:
    winner = selection.winner
    print(f"bundle: {out}  ({report['timings']['total_s']:.1f} s, pid {os.getpid()})")
    print(
        f"selected: {winner.candidate.name} (seed {trained.seed}, best at step "
        f"{winner.result.best.step} of {winner.result.steps}), "
        f"knn_k={winner.knn_k}; validation MAP@50 knn {winner.val_knn:.4f}, "
        f"cosine {winner.val_cosine:.4f}"
    )
    print(f"test ({test['dataset']}):  {'':14} i2t@50  t2i@50  mean@50  mean@all")
    for row in ROWS:
        m = test["metrics"][row]
        print(
            f"  {row:<26} {m['i2t_map50']:.4f}  {m['t2i_map50']:.4f}  {m['mean_map50']:.4f}"
            f"   {m['mean_map_all']:.4f}"
        )
    ratio = test["metrics"]["cdpae_knn"]["mean_map50"] / max(
        test["metrics"]["cca"]["mean_map50"], 1e-12
    )
    print(f"cdpae_knn / cca mean MAP@50: {ratio:.3f}; hnsw recall@k {test['hnsw_recall_at_k']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
