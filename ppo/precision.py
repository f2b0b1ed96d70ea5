"""Precision: which one a run uses, and the contexts its forwards run in.

`precision=auto` is bf16 autocast where bf16 matmuls are fast (CUDA with bf16, CPUs with
AVX512-BF16/AMX) and fp32 elsewhere; in fp32 the CPU's linear-layer kernel may be oneDNN
(`ppo.fastpath.onednn_linear`). What stays fp32 under autocast: docs/precision.md.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ppo.fastpath.onednn_linear import fp32_linear_context
from ppo.host_cpu import cpu_flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where it is fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_bf16():
        warnings.warn(
            "precision=bf16 on a CPU without AVX512-BF16/AMX: bf16 matmuls are emulated and can be "
            "10x slower than fp32 here; precision=auto picks the fast one",
            stacklevel=2,
        )
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
    return "bf16" if "AVX512" in capability and _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


def autocast_context(precision: str, device: torch.device, fp32_kernel: str = "mkl"):
    """A fresh context for the resolved precision: bf16 autocast, or in fp32 the linear-layer kernel
    (`ppo.fastpath.onednn_linear`; 'mkl' is torch's default: no context)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return fp32_linear_context(fp32_kernel)


@contextlib.contextmanager
def grad_free():
    """No autograd, for sampling and scoring; enter it inside the autocast context.

    Outside autocast it is inference mode. Under autocast it is no_grad: autocast keeps the bf16
    copy it casts of a weight that requires grad (the policy's, the critic's) until its context
    ends, but in inference mode it keeps none, and every forward - every decode step of sampling -
    casts every weight again (docs/precision.md). The frozen models' weights are held in bf16
    instead (`ppo.fastpath.bf16_weights`)."""
    autocasting = any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))
    with torch.no_grad() if autocasting else torch.inference_mode():
        yield
