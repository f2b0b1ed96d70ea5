"""One decode step of a Llama-family decoder (Qwen3, Qwen2, Llama) without transformers' per-layer
machinery, for sampling long responses on a CPU.

Why: a decode step feeds one token per row, so every projection is a matmul with only B rows, and
the step is short enough that the model's generic forward (keyword plumbing, mask building, cache
bookkeeping, a module call per norm) takes a third of it. And on the CPU BLAS a B-row
`x @ W.T` runs at about two thirds of the speed of the same product computed as `W @ x.T` (the
weight as the left operand: its kernels are built for many rows there). So the step keeps the
activations transposed, `[features, B]`, from the embedding to the LM head, and calls the weights of
the model's own modules directly: the same parameters, so the sampler never holds a stale copy.

It covers the decode steps only: the prompt goes through the model's own forward, which fills the
preallocated KV cache (`ppo.fastpath.kv_cache`) that the steps then extend. The maths is the
model's; the results agree with its forward to float rounding (tested), not bit for bit, because
the matmuls sum in another order. Anything this does not know how to run exactly (adapters, sharded
or quantised weights, sliding windows, other architectures) is left to the model's forward:
`unsupported_reason` says why. It runs only where `ppo.fastpath.gate` allows it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as TF

from ppo.fastpath import fp32_attention
from ppo.fastpath.compat import cache_kwargs
from ppo.fastpath.gate import fast_path_allowed, max_error, tiny_batch
from ppo.fastpath.kv_cache import preallocated_cache

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")


def _plain_linear(module) -> bool:
    """An nn.Linear itself (not a LoRA or quantised wrapper) with ordinary dense tensors."""
    return (
        type(module) is torch.nn.Linear
        and type(module.weight.data) is torch.Tensor
        and (module.bias is None or type(module.bias.data) is torch.Tensor)
    )


def architecture_reason(config) -> str | None:
    """Why this architecture cannot take the lean step (None when it can): for the gate."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (lean decoding knows {', '.join(SUPPORTED_MODEL_TYPES)})"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    return None


def unsupported_reason(model) -> str | None:
    """Why `model` cannot take the lean step (None when it can): its architecture, then this
    instance (adapters, quantised or sharded weights)."""
    reason = architecture_reason(getattr(model, "config", None))
    if reason is not None:
        return reason
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if (
        body is None
        or head is None
        or not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
    ):
        return f"{type(model).__name__} is not shaped like a *ForCausalLM (model.layers, lm_head)"
    if type(body.embed_tokens) is not torch.nn.Embedding or not _plain_linear(head):
        return "the embedding or LM head is wrapped (adapter, quantisation or sharding)"
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(m is not None and _plain_linear(m) for m in linears):
            return "a projection is not a plain nn.Linear (adapter, quantisation or sharding)"
    return None


def lean_decoder_for(model) -> LeanDecoder | None:
    """A `LeanDecoder` for `model` when the gate allows lean decoding for its architecture and this
    instance can take it; None: decode with the model's own forward."""
    if architecture_reason(getattr(model, "config", None)) is None and unsupported_reason(model) is not None:
        return None  # this instance (an adapter, quantised weights): the model's forward, no warning
    if not fast_path_allowed("lean_decode", model):
        return None
    return LeanDecoder(model)


def mismatch_with_stock(twin) -> str | None:
    """One lean decode step against the model's own forward over the whole sequence (the gate's
    self-check), on a left-padded batch whose prompt went through the model into the cache."""
    ids, mask, positions = tiny_batch()
    width = ids.shape[1]
    with torch.no_grad():
        stock = twin(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        cache = preallocated_cache(twin.config, width)
        if cache is None:
            return "the preallocated KV cache it decodes into does not fit this architecture"
        twin(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=True,
            **cache_kwargs(twin, cache),
        )
        keys, values = map(list, zip(*(layer.buffers() for layer in cache.layers)))
        attend = mask.bool()[:, None, None, :]
        fast = LeanDecoder(twin).step(ids[:, -1], positions[:, -1], keys, values, width - 1, attend)
    return max_error(fast, stock)


def _linear(module: torch.nn.Linear, columns: Tensor) -> Tensor:
    """`module(x)` for x given transposed, `[in, B]` -> `[out, B]`."""
    if module.bias is None:
        return torch.mm(module.weight, columns)
    return torch.addmm(module.bias[:, None], module.weight, columns)


def _rms_norm(norm, columns: Tensor, dim: int) -> Tensor:
    """The model's RMSNorm (fp32 statistics, weight applied in the input's dtype) along `dim`."""
    x = columns.float()
    x = x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + norm.variance_epsilon)
    shape = [1] * columns.dim()
    shape[dim] = -1
    return norm.weight.view(shape) * x.to(columns.dtype)


def _rotate(heads: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of `[heads, D, B]` with cos/sin `[D, B]` (rotate-half convention)."""
    half = heads.shape[1] // 2
    rotated = torch.cat((-heads[:, half:], heads[:, :half]), dim=1)
    return heads * cos + rotated * sin


class LeanDecoder:
    """Decode steps for one model whose `unsupported_reason` is None."""

    def __init__(self, model) -> None:
        self.model = model
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.attention = fp32_attention.decode_sdpa_for(model)

    def step(
        self, tokens: Tensor, positions: Tensor, keys: list[Tensor], values: list[Tensor], length: int, attend: Tensor
    ) -> Tensor:
        """Logits `[B, V]` after feeding `tokens` `[B]` at `positions` `[B]`.

        `keys[i]`/`values[i]` are layer i's cache buffers `[B, kv_heads, capacity, D]` holding
        `length` positions; this step writes position `length`. `attend` `[B, 1, 1, length + 1]`
        is True where a row may attend (False at its left padding).
        """
        body = self.model.model
        batch, dim = tokens.shape[0], self.head_dim
        rows = body.embed_tokens(tokens)  # [B, H]
        cos, sin = body.rotary_emb(rows[:, None], positions[:, None])  # [B, 1, D]
        cos, sin = cos[:, 0].t(), sin[:, 0].t()  # [D, B]
        hidden = rows.t()  # [H, B]
        for i, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, hidden, 0)
            q = _linear(attn.q_proj, x).view(self.heads, dim, batch)
            k = _linear(attn.k_proj, x).view(self.kv_heads, dim, batch)
            v = _linear(attn.v_proj, x).view(self.kv_heads, dim, batch)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key
                q, k = _rms_norm(attn.q_norm, q, 1), _rms_norm(attn.k_norm, k, 1)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys[i][:, :, length] = k.permute(2, 0, 1)
            values[i][:, :, length] = v.permute(2, 0, 1)
            out = self.attention(
                q.permute(2, 0, 1).contiguous()[:, :, None],  # [B, heads, 1, D]; contiguous, or SDPA copies the cache
                keys[i][:, :, : length + 1],
                values[i][:, :, : length + 1],
                attn_mask=attend,
                scale=attn.scaling,
                enable_gqa=self.heads != self.kv_heads,
            )
            hidden = hidden + _linear(attn.o_proj, out.reshape(batch, self.heads * dim).t())
            x = _rms_norm(layer.post_attention_layernorm, hidden, 0)
            mlp = layer.mlp
            hidden = hidden + _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))
        hidden = _rms_norm(body.norm, hidden, 0)
        # Rows again for the LM head: its [V, B] output would need a strided copy to [B, V] that
        # costs more than the row-layout matmul loses.
        return TF.linear(hidden.t(), self.model.lm_head.weight, self.model.lm_head.bias)
