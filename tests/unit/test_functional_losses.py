"""ppo.functional against independent plain-loop float64 references: the clipped losses, token
rewards, explained variance, invariance to what sits under the mask, and a CUDA smoke test.
"""

from __future__ import annotations

import math

import pytest
import torch
from functional_references import (
    DTYPES,
    FILLS,
    LENGTHS,
    T,
    close,
    fill_masked,
    flat,
    mask_from_lengths,
    ppo_inputs,
    rand,
    ref_explained_variance,
    ref_masked_mean_all,
    ref_policy,
    ref_token_rewards,
    ref_value,
)

import ppo.functional as F

# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [0.1, 0.2])
def test_policy_loss_vs_reference(dtype, clip):
    lp, old, adv, mask = ppo_inputs(dtype)
    loss, stats = F.clipped_policy_loss(lp, old, adv, mask, clip)
    ref_loss, ref_stats = ref_policy(lp, old, adv, mask, clip)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    close(loss, ref_loss, dtype)
    assert 0 < ref_stats["clipfrac"] < 1  # the data exercises both branches
    for k, v in ref_stats.items():
        assert stats[k].dim() == 0 and not stats[k].requires_grad
        close(stats[k], v, dtype)


def test_policy_loss_hand_example():
    # clip 0.2; 4 real tokens + 1 padding position.
    #   t0: r=1.5, A=+1: -A r=-1.5, -A clip(r)=-1.2 -> max -1.2 (clipped branch strictly larger)
    #   t1: r=0.5, A=+1: -0.5 vs -0.8            -> max -0.5 (unclipped)
    #   t2: r=0.5, A=-2:  1.0 vs  1.6            -> max  1.6 (clipped)
    #   t3: r=1.0, A=-1:  1.0 vs  1.0            -> tie, not counted as clipped
    # loss = (-1.2 - 0.5 + 1.6 + 1.0) / 4 = 0.225; clipfrac = 2/4
    # approx_kl = mean(0.5 * log(r)^2) = 0.5 * (ln1.5^2 + 2 ln0.5^2) / 4
    # ratio_mean = (1.5 + 0.5 + 0.5 + 1) / 4 = 0.875; ratio_max = 1.5
    # d loss / d lp = -A r / 4 on unclipped tokens: t1 -> -0.125, t3 -> 0.25; 0 on t0, t2, padding.
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    lp = (old + torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), 0.0, 50.0]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0, 1e4]])
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    loss, stats = F.clipped_policy_loss(lp, old, adv, mask, 0.2)
    close(loss, 0.225)
    close(stats["clipfrac"], 0.5)
    close(stats["approx_kl"], 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    close(stats["ratio_mean"], 0.875)
    close(stats["ratio_max"], 1.5)
    loss.backward()
    close(lp.grad, [[0.0, -0.125, 0.0, 0.25, 0.0]])


def test_policy_loss_ratio_one():
    lp, _, adv, mask = ppo_inputs(torch.float32, seed=3)
    loss, stats = F.clipped_policy_loss(lp, lp.clone(), adv, mask, 0.2)
    close(loss, -ref_masked_mean_all(adv, mask))
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0


def test_policy_loss_gradients():
    lp, old, adv, mask = ppo_inputs(torch.float32, seed=4)
    old = fill_masked(old, mask, 1e4)  # exp(lp - old) would overflow here if it were not masked
    lp = lp.requires_grad_()
    loss, _ = F.clipped_policy_loss(lp, old, adv, mask, 0.1)
    loss.backward()
    grad = lp.grad
    assert torch.isfinite(grad).all()
    n = int(mask.sum())
    n_clipped = 0
    for b in range(len(LENGTHS)):
        for t in range(T):
            g = grad[b, t].item()
            if mask[b, t] == 0:
                assert g == 0.0
                continue
            r = math.exp(lp[b, t].item() - old[b, t].item())
            A = adv[b, t].item()
            u, c = -A * r, -A * min(max(r, 0.9), 1.1)
            if c > u:
                n_clipped += 1
                assert g == 0.0
            else:
                assert abs(g - (-A * r / n)) < 1e-6
    assert n_clipped > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_loss_vs_reference(dtype):
    B = len(LENGTHS)
    mask = mask_from_lengths(LENGTHS, T)
    v, old, ret = (rand(B, T, seed=s).to(dtype) for s in (20, 21, 22))
    loss, stats = F.clipped_value_loss(v, old, ret, mask, 0.3)
    ref_loss, ref_clip = ref_value(v, old, ret, mask, 0.3)
    assert 0 < ref_clip < 1
    close(loss, ref_loss, dtype)
    close(stats["vf_clipfrac"], ref_clip, dtype)
    assert not stats["vf_clipfrac"].requires_grad and stats["vf_clipfrac"].dim() == 0


def test_value_loss_hand_example():
    # clip 0.2 (exactly representable values chosen so no tie is broken by rounding):
    #   t0: old=0, v=0.5, R=1: v_clip=0.2; (v-R)^2=0.25 < (v_clip-R)^2=0.64 -> 0.64 (clipped)
    #   t1: old=0, v=0.5, R=0: v_clip=0.2; 0.25 > 0.04                      -> 0.25
    #   t2: old=1, v=1.125, R=2: within range, both 0.765625                -> tie, not clipped
    # loss = 0.5 * (0.64 + 0.25 + 0.765625) / 3; vf_clipfrac = 1/3
    v = torch.tensor([[0.5, 0.5, 1.125, -1e4]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 1.0, 1e4]])
    ret = torch.tensor([[1.0, 0.0, 2.0, 3e38]])
    loss, stats = F.clipped_value_loss(v, old, ret, torch.tensor([[1.0, 1, 1, 0]]), 0.2)
    close(loss, 0.5 * (0.64 + 0.25 + 0.765625) / 3)
    close(stats["vf_clipfrac"], 1 / 3)
    loss.backward()
    # d/dv of 0.5 * mean: (v - R) / 3 on unclipped tokens, 0 on clipped/padding.
    close(v.grad, [[0.0, 0.5 / 3, (1.125 - 2.0) / 3, 0.0]])


