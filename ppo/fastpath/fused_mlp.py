"""The trained models' MLPs keep two fewer activations for backward (`PPOConfig.fused_mlp`).

A Llama-family MLP is `down_proj(silu(gate_proj(x)) * up_proj(x))`. Autograd keeps four
`[tokens, intermediate]` tensors of it per layer; `functional.silu_mul_linear` keeps `gate` and
`up` only and recomputes the product in backward, with autograd's own ops (the same bits, fp32 and
bf16 autocast alike). On SmolLM2-135M at W4's update (8 x 128 tokens, 30 layers) that is 354 MiB
of the 1,393 MiB a policy forward keeps for backward.

It reads how these models write their MLP (Qwen3, Qwen2, Llama with `hidden_act: silu`), so it runs
only where `ppo.fastpath.gate` allows it. Each MLP's forward is replaced on the instance (weights
and state dict untouched); the replacement calls the stock forward when no gradient is being
recorded, when the down projection is not a plain `nn.Linear` (a LoRA adapter on it), under
`torch.compile` (compiled layers fuse by themselves) and under torchrun, where FSDP2's parameter
handling must see the module's own forward.
"""

from __future__ import annotations

import torch

from ppo.fastpath.gate import one_process, patched_twin_mismatch, replace_forwards
from ppo.functional.mlp import silu_mul_linear

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
_SILU = ("SiLU", "SiLUActivation")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def architecture_reason(config) -> str | None:
    """Why this architecture's MLP is not `down(silu(gate(x)) * up(x))` as far as this knows."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (it knows {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act!r} (it fuses silu)"
    return None


def gated_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` shaped like a Llama-family MLP."""
    return [
        module
        for module in model.modules()
        if all(isinstance(getattr(module, name, None), torch.nn.Module) for name in _PROJECTIONS)
        and type(getattr(module, "act_fn", None)).__name__ in _SILU
    ]


def install(model: torch.nn.Module) -> int:
    """Give every gated MLP of `model` the fused forward; returns how many (0 where the gate says no)."""
    return replace_forwards("fused_mlp", model, gated_mlps(model), _fused_forward)


def _steps_aside(mlp) -> bool:
    return (
        not torch.is_grad_enabled()
        or type(mlp.down_proj) is not torch.nn.Linear
        or torch.compiler.is_compiling()
        or not one_process()
    )


def _fused_forward(self, x):
    if _steps_aside(self):
        return type(self).forward(self, x)
    down = self.down_proj
    return silu_mul_linear(self.gate_proj(x), self.up_proj(x), down.weight, down.bias)


def mismatch_with_stock(twin) -> str | None:
    """Logits and every parameter's gradient of the twin, fused against stock (fp32)."""
    return patched_twin_mismatch(twin, gated_mlps, _fused_forward)
