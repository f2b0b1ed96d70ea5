"""Log-probabilities and entropy straight from the last hidden states and the LM head's weight,
never holding the ``[N, V]`` logits: rows go through the head a chunk at a time, forward and
backward alike (backward recomputes each chunk's logits: one more head matmul for the memory).

Why: the logits are the largest tensor of an update. A Qwen3 vocabulary (151,936) over 8 x 512
response tokens is 2.5 GB in fp32, and autograd keeps it plus a gradient of the same size; here
what is kept is the hidden states (``[N, H]``) and two numbers per row.

The head's product runs in ``compute_dtype`` (bf16 under autocast: the same rounding as the model's
own LM head there, whose logits come out bf16); everything after it in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ppo.functional.masked import _acc_dtype

# Logit elements per chunk. CPU: 4 Mi (16 MiB of fp32, under glibc's 32 MiB mmap threshold, so no
# fresh page faults per chunk); accelerators: 64 Mi, few launches.
_HEAD_CHUNK_NUMEL = 1 << 26
_CPU_HEAD_CHUNK_NUMEL = 1 << 22


def _row_chunks(rows: int, vocab: int, device: torch.device) -> list[slice]:
    limit = _CPU_HEAD_CHUNK_NUMEL if device.type == "cpu" else _HEAD_CHUNK_NUMEL
    step = max(1, limit // max(vocab, 1))
    return [slice(s, s + step) for s in range(0, rows, step)]


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, acc: torch.dtype) -> Tensor:
    """One chunk's tempered logits in `acc` precision; the product in `weight`'s dtype."""
    z = hidden.to(weight.dtype) @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(acc)
    return z / temperature if temperature != 1.0 else z


class _HeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, with_entropy, compute_dtype):
        acc = _acc_dtype(hidden.dtype)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        rows = hidden.shape[0]
        logprobs = torch.empty(rows, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            for idx in _row_chunks(rows, weight.shape[0], hidden.device):
                z = _logits(hidden[idx], w, b, temperature, acc)
                mx = z.amax(-1, keepdim=True)
                log_sum = (z - mx).exp_().sum(-1, keepdim=True).log_()
                logprobs[idx] = (z.gather(-1, labels[idx, None]) - mx - log_sum).squeeze(-1)
                lse[idx] = (mx + log_sum).squeeze(-1)
                if with_entropy:
                    # -sum(p log p): same-sign terms, no cancellation; -inf logits add 0.
                    logp = (z - mx).sub_(log_sum).clamp_min_(torch.finfo(acc).min)
                    entropy[idx] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.with_entropy, ctx.compute_dtype = temperature, with_entropy, compute_dtype
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        acc, temperature = lse.dtype, ctx.temperature
        w = weight.to(ctx.compute_dtype)
        b = bias.to(ctx.compute_dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for idx in _row_chunks(hidden.shape[0], weight.shape[0], hidden.device):
                logp = (_logits(hidden[idx], w, b, temperature, acc) - lse[idx, None]).clamp_min_(torch.finfo(acc).min)
                p = logp.exp()
                # d logp_label / dz = onehot - p;  dH / dz = -p (log p + H);  then d(z/T)/dz = 1/T.
                if grad_logprobs is not None:
                    g_lp = grad_logprobs[idx, None]
                    g = (p * -g_lp).scatter_add_(-1, labels[idx, None], g_lp)
                else:
                    g = torch.zeros_like(p)
                if ctx.with_entropy and grad_entropy is not None:
                    g -= p * (logp + entropy[idx, None]) * grad_entropy[idx, None]
                if temperature != 1.0:
                    g /= temperature
                g_low = g.to(ctx.compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[idx] = (g_low @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (g_low.T @ hidden[idx].to(ctx.compute_dtype)).to(acc)
                if grad_bias is not None:
                    grad_bias += g.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    bias: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` and (when asked) the entropy under ``softmax((hidden @ weight.T +
    bias) / temperature)``: ``hidden [..., H]``, ``weight [V, H]``, ``labels [...]`` -> ``[...]`` each.

    Equal to ``logprobs_from_logits`` / ``entropy_from_logits`` of the head's logits, to the
    rounding of the head's product; first-order differentiable w.r.t. ``hidden``, ``weight`` and
    ``bias``. ``compute_dtype`` (default: ``weight``'s) is the product's precision; the results are
    fp32 (fp64 for fp64 hidden states)."""
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden {tuple(hidden.shape)}")
    lead = labels.shape
    logprobs, entropy = _HeadLogProbs.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1).long(),
        float(temperature),
        bool(with_entropy),
        compute_dtype or weight.dtype,
    )
    return logprobs.view(lead), (entropy.view(lead) if entropy is not None else None)
