"""Tests for ppo.functional against independent plain-loop float64 references.

The references below walk rows and positions with Python loops over `.tolist()` data, so they
share no code with the vectorised implementation. bf16 inputs are compared with the reference
evaluated on the bf16-rounded values: the library computes in fp32, so only fp32 rounding remains.
"""

from __future__ import annotations

import math

import pytest
import torch

import ppo.functional as F

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=1e-5, atol=1e-5)}
LENGTHS = [1, 5, 8, 3, 8, 2]  # includes a length-1 row and fully real rows
T = 8
FILLS = [1e4, -1e4, "random", 1e30, -3e38]


# ----------------------------------------------------------------------------- helpers


def mask_from_lengths(lengths, width, dtype=torch.float32):
    rows = [[1.0 if j < n else 0.0 for j in range(width)] for n in lengths]
    return torch.tensor(rows, dtype=torch.float32).to(dtype)


def rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def fill_masked(x, mask, fill, seed=123):
    """x with every masked-out position replaced by a (large, finite) junk value."""
    m = mask.bool()
    if fill == "random":
        junk = rand(*x.shape, seed=seed, scale=1e4)
    else:
        junk = torch.full(x.shape, float(fill))
    return torch.where(m, x, junk.to(x.dtype))


def close(actual, expected, dtype=torch.float32, **kw):
    tol = dict(TOL[dtype], **kw)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.double(), expected, **tol)


def d64(x):
    return x.double().tolist()


def mask_list(mask):
    return [[bool(v) for v in row] for row in mask.tolist()]


# ----------------------------------------------------------------------------- references


def ref_logsumexp(row):
    mx = max(row)
    return mx + math.log(sum(math.exp(z - mx) for z in row))


def ref_logprobs(logits, labels):
    out = []
    for lrow, yrow in zip(d64(logits), labels.tolist()):
        out.append([zs[y] - ref_logsumexp(zs) for zs, y in zip(lrow, yrow)])
    return out


def ref_entropy_row(zs):
    lse = ref_logsumexp(zs)
    return -sum(math.exp(z - lse) * (z - lse) for z in zs)


def ref_masked_mean_all(x, mask):
    vals = [v for row, mrow in zip(d64(x), mask_list(mask)) for v, k in zip(row, mrow) if k]
    return sum(vals) / len(vals) if vals else 0.0


def ref_real_values(x, mask):
    return [v for row, mrow in zip(d64(x), mask_list(mask)) for v, k in zip(row, mrow) if k]


def ref_var(vals, unbiased):
    n = len(vals)
    mu = sum(vals) / n
    return sum((v - mu) ** 2 for v in vals) / (n - 1 if unbiased else n)


def ref_gae(rewards, values, mask, gamma, lam):
    r, v, m = d64(rewards), d64(values), mask_list(mask)
    adv, ret = [], []
    for rr, vv, mm in zip(r, v, m):
        n = len(rr)
        a = [0.0] * n
        last = 0.0
        for t in range(n - 1, -1, -1):
            if not mm[t]:
                last = 0.0
                continue
            nv = vv[t + 1] if t + 1 < n and mm[t + 1] else 0.0
            na = last if t + 1 < n and mm[t + 1] else 0.0
            delta = rr[t] + gamma * nv - vv[t]
            a[t] = delta + gamma * lam * na
            last = a[t]
        adv.append(a)
        ret.append([a[t] + vv[t] if mm[t] else 0.0 for t in range(n)])
    return adv, ret


