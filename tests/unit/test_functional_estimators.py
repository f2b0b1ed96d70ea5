"""The critic-free advantage estimators of ppo.functional (GRPO, Dr. GRPO, RLOO, REINFORCE++'s
returns, the KL loss) against plain-loop float64 references written here: groups walked one by one,
returns summed backwards token by token."""

from __future__ import annotations

import math

import pytest
import torch
from functional_references import DTYPES, FILLS, LENGTHS, T, close, d64, fill_masked, mask_from_lengths, mask_list, rand

import ppo.functional as F

# ----------------------------------------------------------------------------- references


def ref_groups(scores, group_size):
    vals = d64(scores)
    return [vals[i : i + group_size] for i in range(0, len(vals), group_size)]


def ref_std(group):
    mean = sum(group) / len(group)
    return math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))


def ref_grpo(scores, group_size, scale, eps=1e-6):
    out = []
    for group in ref_groups(scores, group_size):
        mean = sum(group) / len(group)
        out += [(x - mean) / (ref_std(group) + eps) if scale else x - mean for x in group]
    return out


def ref_rloo(scores, group_size):
    out = []
    for group in ref_groups(scores, group_size):
        for i, x in enumerate(group):
            others = [y for j, y in enumerate(group) if j != i]
            out.append(x - sum(others) / len(others))
    return out


def ref_returns(rewards, mask, gamma):
    out = []
    for r_row, m_row in zip(d64(rewards), mask_list(mask)):
        row, running = [0.0] * len(r_row), 0.0
        for t in reversed(range(len(r_row))):
            running = r_row[t] + gamma * running if m_row[t] else 0.0  # a hole ends the episode
            row[t] = running
        out.append(row)
    return out


def ref_kl_loss(lp, ref, mask, est):
    terms = []
    for a_row, b_row, m_row in zip(d64(lp), d64(ref), mask_list(mask)):
        for a, b, k in zip(a_row, b_row, m_row):
            if k:
                d = a - b
                terms.append({"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[est])
    return sum(terms) / len(terms)


def group_scores(group_size, n_groups=4, dtype=torch.float32, seed=0):
    return rand(group_size * n_groups, seed=seed).to(dtype)


# ----------------------------------------------------------------------------- GRPO and RLOO


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [2, 3, 5])
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_vs_reference(dtype, group_size, scale):
    scores = group_scores(group_size, dtype=dtype, seed=group_size)
    adv = F.group_advantages(scores, group_size, scale=scale)
    assert adv.shape == scores.shape and adv.dtype == torch.float32
    close(adv, ref_grpo(scores, group_size, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_leave_one_out_vs_reference(dtype, group_size):
    scores = group_scores(group_size, dtype=dtype, seed=10 + group_size)
    adv = F.leave_one_out_advantages(scores, group_size)
    assert adv.dtype == torch.float32
    close(adv, ref_rloo(scores, group_size), dtype)
    # The identity the RLOO papers state: G / (G - 1) times the gap to the group mean.
    close(adv, [group_size / (group_size - 1) * a for a in ref_grpo(scores, group_size, scale=False)], dtype)


def test_group_advantages_see_only_their_own_group():
    scores, G = group_scores(3, seed=4), 3
    shifted = scores.clone()
    shifted[3:6] += 100.0  # one group moved: its own centred advantages do not change, nor any other group's
    for fn in (lambda s: F.group_advantages(s, G), lambda s: F.group_advantages(s, G, scale=False),
               lambda s: F.leave_one_out_advantages(s, G)):
        torch.testing.assert_close(fn(shifted), fn(scores), rtol=0, atol=2e-5)


def test_a_group_of_equal_rewards_has_zero_advantage_not_nan():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 1.0])
    for adv in (F.group_advantages(scores, 3), F.group_advantages(scores, 3, scale=False), F.leave_one_out_advantages(scores, 3)):
        assert torch.isfinite(adv).all()
        assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert F.group_advantages(scores, 3)[3:].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-5)


