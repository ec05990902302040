"""Linear CCA, the baseline CDPAE is compared against (numpy only).

As in data/README.md: centre each side, reduce a side of more than 256
dimensions to 128 with PCA first, then fit CCA with a small ridge on the
covariances and keep 10 components. Items are compared by cosine of their
projections (or through the kNN marginal similarity, like CDPAE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PCA_ABOVE = 256
PCA_DIM = 128
CCA_COMPONENTS = 10
# Relative ridge: added to each covariance as ridge * mean eigenvalue, so the
# regularisation is scale-free (SIFT histograms and doc2vec differ by orders of magnitude).
CCA_RIDGE = 1e-4


@dataclass(frozen=True)
class CCASide:
    mean: np.ndarray  # (d,)
    pca: np.ndarray | None  # (d, PCA_DIM) or None
    projection: np.ndarray  # (d' , n_components)

    @property
    def linear_map(self) -> np.ndarray:
        """(d, n_components): transform(x) == (x - mean) @ linear_map."""
        return self.projection if self.pca is None else self.pca @ self.projection

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.linear_map


def _pca_basis(centred: np.ndarray, dim: int) -> np.ndarray:
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:dim].T


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors / np.sqrt(np.maximum(values, 1e-12))) @ vectors.T


def _regularised_cov(x: np.ndarray, ridge: float) -> np.ndarray:
    cov = x.T @ x / (len(x) - 1)
    return cov + ridge * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])


@dataclass(frozen=True)
class CCA:
    image: CCASide
    text: CCASide
    correlations: np.ndarray  # canonical correlations of the kept components

    @classmethod
    def fit(
        cls,
        image: np.ndarray,
        text: np.ndarray,
        n_components: int = CCA_COMPONENTS,
        ridge: float = CCA_RIDGE,
    ) -> CCA:
        sides, reduced = [], []
        for x in (image, text):
            x = np.asarray(x, dtype=np.float64)
            mean = x.mean(axis=0)
            centred = x - mean
            pca = _pca_basis(centred, PCA_DIM) if x.shape[1] > PCA_ABOVE else None
            reduced.append(centred if pca is None else centred @ pca)
            sides.append((mean, pca))
        x, y = reduced
        n_components = min(n_components, x.shape[1], y.shape[1])
        cxx_is = _inverse_sqrt(_regularised_cov(x, ridge))
        cyy_is = _inverse_sqrt(_regularised_cov(y, ridge))
        cxy = x.T @ y / (len(x) - 1)
        u, s, vt = np.linalg.svd(cxx_is @ cxy @ cyy_is)
        wx = cxx_is @ u[:, :n_components]
        wy = cyy_is @ vt[:n_components].T
        return cls(
            image=CCASide(sides[0][0], sides[0][1], wx),
            text=CCASide(sides[1][0], sides[1][1], wy),
            correlations=s[:n_components],
        )

    def embed_image(self, x: np.ndarray) -> np.ndarray:
        return self.image.transform(x).astype(np.float32)

    def embed_text(self, y: np.ndarray) -> np.ndarray:
        return self.text.transform(y).astype(np.float32)
