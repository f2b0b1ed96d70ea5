"""The tail of a gated MLP, ``down(silu(gate) * up)``, keeping only ``gate`` and ``up`` for backward.

Why: autograd keeps four ``[N, I]`` tensors of it per layer (``gate`` for the SiLU, ``silu(gate)``
and ``up`` for the product, the product for the down projection's weight gradient), the largest
activations of a Llama-family layer (I is ~3x the hidden size). Backward here recomputes
``silu(gate) * up`` (two elementwise passes) and keeps the two inputs only: two fewer per layer.

The arithmetic is autograd's own: the same ops in the same dtypes, forward and backward. Under
autocast the product and the down projection run in the autocast dtype, as they would in the model
(the weight is cast once and that copy kept, as autocast's own linear keeps it); the weight's and
bias's gradients come back in their own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def silu_mul_linear(gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(silu(gate) * up, weight, bias)``: ``gate``, ``up`` ``[..., I]``, ``weight``
    ``[H, I]`` -> ``[..., H]``, with two fewer ``[..., I]`` tensors kept for backward."""
    return _SiluMulLinear.apply(gate, up, weight, bias)


def _compute_dtype(reference: Tensor, weight: Tensor) -> torch.dtype:
    device = reference.device.type
    if torch.is_autocast_enabled(device) and weight.is_floating_point():
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _SiluMulLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        dtype = _compute_dtype(gate, weight)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(gate.device.type, enabled=False):
            product = (torch.nn.functional.silu(gate) * up).to(dtype)
            out = torch.nn.functional.linear(product, w, b)
        ctx.save_for_backward(gate, up, w)
        ctx.product_dtype = dtype
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gate, up, w = ctx.saved_tensors
        need_gate, need_up, need_weight, need_bias = ctx.needs_input_grad
        weight_dtype, bias_dtype = ctx.param_dtypes
        grad_out = grad_out.to(w.dtype)
        silu = torch.nn.functional.silu(gate)
        grad_product = grad_out @ w  # [..., I]
        grad_weight = grad_bias = grad_gate = grad_up = None
        if need_weight:
            product = (silu * up).to(ctx.product_dtype)
            grad_weight = (grad_out.flatten(0, -2).T @ product.flatten(0, -2)).to(weight_dtype)
        if need_bias:
            grad_bias = grad_out.flatten(0, -2).sum(0).to(bias_dtype)
        grad_product = grad_product.to(torch.promote_types(silu.dtype, up.dtype))
        if need_up:
            grad_up = (grad_product * silu).to(up.dtype)
        if need_gate:
            grad_gate = torch.ops.aten.silu_backward(grad_product * up, gate).to(gate.dtype)
        return grad_gate, grad_up, grad_weight, grad_bias
