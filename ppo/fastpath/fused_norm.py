"""The trained models' RMS norms keep one fewer activation for backward (`PPOConfig.fused_norm`).

A Llama-family norm is `weight * (x * rsqrt(mean(x**2) + eps))`. Autograd keeps `x` and the
normalised `x` of it, and the next projection keeps the output: three `[tokens, hidden]` tensors a
norm, two norms a layer (Qwen3 also norms each query and key head). `functional.rms_norm` keeps
`x` and the `[tokens, 1]` inverse RMS and recomputes the normalised tensor in backward, with
autograd's own ops: the same forward bits, and gradients equal to fp32 rounding (the residual
stream's gradient adds its parts in another order), in fp32, bf16 weights and bf16 autocast alike.
On SmolLM2-135M at W4's update (8 x 128 tokens, 30 layers) a policy forward keeps 903 MiB for
backward instead of 1,039 (with `fused_mlp`; 1,393 with neither).

It reads how these models write their norm (Qwen3, Qwen2, Llama), so it runs only where
`ppo.fastpath.gate` allows it. Each norm's forward is replaced on the instance (weights and state
dict untouched); the replacement calls the stock forward when no gradient is being recorded (there
is nothing to keep), under `torch.compile` (compiled layers fuse by themselves) and under
torchrun, where FSDP2's parameter handling must see the module's own forward.
"""

from __future__ import annotations

import torch

from ppo.fastpath.gate import one_process, patched_twin_mismatch, replace_forwards
from ppo.functional.norm import rms_norm

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")


def architecture_reason(config) -> str | None:
    """Why this architecture's norm is not `weight * x / rms(x)` as far as this knows."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (it knows {', '.join(SUPPORTED_MODEL_TYPES)})"
    return None


def rms_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` shaped like a Llama-family RMS norm (a weight and `variance_epsilon`)."""
    return [
        module
        for module in model.modules()
        if type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    ]


def install(model: torch.nn.Module) -> int:
    """Give every RMS norm of `model` the fused forward; returns how many (0 where the gate says no)."""
    return replace_forwards("fused_norm", model, rms_norms(model), _fused_forward)


def _fused_forward(self, x):
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or not one_process():
        return type(self).forward(self, x)
    return rms_norm(x, self.weight, self.variance_epsilon)


def mismatch_with_stock(twin) -> str | None:
    """Logits and every parameter's gradient of the twin, fused against stock (fp32)."""
    return patched_twin_mismatch(twin, rms_norms, _fused_forward)
