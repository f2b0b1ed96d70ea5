"""fp32 linear layers through oneDNN instead of MKL, on CPUs where MKL leaves AVX-512 unused.

Why: a plain fp32 `nn.Linear` on CPU goes to MKL's sgemm, and MKL takes its AVX-512 kernels only on
Intel CPUs. On an AMD CPU with AVX-512 (Zen 4/5) it runs its AVX2 kernels, about half the speed the
hardware has; oneDNN's fp32 matmul there measured 469 GFLOP/s against MKL's 220 on 2 threads (see
the benchmark notes). Same fp32 arithmetic, another kernel: results differ from MKL's by float
rounding only (the summation order), never by precision.

`fp32_linear_context("onednn")` sends every fp32 CPU `F.linear` inside it (what `nn.Linear` calls)
through oneDNN, forward and backward; anything else passes through untouched.
`PPOConfig.fp32_matmul="auto"` times both kernels at the start of a run and keeps the faster.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.nn import functional as TF

from ppo.fastpath.gate import fast_path_allowed, max_error
from ppo.fastpath.timing import best_times


def onednn_mm(a: Tensor, b_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """a @ b_t.T (+ bias) for 2-D fp32 `a` [M, K] and `b_t` [N, K], by oneDNN (it reads transposed
    views in place: cheaper than making them contiguous first)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = onednn_mm(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_mm(grad_rows, weight.t()).view(x.shape)  # dy @ W
        if ctx.needs_input_grad[1]:
            grad_weight = onednn_mm(grad_rows.t(), x.reshape(-1, x.shape[-1]).t())  # dy.T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


_torch_linear = TF.linear


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, through oneDNN for fp32 CPU tensors outside autocast (there oneDNN already runs
    the bf16 matmuls); anything else goes to torch's own."""
    if (
        type(input) is torch.Tensor
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
        and input.dtype == weight.dtype == torch.float32
        and input.device.type == weight.device.type == "cpu"
        and input.dim() >= 2
        and input.numel() > 0
        and input.layout == torch.strided
        and not torch.is_autocast_enabled("cpu")
    ):
        return _OneDNNLinear.apply(input, weight, bias)
    return _torch_linear(input, weight, bias)


@contextlib.contextmanager
def onednn_linear():
    """Inside: `torch.nn.functional.linear`, which `nn.Linear` calls, is `_linear`. A patch of the
    function rather than a TorchFunctionMode: a mode sees every torch call, and that Python detour on
    each small op cost W1 a fifth of its time; this one is only on the linear layers."""
    saved = TF.linear
    TF.linear = _linear
    try:
        yield
    finally:
        TF.linear = saved


def onednn_speedup(hidden_size: int, tokens: int = 512, rounds: int = 7) -> float:
    """MKL's time over oneDNN's for one training step (forward, input and weight gradients) of a
    `hidden_size` -> 3 x `hidden_size` linear layer on `tokens` rows. The two kernels alternate,
    `rounds` times, and each keeps its best time, so that a moment of machine noise cannot pick the
    slower one. Takes a few tens of milliseconds."""
    h = min(hidden_size, 1024)  # the ratio, not the model: keep the probe cheap
    x = torch.randn(tokens, h, requires_grad=True)
    weight = torch.randn(3 * h, h, requires_grad=True)
    grad = torch.randn(tokens, 3 * h)
    # Forward and backward through what the update would call, the autograd detour included.
    kernels = {
        "mkl": lambda: _torch_linear(x, weight).backward(grad),
        "onednn": lambda: _OneDNNLinear.apply(x, weight, None).backward(grad),
    }
    best = best_times(kernels, rounds)
    return best["mkl"] / best["onednn"]


def resolve_fp32_matmul(choice: str, device: torch.device, hidden_size: int = 512) -> str:
    """'mkl' (torch's default) or 'onednn' for `PPOConfig.fp32_matmul` on this machine. 'auto' times
    both on the model's layer shapes and takes oneDNN only when it is at least 25% faster: on AMD
    CPUs with AVX-512 (MKL runs its AVX2 kernels there, oneDNN measured 2x faster), not on this
    project's AVX2 CI machine, where it is 15-40% slower."""
    if choice not in ("auto", "mkl", "onednn"):
        raise ValueError(f"fp32_matmul must be auto, mkl or onednn, not {choice!r}")
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return "mkl"  # a GPU has its own kernels; a build without oneDNN has no choice
    if choice == "mkl" or (choice == "auto" and onednn_speedup(hidden_size) < 1.25):
        return "mkl"
    return "onednn" if fast_path_allowed("onednn_linear") else "mkl"


def architecture_reason(config) -> str | None:
    """Any model: the kernel swap does not depend on the architecture."""
    return None


def mismatch_with_stock(twin=None) -> str | None:
    """The oneDNN linear's output and its input, weight and bias gradients against torch's own
    `F.linear` (the gate's self-check; `twin` is unused: no model is involved)."""
    with torch.enable_grad():
        x = torch.randn(24, 40, requires_grad=True)
        weight = torch.randn(56, 40, requires_grad=True)
        bias = torch.randn(56, requires_grad=True)
        grad = torch.randn(24, 56)
        results = []
        for linear in (_torch_linear, _OneDNNLinear.apply):
            out = linear(x, weight, bias)
            grads = torch.autograd.grad(out, (x, weight, bias), grad)
            results.append((out.detach(), *grads))
    for fast, stock in zip(results[1], results[0]):
        error = max_error(fast, stock)
        if error is not None:
            return error
    return None


def fp32_linear_context(kernel: str):
    """A fresh context that runs fp32 linear layers on `kernel` ('mkl': no change)."""
    return onednn_linear() if kernel == "onednn" else contextlib.nullcontext()
