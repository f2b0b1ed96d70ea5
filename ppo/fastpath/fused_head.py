"""Response log-probs and entropy from the decoder's last hidden states, through the LM head's
weight a chunk of rows at a time (`functional.head_logprobs`), instead of the model's logits.

Why: the stock forward returns the `[B, R, V]` logits, which autograd keeps for backward along with
a gradient of the same size: the largest tensors of an update (a 151k vocabulary over 8 x 512
response tokens: 2.5 GB each in fp32). Here only `[B, R, H]` hidden states are kept; backward
recomputes each chunk's logits (one more head product).

It reads how a causal LM makes its logits (`lm_head(norm(decoder(...)))`, no scaling or soft-capping
after the head), so it covers Qwen3, Qwen2 and Llama with a plain `nn.Linear` head, and runs only
where `ppo.fastpath.gate` allows it (tested versions, a known architecture, a self-check against the
model's own logits on a tiny twin). It steps aside (the caller uses the model's logits) for a LoRA
adapter on the head, and under torchrun, where DDP and FSDP2 must see the model's own forward.

SFT's cross-entropy takes the same route (`token_logprobs`, `SFTConfig.fused_lm_head`): there the
model's logits would cover every position, prompt and padding too, and only the completion
tokens' states need the head.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from ppo.fastpath.compat import innermost_model
from ppo.fastpath.gate import fast_path_allowed, max_error, tiny_batch
from ppo.fastpath.last_layer import last_layer_rows
from ppo.functional.head import head_logprobs
from ppo.functional.softmax import entropy_from_logits, logprobs_from_logits

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")

# `PPOConfig.fused_lm_head` for the calls in a `fusing` block: True, False or "auto".
_MODE = contextvars.ContextVar("fused_lm_head", default="auto")

# auto fuses a pass whose logits would hold more elements than this (512 MiB in fp32). Below it the
# logits cost less memory than they save time: on SmolLM2-135M (49k vocabulary), 8 x 64 response
# tokens (100 MiB of logits), fusing made a forward and backward ~8% slower and its peak RSS no
# lower (the fp32 gradient of the head's weight, 113 MiB, is as large as the logits it replaces).
AUTO_MIN_LOGITS = 1 << 27


@contextlib.contextmanager
def fusing(mode: bool | str):
    """Within the block, `response_logprobs` fuses (True), steps aside (False) or decides by size ("auto")."""
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def architecture_reason(config) -> str | None:
    """Why this architecture's logits are not `lm_head(hidden)` as far as this knows (None: they are)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (it knows {', '.join(SUPPORTED_MODEL_TYPES)})"
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None) not in (None, 1.0):
            return f"{key}={getattr(config, key)} scales the logits after the head"
    return None


def _vocab(model) -> int:
    config = getattr(innermost_model(model), "config", None)
    return int(getattr(config, "vocab_size", 0) or 0)


def _parts(model):
    """(decoder, head) of a plain causal LM through PEFT wrappers; None when this cannot fuse it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return None  # DDP's and FSDP2's hooks run in the wrapped model's forward
    inner = innermost_model(model)
    decoder, head = getattr(inner, "model", None), getattr(inner, "lm_head", None)
    if decoder is None or type(head) is not torch.nn.Linear or not hasattr(decoder, "embed_tokens"):
        return None
    return decoder, head


def response_logprobs(model, input_ids, attention_mask, position_ids, columns, temperature, with_entropy):
    """Log-probs `[B, R]` of the tokens after `columns`, entropy `[B, R]` or None, and the final
    hidden states at `columns` `[B, R, H]`; None when it steps aside (then use the model's logits)."""
    mode = _MODE.get()
    if mode is False or (mode == "auto" and len(columns) * input_ids.shape[0] * _vocab(model) <= AUTO_MIN_LOGITS):
        return None
    parts = _parts(model)
    if parts is None or not fast_path_allowed("fused_lm_head", parts[0]):
        return None
    return _fused(model, *parts, input_ids, attention_mask, position_ids, columns, temperature, with_entropy)


def _hidden_at(model, decoder, input_ids, attention_mask, position_ids, columns):
    """The final hidden states at `columns`, `[B, C, H]` (the last layer computes only those)."""
    with last_layer_rows(model, columns):  # nothing else is read
        return decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, columns]


def _compute_dtype(hidden, head) -> torch.dtype:
    """The head product's precision: autocast's where it is on (as the model's own head), else the weight's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype


def _fused(model, decoder, head, input_ids, attention_mask, position_ids, columns, temperature, with_entropy):
    hidden = _hidden_at(model, decoder, input_ids, attention_mask, position_ids, columns)
    logprobs, entropy = head_logprobs(
        hidden,
        head.weight,
        input_ids[:, columns + 1],
        temperature,
        with_entropy,
        bias=head.bias,
        compute_dtype=_compute_dtype(hidden, head),
    )
    return logprobs, entropy, hidden


def token_logprobs(model, input_ids, attention_mask, position_ids, next_tokens):
    """Log-probs `[N]` of `next_tokens` `[B, T]` (the token each state predicts; -100: none) at the
    N states that have one, in row-major order; None when it steps aside (then use the model's
    logits). For SFT: only the completion tokens' states go through the head and the last layer's
    MLP, where the model's logits cover every position, prompt and padding included."""
    parts = _parts(model)
    if parts is None or not fast_path_allowed("fused_lm_head", parts[0]):
        return None
    decoder, head = parts
    wanted = next_tokens >= 0
    columns = wanted.any(0).nonzero().squeeze(-1)
    hidden = _hidden_at(model, decoder, input_ids, attention_mask, position_ids, columns)
    keep = wanted[:, columns]
    logprobs, _ = head_logprobs(
        hidden[keep],
        head.weight,
        next_tokens[:, columns][keep],
        bias=head.bias,
        compute_dtype=_compute_dtype(hidden, head),
    )
    return logprobs


def mismatch_with_stock(twin) -> str | None:
    """The gate's self-check: log-probs and entropy against the twin's own logits."""
    ids, mask, positions = tiny_batch()
    columns = torch.arange(4, ids.shape[1] - 1)
    labels = ids[:, columns + 1]
    with torch.no_grad():
        logits = twin(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, columns]
        stock = torch.cat([logprobs_from_logits(logits, labels, 0.7), entropy_from_logits(logits, 0.7)])
        lp, ent, _ = _fused(twin, twin.model, twin.lm_head, ids, mask, positions, columns, 0.7, True)
    return max_error(torch.cat([lp, ent]), stock)
