"""ppo.functional against independent plain-loop float64 references: GAE, the KL estimators and
the KL controllers.
"""

from __future__ import annotations

import math

import pytest
import torch
from functional_references import (
    DTYPES,
    LENGTHS,
    T,
    close,
    d64,
    mask_from_lengths,
    rand,
    ref_gae,
    ref_kl,
)

import ppo.functional as F

# ----------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_vs_reference(dtype, gamma, lam):
    B = len(LENGTHS)
    rewards = rand(B, T, seed=14).to(dtype)
    values = rand(B, T, seed=15).to(dtype)
    mask = mask_from_lengths(LENGTHS, T)
    adv, ret = F.compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    assert adv.shape == ret.shape == (B, T) and adv.dtype == torch.float32
    close(adv, ref_adv, dtype)
    close(ret, ref_ret, dtype)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_mask_with_holes():
    # Not right padding: a masked position inside a row ends the episode there; the next real
    # token starts a new one. Masked outputs must still be exactly 0.
    mask = torch.tensor([[1.0, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 1]])
    rewards, values = rand(2, 6, seed=27), rand(2, 6, seed=28)
    adv, ret = F.compute_gae(rewards, values, mask, 0.9, 0.8)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, 0.9, 0.8)
    close(adv, ref_adv)
    close(ret, ref_ret)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_lambda_one_is_reward_to_go_minus_value():
    rewards, values = rand(len(LENGTHS), T, seed=16), rand(len(LENGTHS), T, seed=17)
    mask = mask_from_lengths(LENGTHS, T)
    adv, ret = F.compute_gae(rewards, values, mask, 1.0, 1.0)
    for b, n in enumerate(LENGTHS):
        r = rewards[b].double().tolist()
        for t in range(n):
            to_go = sum(r[t:n])
            assert abs(adv[b, t].item() - (to_go - values[b, t].item())) < 1e-5
            assert abs(ret[b, t].item() - to_go) < 1e-5


def test_gae_hand_example():
    # One row of 2 real tokens, gamma=0.5, lam=0.5; padding holds junk.
    # A_1 = r1 - V1 = 2 - 1 = 1;  A_0 = (r0 + 0.5*V1 - V0) + 0.25*A_1 = (1 + 0.5 - 3) + 0.25 = -1.25
    rewards, values = torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[3.0, 1.0, 7.0]])
    adv, ret = F.compute_gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), 0.5, 0.5)
    assert adv.tolist() == [[-1.25, 1.0, 0.0]] and ret.tolist() == [[1.75, 2.0, 0.0]]


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    lp, ref = torch.tensor([0.0, -1.0, -2.0]), torch.tensor([0.0, -2.0, -1.0])
    # d = lp - ref = [0, 1, -1]
    close(F.kl_penalty(lp, ref, "k1"), [0.0, 1.0, -1.0])
    close(F.kl_penalty(lp, ref), [0.0, 1.0, -1.0])
    close(F.kl_penalty(lp, ref, "k2"), [0.0, 0.5, 0.5])
    close(F.kl_penalty(lp, ref, "k3"), [0.0, math.exp(-1), math.e - 2])  # exp(-d) - 1 + d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_vs_reference_and_k3_nonnegative(dtype, est):
    lp, ref = rand(4, 6, seed=18, scale=2.0).to(dtype), rand(4, 6, seed=19, scale=2.0).to(dtype)
    out = F.kl_penalty(lp, ref, est)
    expected = [ref_kl(a, b, est) for a, b in zip(d64(lp), d64(ref))]
    close(out, expected, dtype, rtol=2e-6 if dtype == torch.float32 else 1e-5)
    if est == "k3":
        tiny = torch.tensor([0.0, 1e-7, -1e-7, 1e-3, -30.0, 30.0])
        assert (F.kl_penalty(tiny, torch.zeros(6), "k3") >= 0).all()
        assert (out >= 0).all()


def test_kl_bad_estimator():
    with pytest.raises(ValueError, match=r"'abs'.*k1, k2, k3"):
        F.kl_penalty(torch.zeros(2), torch.zeros(2), "abs")


# ----------------------------------------------------------------------------- controllers


def test_adaptive_kl_controller_sequence():
    ctl = F.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.value == 0.1
    expected = 0.1
    # kl=3 -> err=-0.5, clipped to -0.2
    ctl.update(3.0, 256)
    expected *= 1 - 0.2 * 256 / 10000
    assert ctl.value == pytest.approx(expected, rel=1e-12) and expected == pytest.approx(0.099488)
    # kl=6.6 -> err=+0.1 (inside the clip)
    ctl.update(6.6, 512)
    expected *= 1 + 0.1 * 512 / 10000
    assert ctl.value == pytest.approx(expected, rel=1e-12)
    # kl=100 -> err clipped to +0.2; accepts a 0-d tensor
    ctl.update(torch.tensor(100.0), 1000)
    expected *= 1 + 0.2 * 1000 / 10000
    assert ctl.value == pytest.approx(expected, rel=1e-12)
    # kl == target -> unchanged
    ctl.update(torch.tensor(6.0), 100)
    assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert ctl.value == pytest.approx(0.1 * 0.99488 * 1.00512 * 1.02, rel=1e-12)

    state = ctl.state_dict()
    assert all(type(v) is float for v in state.values())
    fresh = F.AdaptiveKLController(0.5, target=6.0, horizon=10000)
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value and fresh.state_dict() == state
    with pytest.raises(ValueError):
        ctl.update(float("nan"), 10)


def test_fixed_kl_controller():
    ctl = F.FixedKLController(0.05)
    for kl in (0.0, 100.0, torch.tensor(3.0)):
        ctl.update(kl, 256)
        assert ctl.value == 0.05
    state = ctl.state_dict()
    assert state == {"value": 0.05}
    other = F.FixedKLController(1.0)
    other.load_state_dict(state)
    assert other.value == 0.05


def test_all_exports():
    for name in F.__all__:
        assert hasattr(F, name)
    # API.md section 1 fixes these names; the module may add beside them.
    api = {"logprobs_from_logits", "entropy_from_logits", "masked_mean", "masked_var", "masked_whiten", "compute_gae",
           "kl_penalty", "clipped_policy_loss", "clipped_value_loss", "FixedKLController", "AdaptiveKLController"}
    assert api <= set(F.__all__)
    assert len(F.__all__) == len(set(F.__all__))
