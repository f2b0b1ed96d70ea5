"""functional.silu_mul_linear: the gated MLP's tail with two fewer [N, I] tensors kept for backward,
against autograd's own composition - values, gradients, dtypes under bf16 autocast, saved memory."""

from __future__ import annotations

import pytest
import torch

from ppo.functional.mlp import silu_mul_linear


def stock(gate, up, weight, bias=None):
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, weight, bias)


def inputs(dtype=torch.float32, bias=True, shape=(2, 5), inner=12, hidden=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(*shape, inner, generator=g, dtype=dtype, requires_grad=True)
    up = torch.randn(*shape, inner, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(hidden, inner, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(hidden, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return gate, up, weight, b


def grads(fn, args, grad_out_seed=1):
    out = fn(*args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=out.dtype)
    leaves = [a for a in args if a is not None]
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    assert torch.autograd.gradcheck(silu_mul_linear, inputs(torch.float64, bias=bias, shape=(3,), inner=5, hidden=4))


@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_autograd_composition(bias):
    args = inputs(bias=bias)
    out, got = grads(silu_mul_linear, args)
    want_out, want = grads(stock, args)
    assert torch.equal(out, want_out)  # the same ops in the same order: the same bits
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_under_bf16_autocast_it_rounds_like_the_model():
    """As in a model under autocast: gate and up arrive bf16 (outputs of linears), the weight is an
    fp32 parameter. Output bf16 with the same values; gradients in each input's own dtype."""
    gate, up, weight, bias = inputs()
    gate_b, up_b = (gate.detach().bfloat16().requires_grad_(), up.detach().bfloat16().requires_grad_())
    args = (gate_b, up_b, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, got = grads(silu_mul_linear, args)
        want_out, want = grads(stock, args)
    assert out.dtype == want_out.dtype == torch.bfloat16
    assert torch.equal(out, want_out)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def saved_bytes(fn, args) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    params = {a.untyped_storage().data_ptr() for a in args[2:] if a is not None}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_keeps_two_activations_where_autograd_keeps_four():
    args = inputs(bias=False, shape=(4, 64), inner=96, hidden=8)
    one = 4 * 64 * 96 * 4  # one [N, I] fp32 tensor
    assert saved_bytes(stock, args) == 4 * one
    assert saved_bytes(silu_mul_linear, args) == 2 * one


def test_no_grad_keeps_nothing_and_computes_the_same():
    args = inputs()
    with torch.no_grad():
        torch.testing.assert_close(silu_mul_linear(*args), stock(*args), rtol=1e-6, atol=1e-6)
