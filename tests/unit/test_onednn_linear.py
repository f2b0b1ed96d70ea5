"""fp32 linear layers through oneDNN: the same values and gradients as torch's own kernel, and the
choice `fp32_matmul=auto` makes per CPU."""

from __future__ import annotations

import pytest
import torch

from ppo.fastpath import onednn_linear as onednn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_torchs_linear(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=bias)
    x = torch.randn(3, 7, 48, requires_grad=True)
    upstream = torch.randn(3, 7, 40)

    def run(context):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with context:
            y = layer(x)
        (y * upstream).sum().backward()
        grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])
        return y.detach(), grads, y.grad_fn

    y_ref, grads_ref, fn_ref = run(onednn.fp32_linear_context("mkl"))
    y, grads, fn = run(onednn.fp32_linear_context("onednn"))
    assert "OneDNNLinear" in type(fn).__name__ and "OneDNNLinear" not in type(fn_ref).__name__
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_other_calls_pass_through_untouched():
    layer = torch.nn.Linear(8, 4)
    with onednn.fp32_linear_context("onednn"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(2, 8)).dtype == torch.bfloat16  # autocast keeps its own kernel
        assert layer.double()(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64
        assert torch.mm(torch.ones(2, 3), torch.ones(3, 2)).sum().item() == 12.0
        assert torch.nn.Linear(8, 4)(torch.randn(0, 8)).shape == (0, 4)  # no rows


@pytest.mark.parametrize(("speedup", "expected"), [(2.1, "onednn"), (1.2, "mkl"), (0.7, "mkl")])
def test_auto_takes_onednn_only_where_it_measured_clearly_faster(monkeypatch, speedup, expected):
    monkeypatch.setattr(onednn, "onednn_speedup", lambda hidden_size: speedup)
    cpu = torch.device("cpu")
    assert onednn.resolve_fp32_matmul("auto", cpu) == expected
    assert onednn.resolve_fp32_matmul("mkl", cpu) == "mkl"
    assert onednn.resolve_fp32_matmul("onednn", cpu) == "onednn"
    assert onednn.resolve_fp32_matmul("onednn", torch.device("cuda")) == "mkl"  # GPUs keep their kernels
    with pytest.raises(ValueError, match="fp32_matmul"):
        onednn.resolve_fp32_matmul("fast", cpu)


def test_the_speed_probe_times_both_kernels():
    speedup = onednn.onednn_speedup(64, tokens=32)
    assert 0.0 < speedup < float("inf")