# ----------------------------------------------------------------------------- rewards & EV


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_level_rewards_vs_reference(dtype):
    B = len(LENGTHS)
    mask = mask_from_lengths(LENGTHS, T)
    scores, kl = rand(B, seed=23).to(dtype), rand(B, T, seed=24).to(dtype)
    out = F.token_level_rewards(scores, kl, mask, 0.05)
    close(out, ref_token_rewards(scores, kl, mask, 0.05), dtype)
    assert (out[mask == 0] == 0).all()


def test_token_level_rewards_hand_and_errors():
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1], [1, 0, 1]])  # length 1, full, a hole
    kl = torch.tensor([[1.0, 5, 5], [1, 2, 3], [2, 9, 4]])
    out = F.token_level_rewards(torch.tensor([10.0, 20.0, 30.0]), kl, mask, 0.5)
    assert out.tolist() == [[9.5, 0.0, 0.0], [-0.5, -1.0, 18.5], [-1.0, 0.0, 28.0]]
    with pytest.raises(ValueError, match="at least one real token"):
        F.token_level_rewards(torch.zeros(2), torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 0, 0]]), 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_explained_variance(dtype):
    B = len(LENGTHS)
    mask = mask_from_lengths(LENGTHS, T)
    ret = rand(B, T, seed=25, scale=2.0).to(dtype)
    v = (ret.float() + rand(B, T, seed=26, scale=0.7)).to(dtype)
    ev = F.explained_variance(v, ret, mask)
    assert ev.dim() == 0
    close(ev, ref_explained_variance(v, ret, mask), dtype, atol=1e-5)
    close(F.explained_variance(ret, ret, mask), 1.0)
    const = torch.full((B, T), 3.0)
    assert F.explained_variance(v, const, mask).item() == 0.0  # Var(returns) == 0 -> 0, not NaN
    assert F.explained_variance(v, ret, torch.zeros(B, T)).item() == 0.0


