"""`cdpae search`: query a running service from the terminal and print a table of hits.

    cdpae search --url http://127.0.0.1:8000 --modality image --vector-file q.npy --top-k 5

`--modality` is the modality of the query vectors: image queries rank texts,
text queries rank images. The vector file holds one vector or a batch (one row
per query) as .npy, .json (a list or a list of lists) or plain text (.txt/.csv,
one row per line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app.client import DEFAULT_URL, CdpaeError, Client, QueryResult


class VectorFileError(Exception):
    """The vector file can't be read as numbers; the message says why."""


def read_vectors(path: Path) -> np.ndarray:
    """A (n, d) float array from .npy, .json or a text file."""
    if not path.is_file():
        raise VectorFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".json":
            array = np.asarray(json.loads(path.read_text()), dtype=np.float64)
        else:
            array = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise VectorFileError(f"{path}: can't read vectors ({exc})") from exc
    if array.dtype.kind not in "fiu":
        raise VectorFileError(f"{path}: expected numbers, found dtype {array.dtype}")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0 or array.shape[0] == 0:
        raise VectorFileError(
            f"{path}: expected one vector or a 2-D batch (queries x features), got shape "
            f"{array.shape}"
        )
    if not np.isfinite(array).all():
        raise VectorFileError(f"{path}: contains NaN or infinity")
    return array.astype(np.float64)


def parse_filter(pairs: Sequence[str]) -> dict[str, str]:
    """['category=art', ...] -> {'category': 'art'}."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--filter: expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _metadata_text(metadata: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in metadata.items())


def format_table(results: Sequence[QueryResult], *, target: str) -> str:
    """One block per query: rank, id, score, metadata, in aligned columns."""
    blocks = []
    for q, result in enumerate(results):
        rows = [("rank", f"{target} id", "score", "metadata")]
        rows += [
            (str(rank), hit.id, f"{hit.score:.4f}", _metadata_text(hit.metadata))
            for rank, hit in enumerate(result.hits, start=1)
        ]
        widths = [max(len(row[c]) for row in rows) for c in range(4)]
        lines = [f"query {q}: {len(result.hits)} hits"]
        for i, row in enumerate(rows):
            cells = [
                row[0].rjust(widths[0]),
                row[1].ljust(widths[1]),
                row[2].rjust(widths[2]),
                row[3],
            ]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdpae search",
        description="Query a running cdpae service and print the hits as a table.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("CDPAE_URL", DEFAULT_URL),
        help="service base URL (default: $CDPAE_URL or %(default)s)",
    )
    parser.add_argument(
        "--modality",
        required=True,
        choices=["image", "text"],
        help="modality of the query vectors: image ranks texts, text ranks images",
    )
    parser.add_argument(
        "--vector-file",
        required=True,
        type=Path,
        help="query vectors: .npy, .json or .txt/.csv, one row per query",
    )
    parser.add_argument("--top-k", type=int, default=10, help="hits per query (default 10)")
    parser.add_argument(
        "--similarity",
        choices=["knn", "cosine"],
        default="knn",
        help="knn marginal-probability similarity (default) or plain cosine",
    )
    parser.add_argument(
        "--mode",
        choices=["auto", "exact", "approximate"],
        default=None,
        help="exact or approximate (HNSW) gallery search; default: the server's auto",
    )
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only hits whose metadata KEY equals VALUE (repeatable)",
    )
    parser.add_argument(
        "--api-key", default=None, help="API key (default: $CDPAE_CLIENT_API_KEY when set)"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds (default: $CDPAE_TIMEOUT or 30)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw hits as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1:
        print(f"cdpae search: --top-k must be at least 1, got {args.top_k}", file=sys.stderr)
        return 2
    try:
        vectors = read_vectors(args.vector_file)
        filters = parse_filter(args.filter)
    except (VectorFileError, ValueError) as exc:
        print(f"cdpae search: {exc}", file=sys.stderr)
        return 2
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            results = client.search(
                args.modality,
                vectors,
                top_k=args.top_k,
                similarity=args.similarity,
                filter=filters or None,
                mode=args.mode,
            )
    except CdpaeError as exc:
        print(f"cdpae search: {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        payload = [
            [{"id": h.id, "score": h.score, "metadata": h.metadata} for h in r.hits]
            for r in results
        ]
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(results, target="text" if args.modality == "image" else "image"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