def ref_kl(lp, ref, est):
    out = []
    for a, b in zip(lp, ref):
        d = a - b
        out.append({"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[est])
    return out


def ref_policy(lp, old, adv, mask, c):
    losses, clipped, kls, ratios = [], 0, [], []
    for a_row, o_row, A_row, m_row in zip(d64(lp), d64(old), d64(adv), mask_list(mask)):
        for a, o, A, k in zip(a_row, o_row, A_row, m_row):
            if not k:
                continue
            r = math.exp(a - o)
            u, cl = -A * r, -A * min(max(r, 1 - c), 1 + c)
            losses.append(max(u, cl))
            clipped += cl > u
            kls.append(0.5 * (a - o) ** 2)
            ratios.append(r)
    n = len(losses)
    stats = dict(clipfrac=clipped / n, approx_kl=sum(kls) / n, ratio_mean=sum(ratios) / n, ratio_max=max(ratios))
    return sum(losses) / n, stats


def ref_value(v, old, ret, mask, c):
    losses, clipped = [], 0
    for v_row, o_row, r_row, m_row in zip(d64(v), d64(old), d64(ret), mask_list(mask)):
        for a, o, R, k in zip(v_row, o_row, r_row, m_row):
            if not k:
                continue
            vc = o + min(max(a - o, -c), c)
            u, cl = (a - R) ** 2, (vc - R) ** 2
            losses.append(max(u, cl))
            clipped += cl > u
    return 0.5 * sum(losses) / len(losses), clipped / len(losses)


def ref_token_rewards(scores, kl, mask, coef):
    out = []
    for s, k_row, m_row in zip(d64(scores), d64(kl), mask_list(mask)):
        last = max(j for j, k in enumerate(m_row) if k)
        row = [-coef * k if m else 0.0 for k, m in zip(k_row, m_row)]
        row[last] += s
        out.append(row)
    return out


def ref_explained_variance(v, ret, mask):
    vs, rs = ref_real_values(v, mask), ref_real_values(ret, mask)
    var_r = ref_var(rs, unbiased=False)
    var_e = ref_var([r - a for r, a in zip(rs, vs)], unbiased=False)
    return 0.0 if var_r == 0 else 1 - var_e / var_r


def ppo_inputs(dtype, seed=0):
    mask = mask_from_lengths(LENGTHS, T)
    B = len(LENGTHS)
    lp = rand(B, T, seed=seed, scale=0.5) - 1.0
    old = lp + rand(B, T, seed=seed + 1, scale=0.3)
    adv = rand(B, T, seed=seed + 2)
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 7, 11 * 3, 1 << 24])
def test_logprobs_vs_loop_reference(dtype, chunk, monkeypatch):
    monkeypatch.setattr(F, "_CHUNK_NUMEL", chunk)
    logits = rand(3, 5, 11, seed=1, scale=3.0).to(dtype)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    out = F.logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    close(out, ref_logprobs(logits, labels), dtype)


@pytest.mark.parametrize("chunk", [1, 13, 1 << 24])
def test_logprobs_matches_log_softmax_gather_incl_grad(chunk, monkeypatch):
    monkeypatch.setattr(F, "_CHUNK_NUMEL", chunk)
    full = rand(4, 7, 13, seed=3, scale=4.0).requires_grad_()
    logits = full[:, 1:-1]  # non-contiguous slice, as taken from a model output
    labels = torch.randint(0, 13, (4, 5), generator=torch.Generator().manual_seed(4))
    weights = rand(4, 5, seed=5)
    out = F.logprobs_from_logits(logits, labels)
    (out * weights).sum().backward()
    ref_full = full.detach().double().requires_grad_()
    ref = torch.log_softmax(ref_full[:, 1:-1], dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref * weights.double()).sum().backward()
    close(out, ref)
    close(full.grad, ref_full.grad)


def test_logprobs_bf16_grad_and_saved_memory():
    logits = rand(2, 6, 50, seed=6, scale=3.0).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(7))
    saved = {}

    def pack(t):  # keyed by storage: the same tensor saved by two ops costs memory once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = F.logprobs_from_logits(logits, labels)
    # Only the bf16 logits themselves plus [B, T]-sized tensors may be kept for backward: no fp32
    # copy of the logits (which would be 2x the bf16 size on its own).
    assert sum(saved.values()) <= logits.numel() * 2 + 64 * logits.shape[0] * logits.shape[1]
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref_logits = logits.detach().double().requires_grad_()
    torch.log_softmax(ref_logits, -1).gather(-1, labels.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 9 * 2, 1 << 24])
def test_entropy_vs_loop_reference(dtype, chunk, monkeypatch):
    monkeypatch.setattr(F, "_CHUNK_NUMEL", chunk)
    logits = rand(2, 3, 4, 9, seed=8, scale=3.0).to(dtype)  # arbitrary leading dims
    out = F.entropy_from_logits(logits)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4)
    ref = [[[ref_entropy_row(zs) for zs in b] for b in a] for a in d64(logits)]
    close(out, ref, dtype)


def test_entropy_gradient_edge_values_and_1d():
    logits = rand(3, 4, 10, seed=9, scale=2.0).requires_grad_()
    w = rand(3, 4, seed=10)
    (F.entropy_from_logits(logits) * w).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(ref_logits, -1)
    (-(logp.exp() * logp).sum(-1) * w.double()).sum().backward()
    close(logits.grad, ref_logits.grad)
    # uniform -> log V; one-hot-ish with -inf entries -> 0 and no NaN; large offsets are stable
    close(F.entropy_from_logits(torch.zeros(10)), math.log(10))
    masked_vocab = torch.tensor([5.0, float("-inf"), float("-inf")])
    close(F.entropy_from_logits(masked_vocab), 0.0)
    close(F.entropy_from_logits(torch.tensor([1000.0, 1000.0])), math.log(2))


