"""Masked statistics over real tokens, and the upcasting every function of `ppo.functional` shares.

Masked-out positions are replaced by 0 with ``torch.where`` before any arithmetic (`_masked`), so no
finite value there, however large, reaches a result or a gradient; 16-bit inputs are computed in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(x: Tensor) -> Tensor:
    return x.to(_acc_dtype(x.dtype)) if x.is_floating_point() else x.float()


def _masked(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Upcast x and zero its masked-out positions; also return the bool mask."""
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match data shape {tuple(x.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(m, _acc(x), 0), m


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over real positions: ``[B, T]`` -> 0-d (``dim=None``) or with ``dim`` removed.

    A slice with no real position gives 0.
    """
    xz, m = _masked(x, mask)
    if dim is None:
        return xz.sum() / m.sum().clamp_min(1)
    return xz.sum(dim) / m.sum(dim).clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all real positions, ``[B, T]`` -> 0-d; Bessel-corrected (n - 1) when
    ``unbiased``. Raises ValueError with fewer than 2 (unbiased) or 1 (biased) real positions;
    checking that reads the count back to the host (one sync).
    """
    xz, m = _masked(x, mask)
    n, need = int(m.sum()), 2 if unbiased else 1
    if n < need:
        raise ValueError(f"masked_var: need at least {need} real positions (unbiased={unbiased}), got {n}")
    mean = xz.sum() / n
    # Two passes (mean, then squared deviations) avoid the E[x^2] - E[x]^2 cancellation.
    sq = torch.where(m, (xz - mean) ** 2, 0).sum()
    return sq / (n - 1 if unbiased else n)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over real positions, ``[B, T]`` -> ``[B, T]``, with the
    unbiased variance; ``shift_mean=False`` adds the mean back. 0 at masked positions. Needs at
    least 2 real positions (see :func:`masked_var`).
    """
    xz, m = _masked(x, mask)
    mean = masked_mean(xz, m)
    scale = torch.rsqrt(masked_var(xz, m, unbiased=True) + 1e-8)
    return torch.where(m, (xz - mean) * scale + (0.0 if shift_mean else mean), 0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over real positions, ``[B, T]`` -> 0-d, with
    biased variances. Returns 0 (not NaN) when ``Var(returns) == 0``, which includes an empty mask
    or a single real token. 1 is a perfect critic, 0 no better than a constant, < 0 worse.
    """
    v, m = _masked(values, mask)
    ret, _ = _masked(returns, m)
    var_ret, var_err = (masked_mean((x - masked_mean(x, m)) ** 2, m) for x in (ret, ret - v))
    ok = var_ret > 0
    return torch.where(ok, 1 - var_err / torch.where(ok, var_ret, 1), 0)
