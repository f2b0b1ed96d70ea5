"""Attention in fp32 under bf16 autocast on a CPU: faster there, and never less exact.

Autocast sends `scaled_dot_product_attention` to its bf16 kernel on a CPU, and torch's CPU kernels
for bf16 attention are slower than for fp32 ones on the same values: measured on an AMD EPYC with
AVX512-BF16 (2 threads, torch 2.13), a decode step's single query over the KV cache at SmolLM2's
shapes takes 3.4 ms in bf16 against 0.55 ms in fp32, and a training forward and backward at W4's
shapes 18.9 ms against 14.1 ms for the fp32 kernel on the upcast values, the casts included. The
matmuls around it stay bf16.

So under CPU autocast, attention takes its bf16 query, keys and values, upcasts them, runs the fp32
kernel with autocast off and rounds the output once to bf16, where the output projection would
round it anyway. The result is the fp32 attention of the same bf16 inputs: at least as close to
the exact value as the bf16 kernel's. Everywhere else (no autocast, a GPU, whose bf16 kernels are
the fast ones) it is the stock call.

It reaches the models three ways, all keyed on the model's attention implementation being `NAME`
(`install`), so that `PPOConfig.fp32_attention=false` turns all three off:
- the models' own forwards (prompt passes, scoring, the update): `NAME` is registered with
  transformers' public `AttentionInterface`/`AttentionMaskInterface`, wrapping its SDPA function;
- `lean_decode`'s steps and `last_layer`'s pruned layer, which call attention themselves (`sdpa`);
- the sampling KV cache (`kv_cache`), held in fp32 so that a decode step does not cast the cache.

Which kernel is faster is a property of the CPU, and it was measured on one without AMX. Where a
CPU has AMX, torch's bf16 attention multiplies its blocks on the tile unit (oneDNN brgemm), which
fp32 cannot use. So `install(model, "auto")` (`PPOConfig.fp32_attention: auto`, the default) times
both kernels once per process at the model's head shapes (`kernel_speedups`: a training forward and
backward, and a decode step over a KV cache; ~0.1 s) and keeps the bf16 kernel only where it is
clearly faster (`BF16_MARGIN`), separately for the forwards and for sampling. A CPU whose bf16
kernel wins the forwards but not the decode steps gets `DECODE_NAME`: the forwards on the stock
kernel, the sampling cache in fp32 and its attention in fp32 (the rollout engine marks its
forwards with `sampling`, so that the prompt pass attends in fp32 too).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
from torch import Tensor
from torch.nn import functional as TF

from ppo.fastpath.gate import fast_path_allowed, max_error, tiny_batch
from ppo.fastpath.timing import best_times

NAME = "ppo_fp32_sdpa"  # the forwards and sampling attend in fp32
DECODE_NAME = "ppo_fp32_decode_sdpa"  # sampling attends in fp32, the forwards on the stock kernel
NAMES = (NAME, DECODE_NAME)
# `auto` keeps the bf16 kernel only where it is at least this much faster: fp32 is the more exact
# of the two, and a margin keeps machine noise from flipping the choice from one run to the next.
BF16_MARGIN = 1.25


def _on_cpu_autocast(query: Tensor) -> bool:
    return query.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def _upcast(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> tuple:
    """The inputs in fp32 (a boolean mask as it is)."""
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    return query.float(), key.float(), value.float(), mask


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, **kwargs) -> Tensor:
    """`scaled_dot_product_attention`, in fp32 under CPU autocast (output in autocast's dtype)."""
    if not _on_cpu_autocast(query):
        return TF.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)
    query, key, value, attn_mask = _upcast(query, key, value, attn_mask)
    with torch.autocast("cpu", enabled=False):
        out = TF.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)
    return out.to(torch.get_autocast_dtype("cpu"))


_SAMPLING = contextvars.ContextVar("fp32_attention_sampling", default=False)


@contextlib.contextmanager
def sampling():
    """Marks a rollout's forwards (the prompt pass, decode steps through the model): under
    `DECODE_NAME` they attend in fp32, over the fp32 KV cache, while other forwards do not."""
    token = _SAMPLING.set(True)
    try:
        yield
    finally:
        _SAMPLING.reset(token)


def _attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention function, on fp32 inputs with autocast off under CPU autocast."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _on_cpu_autocast(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, *_upcast(query, key, value, attention_mask), **kwargs)
    return out.to(torch.get_autocast_dtype("cpu")), weights


def _decode_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """`DECODE_NAME`'s: transformers' SDPA function as it is, in fp32 while sampling (`sampling`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Compiled layers (`compile_layers`) never sample (their calls are cache-free), and the compiler
    # cannot trace a ContextVar: it is read outside compiled code only.
    if not torch.compiler.is_compiling() and _SAMPLING.get():
        return _attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention_forward)
    AttentionInterface.register(DECODE_NAME, _decode_attention_forward)
    for name in NAMES:
        AttentionMaskInterface.register(name, sdpa_mask)


def implementation(model) -> str | None:
    """`model`'s (or a config's) transformers attention implementation: sdpa, NAME, DECODE_NAME, ..."""
    config = getattr(model, "config", model)
    return getattr(config, "_attn_implementation", None)


def sdpa_for(model):
    """The attention function for code that runs a forward's attention itself on `model`'s (or a
    config's) behalf (the pruned last layer): `sdpa` where the model runs `NAME`, else torch's."""
    return sdpa if uses_fp32_attention(model) else TF.scaled_dot_product_attention


def decode_sdpa_for(model):
    """The attention function of `model`'s decode steps (`lean_decode`): `sdpa` where sampling
    attends in fp32 (`NAME`, `DECODE_NAME`), else torch's."""
    return sdpa if decodes_in_fp32(model) else TF.scaled_dot_product_attention


def uses_fp32_attention(model) -> bool:
    """Whether `model` (or the config of one) runs `NAME`: its forwards attend in fp32."""
    return implementation(model) == NAME


def decodes_in_fp32(model) -> bool:
    """Whether `model`'s (or a config's) sampling attends in fp32, over a KV cache held in fp32."""
    return implementation(model) in NAMES


def _head_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a model's attention; a config that does not say
    gets a typical small model's (8, 8, 64): the kernels' ratio is mostly the CPU's."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(heads, int) or heads <= 0:
        return 8, 8, 64
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if isinstance(hidden, int) else 0)
    if not isinstance(kv_heads, int) or heads % kv_heads or not isinstance(head_dim, int) or head_dim <= 0:
        return 8, 8, 64
    return heads, kv_heads, head_dim


