"""Decoder layers compiled one at a time with `torch.compile` (`PPOConfig.compile_layers`).

Why: around the matmuls a decoder layer runs a tail of small ops (norms, rotary, the gated
activation, residual adds, casts under autocast), each a pass over memory and a Python dispatch.
Where matmuls are fast (bf16 on AMX CPUs and GPUs) that tail is most of a layer's time; the
compiler fuses it. One layer at a time, not the whole model: every layer of every model of one
architecture shares one compiled graph (the weights are its inputs), so compiling costs one layer's
worth per grad mode and mask kind, and shapes may vary (`dynamic=True`) without recompiling.

Which calls: scoring's and the update's forwards (and their backward). Calls that carry a KV cache
(sampling's prompt pass) run the layer's own forward: the cache object is Python state the
compiler would guard on and recompile for. Sampling's decode steps are `lean_decode`'s or the
model's own and are not compiled. A layer whose `forward` someone else replaced for a block of
calls (`last_layer.last_layer_rows`) runs that replacement.

`auto` (the default) compiles where it was measured to pay (docs/performance.md): bf16 autocast
on a CPU with AMX, whose bf16 matmuls are ~5x its fp32 ones so the tail is most of the time, and
decoder layers of at least `MIN_LAYER_PARAMETERS`. There, on 2 cores, W2's iteration went from
10.4 to 6.9 s after ~18 s of compiling and SmolLM2-135M's from 54.5 to 48.4 s after ~39 s: won
back within a few iterations. Not in fp32 (no faster: the time is the matmuls'), not on
AVX512-BF16 without AMX (W2 no faster), not on tiny models (W1: 0.2 s/iter, ~75 iterations to win back
the compiling; W3 slower), not with LoRA adapters (SmolLM2-135M, r=4, 16 x 48 tokens: 11.4 -> 10.7
s/step after ~48 s of compiling) and not on GPUs (not measured). Torch's own C++
compiler must be present on CPU; if compiling fails, one `FastPathWarning` says so and the layers
run uncompiled.
"""

from __future__ import annotations

import warnings

import torch

from ppo.fastpath.compat import layer_cache
from ppo.fastpath.gate import FastPathWarning
from ppo.host_cpu import cpu_flags

MIN_LAYER_PARAMETERS = 10_000_000  # the decoder layers' parameters from which auto compiles

_failed: list[str] = []  # why compiling failed in this process (then every layer runs uncompiled)
_compiled: dict[type, object] = {}  # layer class -> its compiled forward: one graph cache per class


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder stack of a transformers model (through PEFT and DDP wrappers): the first
    `ModuleList` whose members are all of one class; None when there is none."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            return module
    return None


def worth_compiling(mode, model: torch.nn.Module, precision: str, device: torch.device, adapters: bool = False) -> bool:
    """`PPOConfig.compile_layers` resolved: true and false as given; auto compiles under bf16 on a
    CPU with AMX when `model`'s decoder layers hold >= MIN_LAYER_PARAMETERS and are trained whole,
    not through LoRA `adapters` (see the docstring)."""
    if mode != "auto":
        return bool(mode)
    if precision != "bf16" or device.type != "cpu" or "amx_bf16" not in cpu_flags() or adapters:
        return False
    layers = decoder_layers(model)
    return layers is not None and sum(p.numel() for p in layers.parameters()) >= MIN_LAYER_PARAMETERS


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Route `model`'s decoder layers' cache-free calls through one compiled graph per layer class;
    returns how many layers now do. Idempotent; the weights and the state dict are unchanged."""
    layers = decoder_layers(model)
    if layers is None:
        return 0
    layer_class = type(layers[0])
    compiled = _compiled.setdefault(layer_class, torch.compile(layer_class.forward, dynamic=True))
    count = 0
    for layer in layers:
        if "forward" not in vars(layer):
            layer.forward = _CompiledForward(layer, compiled)
        count += isinstance(vars(layer)["forward"], _CompiledForward)
    return count


def uncompile_decoder_layers(model: torch.nn.Module) -> None:
    """Back to the layers' own forward (saving a model never needs this: the state dict is unchanged)."""
    for layer in decoder_layers(model) or ():
        if isinstance(vars(layer).get("forward"), _CompiledForward):
            del layer.forward


class _CompiledForward:
    """A layer's `forward`: the compiled graph for cache-free calls, the layer's own otherwise."""

    runs_the_layers_own_forward = True  # so last_layer.last_layer_rows may stand in for it in its block

    def __init__(self, layer: torch.nn.Module, compiled):
        self.layer, self.layer_class, self.compiled = layer, type(layer), compiled

    def __call__(self, *args, **kwargs):
        if _failed or layer_cache(kwargs) is not None:
            return self.layer_class.forward(self.layer, *args, **kwargs)
        try:
            return self.compiled(self.layer, *args, **kwargs)
        except Exception as error:  # the compiler's failure, not the model's: it reruns uncompiled
            if not _is_compiler_error(error):
                raise
            _failed.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            warnings.warn(
                f"ppo-rlhf: compile_layers is off: torch.compile failed ({_failed[0]}). The layers run "
                "uncompiled (same maths, the usual speed).",
                FastPathWarning,
                stacklevel=2,
            )
            return self.layer_class.forward(self.layer, *args, **kwargs)


def _is_compiler_error(error: Exception) -> bool:
    """Raised by dynamo or inductor (a missing C++ compiler, an op it cannot trace), not by the model."""
    return (type(error).__module__ or "").startswith(("torch._dynamo", "torch._inductor"))
