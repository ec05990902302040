"""What the encoders see: per-modality z-scoring, optionally with canonical directions appended.

z-scoring uses statistics fitted on the training split (sklearn StandardScaler's
rule); where a modality is not z-scored the statistics are the identity (mean 0,
scale 1). With `TrainConfig.cca_inputs` the encoder input is `[z, (z - centre) @
directions]`: the z-scored features followed by their projection on the CCA
directions fitted on the same training pairs (no labels). Both parts are linear
in the raw features, so a single `tanh(W x + a)` layer on top is still a single
such layer on the raw features: export folds the directions into W
(model.encoder_weights) and the served ONNX graph keeps its form. What changes
is training: the target distances D_ij and the denoising see the canonical
coordinates too (docs/training.md, "CCA directions as encoder inputs").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from training.baselines import CCA, CCASide


@dataclass(frozen=True)
class CanonicalCoordinates:
    """z -> (z - centre) @ directions: the CCA coordinates appended to the z-scored features."""

    centre: np.ndarray  # (d,) float32
    directions: np.ndarray  # (d, p) float32

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return (z - self.centre) @ self.directions


@dataclass(frozen=True)
class Preprocessor:
    mean: np.ndarray  # (d,) float32
    scale: np.ndarray  # (d,) float32, never 0
    canonical: CanonicalCoordinates | None = None

    @classmethod
    def fit(cls, x: np.ndarray, enabled: bool = True) -> Preprocessor:
        d = x.shape[1]
        if not enabled:
            return cls(np.zeros(d, dtype=np.float32), np.ones(d, dtype=np.float32))
        x64 = np.asarray(x, dtype=np.float64)
        std = x64.std(axis=0)
        # A constant column would divide by 0; StandardScaler leaves it unscaled.
        std[std < 1e-12] = 1.0
        return cls(x64.mean(axis=0).astype(np.float32), std.astype(np.float32))

    def zscore(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.scale).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = self.zscore(x)
        if self.canonical is None:
            return z
        return np.hstack([z, self.canonical(z)]).astype(np.float32)


# Directions of the training features with less variance than this (relative to the largest)
# are degenerate: Wikipedia's topic proportions sum to 1, so one direction has none at all.
NULL_VARIANCE = 1e-6


def with_canonical_directions(
    image: Preprocessor, text: Preprocessor, train_image: np.ndarray, train_text: np.ndarray
) -> tuple[Preprocessor, Preprocessor]:
    """Both preprocessors with the CCA directions of the z-scored training pairs appended."""
    z_image, z_text = image.zscore(train_image), text.zscore(train_text)
    cca = CCA.fit(z_image, z_text)

    def canonical(side: CCASide, z: np.ndarray) -> CanonicalCoordinates:
        return CanonicalCoordinates(
            centre=side.mean.astype(np.float32),
            directions=_without_null_directions(side.linear_map, z).astype(np.float32),
        )

    return (
        replace(image, canonical=canonical(cca.image, z_image)),
        replace(text, canonical=canonical(cca.text, z_text)),
    )


def _without_null_directions(directions: np.ndarray, train: np.ndarray) -> np.ndarray:
    """`directions` minus their part along directions in which the training data don't vary.

    CCA's ridge-regularised whitening scales such a direction by up to 1/sqrt(ridge) (100x),
    which changes no training coordinate (the data have no extent there) but turns float32
    rounding into errors of ~1e-5 in the encoder output. Dropping that part keeps every
    coordinate of the training data (up to rounding) and the exported weights well scaled.
    """
    # atleast_2d: np.cov of a single feature column is a 0-d array
    cov = np.atleast_2d(np.cov(np.asarray(train, dtype=np.float64), rowvar=False))
    values, vectors = np.linalg.eigh(cov)
    null = vectors[:, values < NULL_VARIANCE * values.max()]
    return directions - null @ (null.T @ directions)
