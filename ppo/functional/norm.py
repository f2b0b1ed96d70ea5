"""RMS normalisation, ``weight * (x / rms(x))``, keeping only ``x`` and ``1 / rms(x)`` for backward.

Why: written out as transformers' Llama-family norms write it, autograd keeps ``x`` (for the
square), the normalised ``x / rms(x)`` (for the weight's product) and, in the next layer, the
output (for its projection's weight gradient): three ``[tokens, hidden]`` tensors per norm, two
norms a layer (Qwen3 adds one per query and key head). Backward here recomputes the normalised
tensor from ``x`` and the saved ``1 / rms`` (one multiplication), so one of the three is not kept.

The arithmetic is autograd's own: the forward is the models' expression, op for op, and the
backward applies the derivatives autograd would (``pow``, ``mean``, ``rsqrt``, the products) in
the same order and dtypes, so a norm on its own gives the stock bits both ways. Inside a model the
input's gradient has a third part, from the residual connection, and autograd adds the three in
another order than ``residual + (direct + through rms)``: the same values to fp32 rounding. The
statistics are taken in fp32 whatever the input's dtype, as the models do.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype)`` over the last
    dimension, with one fewer ``x``-sized tensor kept for backward."""
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (x32 * inv_rms).to(x.dtype)
        ctx.save_for_backward(x, weight, inv_rms)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, inv_rms = ctx.saved_tensors
        need_x, need_weight, _ = ctx.needs_input_grad
        x32 = x.to(torch.float32)
        normed = (x32 * inv_rms).to(x.dtype)
        grad_x = grad_weight = None
        if need_weight:  # d(weight * normed)/d weight, summed over every leading dimension
            leading = tuple(range(grad_out.dim() - weight.dim()))
            grad_weight = (grad_out * normed).sum(leading).to(weight.dtype)
        if need_x:
            grad_normed = (grad_out * weight).to(x.dtype).to(torch.float32)  # through `.to(x.dtype)`
            # d(x32 * inv_rms): the direct term, and the one through inv_rms = (mean(x32**2) + eps)**-0.5
            grad_inv_rms = (grad_normed * x32).sum(-1, keepdim=True)
            grad_mean = -0.5 * grad_inv_rms * inv_rms.pow(3)
            grad_square = grad_mean.expand_as(x32) / x32.shape[-1]
            grad_x = (grad_normed * inv_rms + grad_square * (2.0 * x32)).to(x.dtype)
        return grad_x, grad_weight, None
