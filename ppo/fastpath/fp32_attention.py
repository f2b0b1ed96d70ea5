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
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as TF

from ppo.fastpath.gate import fast_path_allowed, max_error, tiny_batch

NAME = "ppo_fp32_sdpa"


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


def _attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention function, on fp32 inputs with autocast off under CPU autocast."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _on_cpu_autocast(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, *_upcast(query, key, value, attention_mask), **kwargs)
    return out.to(torch.get_autocast_dtype("cpu")), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def sdpa_for(model):
    """The attention function for code that calls attention itself on `model`'s (or a config's)
    behalf: `sdpa` where the model runs `NAME`, else torch's."""
    return sdpa if uses_fp32_attention(model) else TF.scaled_dot_product_attention


def uses_fp32_attention(model) -> bool:
    """Whether `model` (or the config of one) runs `NAME`: then its callers attend in fp32 too."""
    config = getattr(model, "config", model)
    return getattr(config, "_attn_implementation", None) == NAME


def install(model) -> bool:
    """Switch `model` from transformers' SDPA attention to `NAME` where the gate allows it; False
    (and the model unchanged) otherwise. Models on another attention implementation keep it."""
    if uses_fp32_attention(model):
        return True
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa" or not fast_path_allowed("fp32_attention", model):
        return False
    model.set_attn_implementation(NAME)
    return True


def architecture_reason(config) -> str | None:
    """Why this model cannot switch (None when it can): for the gate."""
    if not hasattr(torch, "get_autocast_dtype"):
        return "torch has no torch.get_autocast_dtype (older than 2.4)"
    return None


def mismatch_with_stock(twin) -> str | None:
    """The twin's logits under `NAME` against its SDPA logits: in fp32 they must be the same
    computation; under bf16 autocast, within bf16's rounding of each other (the gate's self-check)."""
    import copy

    _register()
    ids, mask, positions = tiny_batch()
    switched = copy.deepcopy(twin)
    switched.set_attn_implementation(NAME)
    with torch.no_grad():
        for autocast, rtol in ((False, 1e-6), (True, 5e-2)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                outputs = [
                    m(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
                    for m in (twin, switched)
                ]
            error = max_error(outputs[1], outputs[0], rtol=rtol)
            if error is not None:
                return f"{'bf16 autocast' if autocast else 'fp32'}: {error}"
    return None


_register()