@pytest.mark.parametrize("fn", [F.group_advantages, F.leave_one_out_advantages, F.group_reward_stats])
def test_groups_of_one_and_ragged_groups_are_rejected(fn):
    with pytest.raises(ValueError, match="at least 2 samples"):
        fn(torch.ones(4), 1)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        fn(torch.ones(4), 3)
    with pytest.raises(ValueError, match=r"need scores \[B\]"):
        fn(torch.ones(2, 2), 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_reward_stats_vs_reference(dtype):
    scores = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 3.0, 2.0, 2.0, 2.0, -1.0, 4.0, 0.25]).to(dtype)
    stats = F.group_reward_stats(scores, 3)
    groups = ref_groups(scores, 3)
    close(stats["reward_std"], sum(ref_std(g) for g in groups) / len(groups), dtype)
    assert stats["zero_std_fraction"].item() == 0.5  # groups 1 and 3 of 4


# ----------------------------------------------------------------------------- per-token pieces


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_to_tokens_fills_real_tokens_only(dtype):
    mask = mask_from_lengths(LENGTHS, T)
    adv = rand(len(LENGTHS), seed=3).to(dtype)
    out = F.sequence_to_tokens(adv, mask)
    assert out.dtype == torch.float32
    expected = [[a if k else 0.0 for k in m_row] for a, m_row in zip(d64(adv), mask_list(mask))]
    close(out, expected, dtype)
    with pytest.raises(ValueError, match="need advantages"):
        F.sequence_to_tokens(adv[:-1], mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.5])
def test_discounted_returns_vs_reference(dtype, gamma):
    mask = mask_from_lengths(LENGTHS, T)
    rewards = rand(len(LENGTHS), T, seed=21).to(dtype)
    returns = F.discounted_returns(rewards, mask, gamma)
    assert returns.dtype == torch.float32
    close(returns, ref_returns(rewards, mask, gamma), dtype)


def test_discounted_returns_with_holes_restart_after_each():
    mask = torch.tensor([[1.0, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 1]])
    rewards = rand(2, 6, seed=22)
    close(F.discounted_returns(rewards, mask, 0.9), ref_returns(rewards, mask, 0.9))


@pytest.mark.parametrize("fill", FILLS)
def test_masked_positions_never_matter(fill):
    mask = mask_from_lengths(LENGTHS, T)
    rewards = rand(len(LENGTHS), T, seed=23)
    want = F.discounted_returns(rewards, mask, 0.95)
    got = F.discounted_returns(fill_masked(rewards, mask, fill), mask, 0.95)
    assert torch.equal(got, want)
    adv = rand(len(LENGTHS), seed=5)
    assert torch.equal(F.sequence_to_tokens(adv, mask), F.sequence_to_tokens(adv, mask.bool()))


# ----------------------------------------------------------------------------- KL in the loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_vs_reference(dtype, estimator):
    mask = mask_from_lengths(LENGTHS, T)
    lp, ref = (rand(len(LENGTHS), T, seed=s, scale=0.5).to(dtype) for s in (31, 32))
    loss = F.kl_loss(lp, ref, mask, estimator)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    close(loss, ref_kl_loss(lp, ref, mask, estimator), dtype)


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_masked_positions_change_neither_value_nor_gradient(fill, estimator):
    mask = mask_from_lengths(LENGTHS, T)
    lp, ref = rand(len(LENGTHS), T, seed=33), rand(len(LENGTHS), T, seed=34)
    clean = lp.clone().requires_grad_(True)
    dirty = fill_masked(lp, mask, fill).requires_grad_(True)
    want = F.kl_loss(clean, ref, mask, estimator)
    got = F.kl_loss(dirty, fill_masked(ref, mask, fill, seed=7), mask, estimator)
    assert torch.equal(got, want)
    want.backward()
    got.backward()
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[mask == 0] == 0).all()
    assert torch.equal(dirty.grad, clean.grad)


def test_k2_and_k3_kl_loss_gradients_are_the_hand_derived_ones():
    # d/dlp of 0.5 d^2 is d; of exp(-d) - 1 + d it is 1 - exp(-d); each over the n real tokens.
    mask = mask_from_lengths([2, 1], 2)
    lp = torch.tensor([[0.3, -0.2], [0.5, 9.0]], requires_grad=True)
    ref = torch.tensor([[0.1, 0.4], [-0.5, 0.0]])
    d = (lp - ref).detach()
    for est, grad in (("k2", d / 3), ("k3", (1 - torch.exp(-d)) / 3)):
        lp.grad = None
        F.kl_loss(lp, ref, mask, est).backward()
        torch.testing.assert_close(lp.grad, grad * mask, rtol=1e-6, atol=1e-7)
