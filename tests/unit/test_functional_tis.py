"""Truncated importance sampling and the mismatch measure of ppo.functional against plain loops."""

from __future__ import annotations

import math

import pytest
import torch

import ppo.functional as F


def case():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.1, -4.0, 7.0, 9.0]])
    rollout = torch.tensor([[-1.2, -1.0, -0.5, -1.0], [-0.3, -3.9, -50.0, 1e4]])  # row 1: padding holds junk
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    return old, rollout, mask


def test_truncated_importance_weights_by_hand():
    old, rollout, mask = case()
    w = F.truncated_importance_weights(old, rollout, mask, cap=1.1)
    expected = [[min(math.exp(0.2), 1.1), math.exp(-1.0), 1.0, math.exp(-2.0)],
                [min(math.exp(0.2), 1.1), math.exp(-0.1), 0.0, 0.0]]
    torch.testing.assert_close(w, torch.tensor(expected), atol=1e-7, rtol=1e-6)
    assert not w.requires_grad


def test_mean_abs_diff_by_hand():
    old, rollout, mask = case()
    expected = (0.2 + 1.0 + 0.0 + 2.0 + 0.2 + 0.1) / 6
    assert F.mean_abs_diff(old, rollout, mask).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_policy_loss_is_the_plain_loop_with_each_term_weighted():
    g = torch.Generator().manual_seed(0)
    lp, old, adv = (torch.randn(3, 5, generator=g) for _ in range(3))
    weights = torch.rand(3, 5, generator=g) * 2
    mask = (torch.arange(5)[None, :] < torch.tensor([[5], [2], [3]])).float()
    loss, _ = F.clipped_policy_loss(lp, old, adv, mask, 0.2, weights)
    terms = []
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                ratio = math.exp(lp[b, t] - old[b, t])
                a = float(adv[b, t])
                terms.append(float(weights[b, t]) * max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    unweighted, _ = F.clipped_policy_loss(lp, old, adv, mask, 0.2, torch.ones(3, 5))
    assert torch.equal(unweighted, F.clipped_policy_loss(lp, old, adv, mask, 0.2)[0])
