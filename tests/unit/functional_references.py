"""Shared by the ppo.functional tests: plain-loop float64 references and input builders.

The references walk rows and positions with Python loops over `.tolist()` data, so they share
no code with the vectorised implementation. bf16 inputs are compared with the reference evaluated
on the bf16-rounded values: the library computes in fp32, so only fp32 rounding remains.
"""

from __future__ import annotations

import math

import torch

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


def flat(loss_stats):
    loss, stats = loss_stats
    return (loss, *[stats[k] for k in sorted(stats)])