@functools.cache
def kernel_speedups(heads: int, kv_heads: int, head_dim: int, rounds: int = 5) -> tuple[float, float]:
    """(bf16 kernel's time / fp32 kernel's time) under CPU bf16 autocast, for a training forward and
    backward (4 rows of 128 positions, keys repeated per query head and a causal mask, as
    transformers calls it on padded rows) and for a decode step (16 rows, one query over a
    128-position cache, grouped heads, as `lean_decode` calls it). The kernels alternate `rounds`
    times and each keeps its best time (`timing.best_times`). Once per process
    and shape; ~0.1 s at SmolLM2's shapes on 2 cores."""
    generator = torch.Generator().manual_seed(0)

    def bf16(*shape, grad: bool = False) -> Tensor:
        return torch.randn(*shape, generator=generator).bfloat16().requires_grad_(grad)

    positions = 128
    q, k, v = (bf16(4, heads, positions, head_dim, grad=True) for _ in range(3))  # keys repeated: `heads` of them
    grad = bf16(4, heads, positions, head_dim)
    causal = torch.ones(positions, positions, dtype=torch.bool).tril()[None, None]
    dq = bf16(16, heads, 1, head_dim)
    dk, dv = (bf16(16, kv_heads, positions, head_dim) for _ in range(2))
    dk32, dv32 = dk.float(), dv.float()  # an fp32 cache holds its keys in fp32 already
    attend = torch.ones(16, 1, 1, positions, dtype=torch.bool)
    gqa = {"enable_gqa": True} if heads != kv_heads else {}

    def train(attention) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention(q, k, v, attn_mask=causal)
        out.backward(grad)

    def decode(attention, keys: Tensor, values: Tensor) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            attention(dq, keys, values, attn_mask=attend, **gqa)

    trials = {
        "train bf16": lambda: train(TF.scaled_dot_product_attention),
        "train fp32": lambda: train(sdpa),
        "decode bf16": lambda: decode(TF.scaled_dot_product_attention, dk, dv),
        "decode fp32": lambda: decode(sdpa, dk32, dv32),
    }
    with torch.inference_mode(False), torch.enable_grad():
        best = best_times(trials, rounds)
    return best["train bf16"] / best["train fp32"], best["decode bf16"] / best["decode fp32"]


def choose(model, mode) -> str | None:
    """The attention implementation `mode` (`PPOConfig.fp32_attention`: True or "auto") gives
    `model` on this machine: `NAME`, `DECODE_NAME`, or None (the stock kernels are faster)."""
    if mode is not True and mode != "auto":
        raise ValueError(f"fp32_attention must be true, false or auto, not {mode!r}")
    if mode is True:
        return NAME
    train, decode = kernel_speedups(*_head_shape(model.config))
    if train * BF16_MARGIN > 1.0:  # the bf16 kernel is not clearly faster for the forwards
        return NAME
    return DECODE_NAME if decode * BF16_MARGIN > 1.0 else None


def install(model, mode=True, agree=None) -> bool:
    """Switch `model` from transformers' SDPA attention to `NAME` (or, with `mode="auto"`, to what
    `choose` finds faster here) where the gate allows it; False (and the model unchanged) otherwise.
    Models on another attention implementation keep it. `agree(name) -> name`, when given, settles
    the choice across processes (each times its own CPU; all must compute alike)."""
    if implementation(model) in NAMES:
        return True
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa" or not fast_path_allowed("fp32_attention", model):
        return False
    name = choose(model, mode)
    if agree is not None:
        name = agree(name)
    if name is None:
        return False
    model.set_attn_implementation(name)
    return True


def architecture_reason(config) -> str | None:
    """Why this model cannot switch (None when it can): for the gate."""
    if not hasattr(torch, "get_autocast_dtype"):
        return "torch has no torch.get_autocast_dtype (older than 2.4)"
    return None


def mismatch_with_stock(twin) -> str | None:
    """The twin's logits under `NAME` and `DECODE_NAME` against its SDPA logits: in fp32 they must
    be the same computation; under bf16 autocast, within bf16's rounding of each other (the gate's
    self-check)."""
    import copy

    _register()
    ids, mask, positions = tiny_batch()
    for name in NAMES:
        switched = copy.deepcopy(twin)
        switched.set_attn_implementation(name)
        with torch.no_grad():
            for autocast, rtol in ((False, 1e-6), (True, 5e-2)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    outputs = [
                        m(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
                        for m in (twin, switched)
                    ]
                error = max_error(outputs[1], outputs[0], rtol=rtol)
                if error is not None:
                    return f"{name}, {'bf16 autocast' if autocast else 'fp32'}: {error}"
    return None


_register()
