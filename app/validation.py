"""Checks of client-supplied vectors, raising a domain error (no HTTP here).

`InvalidInput` names the offending field (`vectors[3][5]`, `items[2].vector`) and says what
was expected; app/errors.py maps it to a 422. The engine and the shards raise it; neither
knows about status codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class InvalidInput(Exception):
    """A request value the service can't use; `field` names it, the message says why."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def feature_matrix(rows: Sequence[Sequence[float]], dim: int, what: str, field: str) -> np.ndarray:
    """Raw feature rows -> (n, dim) float32, or InvalidInput naming the bad row.

    `what` says whose features these are (in the message); `field` is a template with `{i}`.
    """
    for i, row in enumerate(rows):
        if len(row) != dim:
            raise InvalidInput(f"expected {dim} floats ({what}), got {len(row)}", field.format(i=i))
    with np.errstate(over="ignore"):
        matrix = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)
    # Finite as JSON floats can still overflow float32 (1e39 -> inf).
    bad = ~np.isfinite(matrix)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise InvalidInput(
            f"value {rows[i][j]!r} is not finite as float32", field.format(i=i) + f"[{j}]"
        )
    return matrix


def finite_embeddings(units: np.ndarray, modality: str, field: str) -> np.ndarray:
    """The embeddings, or InvalidInput naming the first row that is not finite.

    Finite but huge inputs overflow inside the encoder (its z-scoring) to NaN, which ranks
    nothing and would poison later searches.
    """
    bad = ~np.isfinite(units).all(axis=1)
    if bad.any():
        raise InvalidInput(
            f"the {modality} encoder overflows on these values (too large in magnitude)",
            field.format(i=int(np.argmax(bad))),
        )
    return units