# ----------------------------------------------------------------------------- masking


def _masked_calls(dtype):
    """(name, fn(x_a, x_b, x_c) -> tuple of outputs); inputs are [B, T]; masked outputs zeroed."""
    mask = mask_from_lengths(LENGTHS, T)
    B = len(LENGTHS)
    base = [rand(B, T, seed=30 + i).to(dtype) for i in range(3)]
    scores = rand(B, seed=40).to(dtype)
    calls = {
        "masked_mean": lambda a, b, c: (F.masked_mean(a, mask), F.masked_mean(a, mask, dim=1)),
        "masked_var": lambda a, b, c: (F.masked_var(a, mask), F.masked_var(a, mask, unbiased=False)),
        "masked_whiten": lambda a, b, c: (F.masked_whiten(a, mask), F.masked_whiten(a, mask, False)),
        "compute_gae": lambda a, b, c: F.compute_gae(a, b, mask, 0.99, 0.95),
        "clipped_policy_loss": lambda a, b, c: flat(F.clipped_policy_loss(a, b, c, mask, 0.2)),
        "clipped_value_loss": lambda a, b, c: flat(F.clipped_value_loss(a, b, c, mask, 0.2)),
        "token_level_rewards": lambda a, b, c: (F.token_level_rewards(scores, a, mask, 0.1),),
        "explained_variance": lambda a, b, c: (F.explained_variance(a, b, mask),),
    }
    return mask, base, calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill", FILLS)
def test_masked_positions_never_leak(dtype, fill):
    mask, base, calls = _masked_calls(dtype)
    for name, fn in calls.items():
        clean = [x.clone().requires_grad_() for x in base]
        dirty = [fill_masked(x, mask, fill, seed=50 + i).requires_grad_() for i, x in enumerate(base)]
        out_c, out_d = fn(*clean), fn(*dirty)
        for oc, od in zip(out_c, out_d):
            if oc.shape == mask.shape:
                oc, od = oc[mask.bool()], od[mask.bool()]
            assert torch.equal(oc, od), f"{name} output changed by masked junk ({fill})"
        # gradients too: identical at real positions, exactly zero at masked ones
        sum(o.sum() for o in out_c if o.requires_grad).backward()
        sum(o.sum() for o in out_d if o.requires_grad).backward()
        for xc, xd in zip(clean, dirty):
            if xc.grad is None:
                continue
            assert torch.equal(xc.grad, xd.grad), f"{name} gradient changed by masked junk ({fill})"
            assert (xd.grad[mask == 0] == 0).all()


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_smoke(dtype):
    logits = rand(3, 5, 101, seed=60, scale=3.0).to(dtype)
    labels = torch.randint(0, 101, (3, 5), generator=torch.Generator().manual_seed(61))
    torch.testing.assert_close(
        F.logprobs_from_logits(logits.cuda(), labels.cuda()).cpu(), F.logprobs_from_logits(logits, labels)
    )
    torch.testing.assert_close(F.entropy_from_logits(logits.cuda()).cpu(), F.entropy_from_logits(logits))
    lp, old, adv, mask = ppo_inputs(dtype)
    for cpu_out, gpu_out in [
        (F.compute_gae(lp, adv, mask, 0.99, 0.95), F.compute_gae(lp.cuda(), adv.cuda(), mask.cuda(), 0.99, 0.95)),
        (
            flat(F.clipped_policy_loss(lp, old, adv, mask, 0.2)),
            flat(F.clipped_policy_loss(lp.cuda(), old.cuda(), adv.cuda(), mask.cuda(), 0.2)),
        ),
    ]:
        for c, g in zip(cpu_out, gpu_out):
            assert g.is_cuda
            torch.testing.assert_close(g.cpu(), c)
