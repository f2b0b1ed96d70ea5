"""The last decoder layer run only at the positions someone reads.

Why: scoring and the update read a causal LM at a few columns only: the LM head at the states before
each response token, the critic's head at the same states (a reward model at the last token). In
every layer but the last, all positions matter, because later positions attend to their keys and
values. In the last layer nothing reads the other positions' outputs, so their queries, attention,
output projection and MLP are wasted: with prompts as long as responses that is half the last
layer, forward and backward (W1: ~10% of the update's matmuls, W2: ~5%).

`last_layer_rows(model, columns)` makes the model's last decoder layer, for the calls inside it,
compute keys and values at every position (its queries attend to all of them) but queries and
everything after them at `columns` only; the other positions return the layer's input unchanged.
Those positions are wrong, so only code that reads `columns` alone may call the model meanwhile.
The maths at `columns` is the layer's own (its modules, its rotary cos/sin, its mask); results
agree with the full layer to float rounding, not bit for bit (tested).

It covers Llama-family layers (Qwen3, Qwen2, Llama) with the sdpa or eager attention and no sliding
window, and runs only where `ppo.fastpath.gate` allows it (tested versions, a known architecture,
a self-check against the whole layer on a tiny twin). It steps aside (runs the whole layer) under
gradient checkpointing, whose recomputation in backward would run outside the `with` block, and for
calls it does not know how to prune (a KV cache, a mask that is not 4-D, no rotary cos/sin passed in).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
from torch import Tensor

from ppo.fastpath import fp32_attention
from ppo.fastpath.compat import layer_cache
from ppo.fastpath.gate import fast_path_allowed, max_error, tiny_batch

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")

# On unless a caller turns it off (`PPOConfig.prune_last_layer`), for the calls in its block.
_ENABLED = contextvars.ContextVar("prune_last_layer", default=True)


@contextlib.contextmanager
def pruning(enabled: bool):
    """Within the block, `last_layer_rows` prunes (True) or always runs the whole layer (False)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _backbone(model):
    """The decoder stack inside a *ForCausalLM / *ForSequenceClassification / bare *Model, through
    PEFT and DDP wrappers; None when there is none of the expected shape."""
    for module in model.modules():
        if all(hasattr(module, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")):
            return module
    return None


def architecture_reason(config) -> str | None:
    """Why this architecture cannot be pruned (None when it can): for the gate."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (it knows {', '.join(SUPPORTED_MODEL_TYPES)})"
    known = ("sdpa", "eager", *fp32_attention.NAMES)
    if getattr(config, "_attn_implementation", "sdpa") not in known:
        return f"attention implementation {config._attn_implementation!r} (it knows {', '.join(known)})"
    if getattr(config, "use_sliding_window", False) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or ()
    ):
        return "sliding-window layers"
    return None


def _prunable_last_layer(model):
    """The last decoder layer when `last_layer_rows` may run it, else None."""
    body = _backbone(model)
    if body is None:
        fast_path_allowed("prune_last_layer", model)  # an architecture it does not know: say so once
        return None
    if len(body.layers) == 0:
        return None
    layer = body.layers[-1]
    # The flag on the stack and on the layer itself (not a walk over every module: this runs on every
    # forward); transformers sets both, whichever spelling enabled checkpointing.
    if any(getattr(m, "gradient_checkpointing", False) is True for m in (body, layer)):
        return None
    if not all(hasattr(layer, a) for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")):
        return None
    # Someone else's per-instance forward (accelerate's offload hooks): leave it be. compile_layers'
    # forward is only a faster route to the layer's own, and it is put back after the block.
    own = vars(layer).get("forward")
    if own is not None and not getattr(own, "runs_the_layers_own_forward", False):
        return None
    if not fast_path_allowed("prune_last_layer", body):
        return None
    return layer


def mismatch_with_stock(twin) -> str | None:
    """The pruned last layer against the whole one on `twin` (the gate's self-check): the final
    hidden states at a few columns of a left-padded batch."""
    body = _backbone(twin)
    ids, mask, positions = tiny_batch()
    columns = torch.tensor([4, 6, 9])
    with torch.no_grad():
        stock = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        with _pruned(body.layers[-1], columns):
            fast = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    return max_error(fast[:, columns], stock[:, columns])


@contextlib.contextmanager
def last_layer_rows(model, columns: Tensor):
    """Within the block, `model`'s last decoder layer computes only the positions `columns`
    (a sorted 1-D index tensor, the same for every row of the batch). A no-op inside
    `pruning(False)` or when the model is not one this knows (see the module docstring)."""
    layer = _prunable_last_layer(model) if _ENABLED.get() else None
    if layer is None:
        yield
        return
    with _pruned(layer, columns):
        yield


@contextlib.contextmanager
def _pruned(layer, columns: Tensor):
    previous = vars(layer).get("forward")  # compile_layers' forward, when it is on
    layer.forward = functools.partial(_forward_at, layer, columns)
    try:
        yield
    finally:
        if previous is None:
            del layer.forward  # back to the class's forward
        else:
            layer.forward = previous


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _query_mask(attention_mask: Tensor | None, columns: Tensor, width: int) -> Tensor:
    """The mask rows of the kept queries: `[B or 1, 1, K, T]`, bool or additive float."""
    if attention_mask is None:  # no padding: plain causal
        keys = torch.arange(width, device=columns.device)
        return (keys[None, :] <= columns[:, None])[None, None]
    return attention_mask[:, :, columns] if attention_mask.shape[2] == width else attention_mask


def _forward_at(layer, columns: Tensor, hidden_states: Tensor, attention_mask=None, position_embeddings=None, **kwargs):
    """The layer's forward at `columns` only; the other positions pass through unchanged."""
    caching = layer_cache(kwargs) is not None and kwargs.get("use_cache")
    if position_embeddings is None or caching or (attention_mask is not None and attention_mask.dim() != 4):
        # A call this does not know how to prune (another transformers version, a cache, a 2-D
        # mask): the whole layer, as if the block were not there.
        return type(layer).forward(
            layer, hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
        )
    attn = layer.self_attn
    batch, width, _ = hidden_states.shape
    dim = attn.head_dim
    x = layer.input_layernorm(hidden_states)
    q = attn.q_proj(x[:, columns]).view(batch, len(columns), -1, dim)
    k = attn.k_proj(x).view(batch, width, -1, dim)
    v = attn.v_proj(x).view(batch, width, -1, dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings  # [B, T, D]
    cos_q, sin_q = cos[:, columns].unsqueeze(1), sin[:, columns].unsqueeze(1)
    q = q * cos_q + _rotate_half(q) * sin_q
    k = k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)
    out = fp32_attention.sdpa_for(attn.config)(
        q,
        k,
        v,
        attn_mask=_query_mask(attention_mask, columns, width),
        dropout_p=attn.attention_dropout if attn.training else 0.0,
        scale=attn.scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    kept = hidden_states[:, columns] + attn.o_proj(out.transpose(1, 2).reshape(batch, len(columns), -1))
    kept = kept + layer.mlp(layer.post_attention_layernorm(kept))
    # The whole layer's output has the residual sum's dtype at every position; so does this one.
    return hidden_states.to(kept.dtype).index_copy(1, columns, kept)
