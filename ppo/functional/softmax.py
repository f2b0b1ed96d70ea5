"""Log-probabilities and entropy of a softmax over the vocabulary, chunked so that at most one
chunk of fp32 exists at a time, in forward and backward alike (API.md: never more than one
``[B, T, V]`` fp32 copy)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ppo.functional.masked import _acc, _acc_dtype

# Most elements of one fp32 temporary made from logits; tests shrink both to cover the loop.
# Accelerators: 64 MiB, few kernel launches. CPU: 4 MiB, so that a chunk's temporaries stay in the
# last-level cache and below glibc's mmap threshold (32 MiB): a 64 MiB temporary is a fresh mmap
# that page-faults on every use. W3's log-probs, forward and backward: 170 ms at 2**24, 70 ms at
# 2**20 (82k page faults -> 17k), 115 ms at 2**16 (the Python loop starts to show).
_CHUNK_NUMEL = 1 << 24
_CPU_CHUNK_NUMEL = 1 << 20


def _chunks(logits: Tensor) -> Iterator[tuple]:
    """Index tuples covering the leading dims of a ``[..., V]`` tensor in pieces of at most
    ``_CHUNK_NUMEL`` elements (``_CPU_CHUNK_NUMEL`` on a CPU), but never less than one row.
    Slicing, not reshaping, keeps every piece a view even when the logits are a non-contiguous
    slice of the model output."""
    limit = _CPU_CHUNK_NUMEL if logits.device.type == "cpu" else _CHUNK_NUMEL
    return _index_pieces(tuple(logits.shape), limit)


def _index_pieces(dims: tuple[int, ...], limit: int, prefix: tuple = ()) -> Iterator[tuple]:
    inner = math.prod(dims[1:])
    if len(dims) <= 1:
        yield prefix
    elif inner <= limit:
        step = limit // max(inner, 1)
        yield from (prefix + (slice(s, s + step),) for s in range(0, dims[0], step))
    else:
        for i in range(dims[0]):
            yield from _index_pieces(dims[1:], limit, prefix + (i,))


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    """fp32 (fp64) logits over the temperature: the division happens on the chunk's upcast copy, so
    tempering costs no full-size tensor and no bf16 rounding."""
    z = _acc(logits)
    return z / temperature if temperature != 1.0 else z


def _softmax_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    mx = z.amax(-1, keepdim=True)
    return mx, (z - mx).exp_().sum(-1, keepdim=True).log_()


def _log_softmax(z: Tensor, mx: Tensor, log_sum: Tensor) -> Tensor:
    # (z - max) - log(sum(exp(z - max))) rather than z - logsumexp(z): both terms are small, so no
    # digits are lost when the logits are large. Clamping -inf (vocabulary masked by a logits
    # processor) keeps p * log p at 0 instead of NaN.
    return (z - mx).sub_(log_sum).clamp_min_(torch.finfo(z.dtype).min)


class _LogProbs(torch.autograd.Function):
    """Gathered log-softmax that saves only the (possibly bf16) logits plus [B, T] statistics and
    recomputes the softmax chunk by chunk in backward: no full-size fp32 tensor is ever kept."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        out = logits.new_empty(labels.shape, dtype=_acc_dtype(logits.dtype))
        mx, log_sum = torch.empty_like(out), torch.empty_like(out)
        for idx in _chunks(logits):
            z = _tempered(logits[idx], temperature)
            m, s = _softmax_stats(z)
            out[idx] = ((z.gather(-1, labels[idx].unsqueeze(-1)) - m) - s).squeeze(-1)
            mx[idx], log_sum[idx] = m.squeeze(-1), s.squeeze(-1)
        ctx.save_for_backward(logits, labels, mx, log_sum)
        ctx.temperature = temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, mx, log_sum = ctx.saved_tensors
        out = torch.empty_like(logits)
        for idx in _chunks(logits):
            g = grad[idx].unsqueeze(-1) / ctx.temperature  # d(z/T)/dz = 1/T
            z = _log_softmax(_tempered(logits[idx], ctx.temperature), mx[idx].unsqueeze(-1), log_sum[idx].unsqueeze(-1))
            out[idx] = z.exp_().mul_(-g).scatter_add_(-1, labels[idx].unsqueeze(-1), g)  # g*(onehot-p)/T
        return out, None, None


class _Entropy(torch.autograd.Function):
    """Softmax entropy with the same memory profile as `_LogProbs`; dH/dz_j = -p_j (log p_j + H)."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float) -> Tensor:
        ent = logits.new_empty(logits.shape[:-1], dtype=_acc_dtype(logits.dtype))
        mx, log_sum = torch.empty_like(ent), torch.empty_like(ent)
        ctx.temperature = temperature
        for idx in _chunks(logits):
            z = _tempered(logits[idx], temperature)
            m, s = _softmax_stats(z)
            # -sum(p log p) adds same-sign terms: no cancellation, unlike lse - sum(p z).
            logp = _log_softmax(z, m, s)
            ent[idx] = -(logp.exp() * logp).sum(-1)
            mx[idx], log_sum[idx] = m.squeeze(-1), s.squeeze(-1)
        ctx.save_for_backward(logits, mx, log_sum, ent)
        return ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, mx, log_sum, ent = ctx.saved_tensors
        out = torch.empty_like(logits)
        for idx in _chunks(logits):
            logp = _log_softmax(
                _tempered(logits[idx], ctx.temperature), mx[idx].unsqueeze(-1), log_sum[idx].unsqueeze(-1)
            )
            g = logp.exp() * (logp + ent[idx].unsqueeze(-1))
            out[idx] = g.mul_(-grad[idx].unsqueeze(-1) / ctx.temperature)
        return out, None


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``: ``[B, T, V]``, ``[B, T]`` -> ``[B, T]``.

    Computed as the gathered logit minus a chunked fp32 logsumexp (split as max + log-sum for
    accuracy), so at most one chunk (``_CPU_CHUNK_NUMEL`` / ``_CHUNK_NUMEL`` elements) of fp32 exists at a time, in
    forward and backward alike. Returns fp32 (fp64 for fp64 logits). ``labels`` must be valid
    indices in ``[0, V)``, padding included. First-order differentiable w.r.t. ``logits``.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    return _LogProbs.apply(logits, labels.long(), float(temperature))


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` in nats: ``[..., V]`` -> ``[...]``.

    Chunked like :func:`logprobs_from_logits`; returns fp32 (fp64 for fp64 logits); ``-inf`` logits
    are allowed (they contribute 0). First-order differentiable.
    """
    return _Entropy.apply(logits, float(temperature))
