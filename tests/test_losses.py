"""The CDPAE losses against values computed by hand on tiny vectors."""

import math

import pytest
import torch

from training.losses import (
    TARGET_EPS,
    cosine_distance,
    heterogeneous_loss,
    homogeneous_loss,
    joint_loss,
    pairwise_loss,
    reconstruction_loss,
    target_distance,
)

# Unit-free 2-d vectors with easy angles: e1, e2, (e1 + e2) and -e1.
E1 = [1.0, 0.0]
E2 = [0.0, 1.0]
DIAG = [1.0, 1.0]
NEG = [-1.0, 0.0]


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_cosine_distance_known_angles():
    d = cosine_distance(t(E1, E1, E1, E1), t(E1, E2, NEG, DIAG))
    expected = [0.0, 1.0, 2.0, 1.0 - 1.0 / math.sqrt(2.0)]
    assert d.tolist() == pytest.approx(expected)
    # scale-free: 3 * e1 vs e1 is still distance 0
    assert float(cosine_distance(t([3.0, 0.0]), t(E1))[0]) == pytest.approx(0.0)


def test_target_distance_is_sqrt_of_product_plus_eps():
    # d(v_i, v_j) = 1 (orthogonal), d(t_i, t_j) = 2 (opposite) -> sqrt(2 + eps)
    got = target_distance(t(E1), t(E1), t(E2), t(NEG))
    assert float(got[0]) == pytest.approx(math.sqrt(2.0 + TARGET_EPS))
    # identical objects: sqrt(0 * anything + eps)
    same = target_distance(t(E1), t(E2), t(E1), t(DIAG))
    assert float(same[0]) == pytest.approx(math.sqrt(TARGET_EPS))


def test_pairwise_loss_batch_average():
    # row 0: d(h_vi, h_ti) = 0, d(h_vj, h_tj) = 1 ; row 1: 1 + 2
    h_vi, h_ti = t(E1, E1), t(E1, E2)
    h_vj, h_tj = t(E1, E1), t(E2, NEG)
    assert float(pairwise_loss(h_vi, h_ti, h_vj, h_tj)) == pytest.approx((1.0 + 3.0) / 2)


def test_heterogeneous_and_homogeneous_losses():
    h_vi, h_ti, h_vj, h_tj = t(E1), t(E2), t(NEG), t(DIAG)
    target = torch.tensor([0.5], dtype=torch.float64)
    c = 1.0 / math.sqrt(2.0)
    # het: |d(vi, tj) - D| + |d(ti, vj) - D| = |(1 - c) - .5| + |1 - .5|
    het = abs(1 - c - 0.5) + abs(1.0 - 0.5)
    assert float(heterogeneous_loss(h_vi, h_ti, h_vj, h_tj, target)) == pytest.approx(het)
    # hom: |d(vi, vj) - D| + |d(ti, tj) - D| = |2 - .5| + |(1 - c) - .5|
    hom = abs(2.0 - 0.5) + abs(1 - c - 0.5)
    assert float(homogeneous_loss(h_vi, h_ti, h_vj, h_tj, target)) == pytest.approx(hom)


def test_reconstruction_is_euclidean_not_squared():
    # distances 5 (3-4-5) and 0, then 1 and 1: means 2.5 and 1.0
    recon = [t([3.0, 4.0], [1.0, 1.0]), t([0.0, 1.0], [2.0, 0.0])]
    targets = [t([0.0, 0.0], [1.0, 1.0]), t([0.0, 0.0], [1.0, 0.0])]
    assert float(reconstruction_loss(recon, targets)) == pytest.approx(2.5 + 1.0)


def test_joint_loss_weights():
    one = torch.tensor(1.0)
    terms = joint_loss(one, 2 * one, 3 * one, 100 * one, w1=0.3, w2=0.001)
    assert float(terms.total) == pytest.approx(1.0 + 0.3 * 5.0 + 0.1)
    assert terms.as_floats()["rec"] == pytest.approx(100.0)


def test_losses_have_gradients():
    h = torch.tensor([[0.3, -0.2], [0.1, 0.9]], requires_grad=True)
    loss = pairwise_loss(h, h.flip(0), h, h.flip(0))
    loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
