"""The CDPAE losses (method.md, "The comprehensive distance-preserving space").

Batch convention: row r of batch A is object i, row r of batch B is object j,
so every row is one (i, j) pair of *different* objects. Every loss is averaged
over the rows of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Keeps sqrt differentiable where the product of distances is 0 (method.md: eps ~ 1e-5).
TARGET_EPS = 1e-5
# cosine_similarity's own floor for zero vectors.
_COS_EPS = 1e-8


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(a, b) = 1 - cos(a, b), row by row: (n, c), (n, c) -> (n,)."""
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=_COS_EPS)


def target_distance(
    v_i: torch.Tensor, t_i: torch.Tensor, v_j: torch.Tensor, t_j: torch.Tensor
) -> torch.Tensor:
    """D_ij = sqrt(d(v_i, v_j) d(t_i, t_j) + eps), from the clean input spaces."""
    return torch.sqrt(cosine_distance(v_i, v_j) * cosine_distance(t_i, t_j) + TARGET_EPS)


def pairwise_loss(
    h_vi: torch.Tensor, h_ti: torch.Tensor, h_vj: torch.Tensor, h_tj: torch.Tensor
) -> torch.Tensor:
    """L_pair = d(h_vi, h_ti) + d(h_vj, h_tj): one object's image and text coincide."""
    return (cosine_distance(h_vi, h_ti) + cosine_distance(h_vj, h_tj)).mean()


def _distance_gap(
    a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """|d(a1, b1) - D| + |d(a2, b2) - D|, batch-averaged: both distance-preserving losses."""
    gap1 = (cosine_distance(a1, b1) - target).abs()
    gap2 = (cosine_distance(a2, b2) - target).abs()
    return (gap1 + gap2).mean()


def heterogeneous_loss(
    h_vi: torch.Tensor,
    h_ti: torch.Tensor,
    h_vj: torch.Tensor,
    h_tj: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """L_het = |d(h_vi, h_tj) - D_ij| + |d(h_ti, h_vj) - D_ij|: across modalities."""
    return _distance_gap(h_vi, h_tj, h_ti, h_vj, target)


def homogeneous_loss(
    h_vi: torch.Tensor,
    h_ti: torch.Tensor,
    h_vj: torch.Tensor,
    h_tj: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """L_hom = |d(h_vi, h_vj) - D_ij| + |d(h_ti, h_tj) - D_ij|: within a modality."""
    return _distance_gap(h_vi, h_vj, h_ti, h_tj, target)


def reconstruction_loss(
    reconstructions: list[torch.Tensor], targets: list[torch.Tensor]
) -> torch.Tensor:
    """L_rec = sum of Euclidean (not squared) distances to the clean inputs, batch-averaged."""
    return sum(
        torch.linalg.vector_norm(r - t, dim=1).mean()
        for r, t in zip(reconstructions, targets, strict=True)
    )


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    pair: torch.Tensor
    het: torch.Tensor
    hom: torch.Tensor
    rec: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {
            "total": float(self.total.detach()),
            "pair": float(self.pair.detach()),
            "het": float(self.het.detach()),
            "hom": float(self.hom.detach()),
            "rec": float(self.rec.detach()),
        }


def joint_loss(
    pair: torch.Tensor,
    het: torch.Tensor,
    hom: torch.Tensor,
    rec: torch.Tensor,
    w1: float,
    w2: float,
) -> LossTerms:
    """L = L_pair + w1 (L_het + L_hom) + w2 L_rec."""
    total = pair + w1 * (het + hom) + w2 * rec
    return LossTerms(total=total, pair=pair, het=het, hom=hom, rec=rec)