# ----------------------------------------------------------------------------- masked stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bool_mask", [False, True])
def test_masked_mean_vs_reference(dtype, bool_mask):
    x = rand(len(LENGTHS), T, seed=11, scale=3.0).to(dtype)
    mask = mask_from_lengths(LENGTHS, T)
    mask = mask.bool() if bool_mask else mask
    close(F.masked_mean(x, mask), ref_masked_mean_all(x, mask), dtype)
    rows = [sum(v for v, k in zip(r, m) if k) / sum(m) for r, m in zip(d64(x), mask_list(mask))]
    close(F.masked_mean(x, mask, dim=1), rows, dtype)
    cols = []
    for j in range(T):
        vals = [r[j] for r, m in zip(d64(x), mask_list(mask)) if m[j]]
        cols.append(sum(vals) / len(vals))
    close(F.masked_mean(x, mask, dim=0), cols, dtype)
    assert F.masked_mean(x, mask, dim=1).dtype == torch.float32


def test_masked_mean_empty_is_zero():
    x = rand(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    assert F.masked_mean(x, torch.zeros(2, 3)).item() == 0.0
    close(F.masked_mean(x, mask, dim=1), [x[0, 0].item(), 0.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_vs_reference(dtype, unbiased):
    x = (rand(len(LENGTHS), T, seed=12, scale=2.0) + 5.0).to(dtype)
    mask = mask_from_lengths(LENGTHS, T)
    close(F.masked_var(x, mask, unbiased=unbiased), ref_var(ref_real_values(x, mask), unbiased), dtype)


def test_masked_var_needs_two_positions():
    x, mask = rand(2, 3), torch.tensor([[0.0, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="masked_var: need at least 2"):
        F.masked_var(x, mask)
    assert F.masked_var(x, mask, unbiased=False).item() == 0.0
    with pytest.raises(ValueError):
        F.masked_var(x, torch.zeros(2, 3), unbiased=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_vs_reference(dtype, shift_mean):
    x = (rand(len(LENGTHS), T, seed=13, scale=3.0) + 2.0).to(dtype)
    mask = mask_from_lengths(LENGTHS, T)
    vals = ref_real_values(x, mask)
    mu, var = sum(vals) / len(vals), ref_var(vals, unbiased=True)
    ref = [
        [((v - mu) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mu)) if k else 0.0 for v, k in zip(r, m)]
        for r, m in zip(d64(x), mask_list(mask))
    ]
    out = F.masked_whiten(x, mask, shift_mean=shift_mean)
    close(out, ref, dtype)
    assert (out[mask == 0] == 0).all()
    white = ref_real_values(out, mask)
    target_mean = 0.0 if shift_mean else mu
    assert abs(sum(white) / len(white) - target_mean) < 1e-5
    assert abs(ref_var(white, unbiased=True) - 1.0) < 1e-5


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
        "clipped_policy_loss": lambda a, b, c: _flat(F.clipped_policy_loss(a, b, c, mask, 0.2)),
        "clipped_value_loss": lambda a, b, c: _flat(F.clipped_value_loss(a, b, c, mask, 0.2)),
        "token_level_rewards": lambda a, b, c: (F.token_level_rewards(scores, a, mask, 0.1),),
        "explained_variance": lambda a, b, c: (F.explained_variance(a, b, mask),),
    }
    return mask, base, calls


def _flat(loss_stats):
    loss, stats = loss_stats
    return (loss, *[stats[k] for k in sorted(stats)])


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
    assert len(F.__all__) == 13


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
            _flat(F.clipped_policy_loss(lp, old, adv, mask, 0.2)),
            _flat(F.clipped_policy_loss(lp.cuda(), old.cuda(), adv.cuda(), mask.cuda(), 0.2)),
        ),
    ]:
        for c, g in zip(cpu_out, gpu_out):
            assert g.is_cuda
            torch.testing.assert_close(g.cpu(), c)


def test_temperature_inside_equals_dividing_the_logits_first():
    """The temperature applied on each upcast chunk (no full-size copy) is the same maths as dividing
    the logits before: values and gradients."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    upstream = torch.randn(3, 5, dtype=torch.float64)
    for fn in (lambda z, t: F.logprobs_from_logits(z, labels, t), lambda z, t: F.entropy_from_logits(z, t)):
        inside = logits.clone().requires_grad_(True)
        before = logits.clone().requires_grad_(True)
        value_inside, value_before = fn(inside, 0.7), fn(before / 0.7, 1.0)
        torch.testing.assert_close(value_inside, value_before)
        (value_inside * upstream).sum().backward()
        (value_before * upstream).sum().backward()
        torch.testing.assert_close(inside.grad, before.grad)
