"""functional.rms_norm: the Llama-family RMS norm keeping only its input and 1/rms for backward,
against the models' own expression under autograd - values, gradients and dtypes, bit for bit, in
every dtype mix a model produces; what it keeps for backward."""

from __future__ import annotations

import pytest
import torch

from ppo.functional.norm import rms_norm

EPS = 1e-6


def stock(x, weight, eps=EPS):
    """How transformers' Llama/Qwen2/Qwen3 RMSNorm computes it."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def inputs(x_dtype=torch.float32, w_dtype=torch.float32, shape=(3, 5, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=g)).to(x_dtype).requires_grad_()
    weight = (1 + torch.randn(shape[-1], generator=g)).to(w_dtype).requires_grad_()
    return x, weight


def out_and_grads(fn, x, weight, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(x, weight, EPS)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return (out, *torch.autograd.grad(out, (x, weight), grad_out))


def test_gradients_match_the_calculus_in_float64():
    """Against the derivative autograd takes of the formula in float64 (the statistics of
    `rms_norm` are fp32 by design, as in the models, so the check is to fp32 rounding)."""
    x, weight = inputs()
    _, grad_x, grad_w = out_and_grads(rms_norm, x, weight)
    x64, w64 = (x.detach().double().requires_grad_(), weight.detach().double().requires_grad_())
    exact = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    grad_out = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1)).double()
    want_x, want_w = torch.autograd.grad(exact, (x64, w64), grad_out)
    torch.testing.assert_close(grad_x.double(), want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), want_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x_dtype, w_dtype, autocast",
    [
        (torch.float32, torch.float32, False),  # an fp32 model
        (torch.float32, torch.float32, True),  # an fp32 model under bf16 autocast: the residual stream stays fp32
        (torch.bfloat16, torch.bfloat16, False),  # a model held in bf16
        (torch.bfloat16, torch.float32, False),  # bf16 activations into an fp32 norm
        (torch.float32, torch.bfloat16, True),  # fp32 activations into a bf16 norm weight
    ],
)
def test_the_same_bits_as_the_models_expression(x_dtype, w_dtype, autocast):
    x, weight = inputs(x_dtype, w_dtype)
    got = out_and_grads(rms_norm, x, weight, autocast)
    want = out_and_grads(stock, x, weight, autocast)
    for a, b, what in zip(got, want, ("output", "grad x", "grad weight")):
        assert a.dtype == b.dtype, what
        assert torch.equal(a, b), what


def test_a_frozen_weight_gets_no_gradient_and_x_still_does():
    x, weight = inputs()
    weight.requires_grad_(False)
    (grad_x,) = torch.autograd.grad(rms_norm(x, weight, EPS).sum(), (x,))
    (want,) = torch.autograd.grad(stock(x, weight).sum(), (x,))
    assert torch.equal(grad_x, want)


def kept_for_backward(fn, x, weight) -> list[tuple[tuple[int, ...], torch.dtype]]:
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, weight, EPS)
    kept.pop(weight.untyped_storage().data_ptr(), None)
    return sorted(kept.values())


def test_keeps_the_input_and_the_inverse_rms_only():
    x, weight = inputs(shape=(4, 8, 16))
    assert kept_for_backward(rms_norm, x, weight) == [((4, 8, 1), torch.float32), ((4, 8, 16), torch.float32)]
    # the models' expression keeps the normalised tensor too: one more [4, 8, 16]
    assert kept_for_backward(stock, x, weight) == [
        ((4, 8, 1), torch.float32),
        ((4, 8, 16), torch.float32),
        ((4, 8, 16), torch.float32),
    ]
