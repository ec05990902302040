"""Per-modality z-scoring fitted on the training split (sklearn StandardScaler's rule).

The statistics become part of the exported encoder (the ONNX graph subtracts
`mean` and divides by `scale`), so served encoders take raw features. Where a
modality is not z-scored the statistics are the identity (mean 0, scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray  # (d,) float32
    scale: np.ndarray  # (d,) float32, never 0

    @classmethod
    def fit(cls, x: np.ndarray, enabled: bool = True) -> Standardizer:
        d = x.shape[1]
        if not enabled:
            return cls(np.zeros(d, dtype=np.float32), np.ones(d, dtype=np.float32))
        x64 = np.asarray(x, dtype=np.float64)
        std = x64.std(axis=0)
        # A constant column would divide by 0; StandardScaler leaves it unscaled.
        std[std < 1e-12] = 1.0
        return cls(x64.mean(axis=0).astype(np.float32), std.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.scale).astype(np.float32)
