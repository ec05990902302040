"""`cdpae evaluate`: score a bundle and the CCA baselines on a data set's test split.

    cdpae evaluate --bundle models/wikipedia --data wikipedia [--json]

The CDPAE rows go through the bundle exactly as the service serves it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.bundle import BundleError, load_bundle
from training.data import DatasetError, load_dataset
from training.evaluate import ROWS, evaluate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdpae evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    parser.add_argument("--data", required=True, help="wikipedia, cub, or a path to an .npz file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        dataset = load_dataset(args.data)
        bundle = load_bundle(args.bundle)
    except (DatasetError, BundleError) as exc:
        print(f"cdpae evaluate: {exc}", file=sys.stderr)
        return 2
    dims = bundle.manifest.input_dims
    if dims != {"image": dataset.image_dim, "text": dataset.text_dim}:
        print(
            f"cdpae evaluate: bundle {args.bundle} takes image {dims['image']} / text "
            f"{dims['text']} features, data {args.data!r} has {dataset.image_dim} / "
            f"{dataset.text_dim}",
            file=sys.stderr,
        )
        return 2
    result = evaluate(bundle, dataset).as_json(dataset.name)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['dataset']} {result['split']} split, knn_k={result['knn_k']}")
    print(f"{'':14} i2t@50  t2i@50  mean@50  i2t@all  t2i@all  mean@all")
    for row in ROWS:
        m = result["metrics"][row]
        print(
            f"{row:<13} {m['i2t_map50']:.4f}  {m['t2i_map50']:.4f}  {m['mean_map50']:.4f}   "
            f"{m['i2t_map_all']:.4f}   {m['t2i_map_all']:.4f}   {m['mean_map_all']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
