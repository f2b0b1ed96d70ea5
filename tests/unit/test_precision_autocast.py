"""RL quantities stay fp32 under bf16 autocast (docs/precision.md): the reward combination, and every
function of `ppo.functional` the trainer calls, computed inside a bf16 autocast region, must equal
the same computation outside it bit for bit. Autocast rounds only the ops on its lists (matmuls,
linear, ...), so the equality fails the day one of these quantities goes through such an op - as
the reward combination did (`per_source @ weights`: a reward of 1/9 became 0.111328125)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import ppo.functional as F
from ppo.rewards import RewardSources

B, T, V = 3, 7, 11


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def both(fn):
    """fn() outside autocast and inside bf16 autocast."""
    plain = fn()
    with bf16_autocast():
        mixed = fn()
    return plain, mixed


def assert_identical(plain, mixed):
    plain = plain if isinstance(plain, (tuple, list)) else (plain,)
    mixed = mixed if isinstance(mixed, (tuple, list)) else (mixed,)
    for a, b in zip(plain, mixed, strict=True):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            assert_identical(list(a.values()), list(b.values()))
            continue
        assert b.dtype == torch.float32, b.dtype
        assert torch.equal(a, b), (a, b)


def thirds(completions, **kwargs):
    return [1 / 3 if i % 2 else 1 / 9 for i in range(len(completions))]


def sevenths(completions, **kwargs):
    return [i / 7 for i in range(len(completions))]


def score(sources, n=4):
    return sources.score(torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long),
                         ["p"] * n, ["c"] * n, [[1]] * n, {})


@pytest.mark.parametrize("precision_context", [contextlib.nullcontext, bf16_autocast])
def test_reward_function_values_reach_the_scores_exactly(precision_context):
    with precision_context():
        scores, means = score(RewardSources(reward_funcs=thirds))
    assert scores.dtype == torch.float32
    # The fp32 value of each Python float, not its bf16 rounding (1/9 -> 0.111328125 in bf16).
    assert scores.tolist() == [float(torch.tensor(v)) for v in (1 / 9, 1 / 3, 1 / 9, 1 / 3)]
    assert means["rewards/thirds"] == pytest.approx(2 / 9, abs=1e-15)


@pytest.mark.parametrize("precision_context", [contextlib.nullcontext, bf16_autocast])
def test_weighted_reward_sources_combine_in_float64_then_round_once(precision_context):
    weights = [0.3, 2.5]
    with precision_context():
        scores, _ = score(RewardSources(reward_funcs=[thirds, sevenths], weights=weights), n=5)
    expected = [0.3 * a + 2.5 * b for a, b in zip(thirds([None] * 5), sevenths([None] * 5))]
    assert scores.dtype == torch.float32
    assert scores.tolist() == [float(torch.tensor(e, dtype=torch.float32)) for e in expected]


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + 0.05 * torch.randn(B, T, generator=g)
    ref = lp + 0.1 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g) / 3
    adv = torch.randn(B, T, generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor([[7], [4], [1]])).float()
    scores = torch.tensor([1 / 9, 1 / 3, -2 / 7])
    return [x.to(dtype) for x in (lp, old, ref, values, adv)] + [mask, scores]


QUANTITIES = {
    "kl_k1": lambda lp, old, ref, v, a, m, s: F.kl_penalty(lp, ref, "k1") * m,
    "kl_k2": lambda lp, old, ref, v, a, m, s: F.kl_penalty(lp, ref, "k2") * m,
    "kl_k3": lambda lp, old, ref, v, a, m, s: F.kl_penalty(lp, ref, "k3") * m,
    "token_rewards": lambda lp, old, ref, v, a, m, s: F.token_level_rewards(s, F.kl_penalty(lp, ref) * m, m, 0.05),
    "whitened_rewards": lambda lp, old, ref, v, a, m, s: F.masked_whiten(F.token_level_rewards(s, F.kl_penalty(lp, ref) * m, m, 0.1), m, shift_mean=False),
    "gae": lambda lp, old, ref, v, a, m, s: F.compute_gae(F.token_level_rewards(s, F.kl_penalty(lp, ref) * m, m, 0.1), v, m, 1.0, 0.95),
    "whitened_advantages": lambda lp, old, ref, v, a, m, s: F.masked_whiten(a, m),
    "masked_mean_var": lambda lp, old, ref, v, a, m, s: (F.masked_mean(a, m), F.masked_var(a, m), F.masked_mean(a, m, dim=1)),
    "policy_loss": lambda lp, old, ref, v, a, m, s: F.clipped_policy_loss(lp, old, a, m, 0.2),
    "policy_loss_tis": lambda lp, old, ref, v, a, m, s: F.clipped_policy_loss(
        lp, old, a, m, 0.2, F.truncated_importance_weights(old, ref, m, 2.0)),
    "value_loss": lambda lp, old, ref, v, a, m, s: F.clipped_value_loss(v, a, ref, m, 0.2),
    "explained_variance": lambda lp, old, ref, v, a, m, s: F.explained_variance(v, a, m),
    "mismatch": lambda lp, old, ref, v, a, m, s: F.mean_abs_diff(lp, old, m),
}


@pytest.mark.parametrize("name", QUANTITIES)
def test_rl_quantities_are_identical_inside_bf16_autocast(name):
    plain, mixed = both(lambda: QUANTITIES[name](*inputs()))
    assert_identical(plain, mixed)


@pytest.mark.parametrize("name", QUANTITIES)
def test_bf16_inputs_give_fp32_results_computed_from_their_exact_values(name):
    """Model outputs that arrive in bf16 are upcast, not computed on in bf16: the result equals the
    fp32 computation on the same (bf16-representable) values."""
    low = inputs(torch.bfloat16)
    upcast = [x.float() for x in low]
    with bf16_autocast():
        mixed = QUANTITIES[name](*low)
    assert_identical(QUANTITIES[name](*upcast), mixed)


def test_loss_gradients_are_identical_inside_bf16_autocast():
    def grads():
        lp, old, ref, v, a, m, _ = inputs()
        lp, v = lp.requires_grad_(), v.requires_grad_()
        pg, _ = F.clipped_policy_loss(lp, old, a, m, 0.2, F.truncated_importance_weights(old, ref, m, 1.5))
        vf, _ = F.clipped_value_loss(v, v.detach() + 0.3 * a, v.detach() + a, m, 0.2)
        (pg + 0.1 * vf).backward()
        return lp.grad, v.grad

    assert_identical(*both(grads))


def test_logprobs_and_entropy_are_an_fp32_log_softmax_of_the_bf16_logits():
    """Under autocast the LM head hands over bf16 logits; the log-softmax runs in fp32 on their
    exact values (so the only rounding left is the model's own)."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, T, V, generator=g) * 4).bfloat16()
    labels = torch.randint(0, V, (B, T), generator=g)
    with bf16_autocast():
        lp = F.logprobs_from_logits(logits, labels, 0.7)
        ent = F.entropy_from_logits(logits, 0.7)
    exact = torch.log_softmax(logits.double() / 0.7, dim=-1)
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, exact.gather(-1, labels[..., None])[..., 0].float(), atol=2e-6, rtol=0)
    torch.testing.assert_close(ent, -(exact.exp() * exact).sum(-1).float(), atol=2e-6, rtol=0)
