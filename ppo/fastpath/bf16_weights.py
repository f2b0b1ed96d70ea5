"""Frozen models' linear weights held in bf16 under bf16 autocast (`PPOConfig.bf16_frozen_weights`).

Why: autocast runs a linear layer as a bf16 matmul of its fp32 weight cast to bf16. It caches that
cast only for weights that require grad, so the reference and the reward model, which are frozen,
have every weight cast again at every forward (every row block of scoring), and keep the fp32
copy in memory. Casting those weights to bf16 once gives the matmuls exactly the operands autocast
would have made (a cast rounds the same way whenever it runs), so the results are bit-identical,
the casts are gone, and the linear weights take half the memory.

`bf16_while` does the same for the length of a loop of forwards, handing the fp32 weights back
after: sampling from a LoRA policy, whose frozen base autocast would cast again at every decode
step (a trained weight's cast autocast caches for the whole rollout), and whose fp32 base stays
what the user holds.

Only nn.Linear layers of the decoder body and the LM head change. Embeddings and norms keep their
dtype, so the residual stream stays fp32 as under autocast; a weight shared with another kind of
module (tied input and output embeddings) stays too; a reward model's score head stays fp32 because
`ppo.forward.read_head` reads it in fp32 outside autocast. Models that read a layer's weight dtype to
pick a computation dtype would break the identity, so the gate checks it on a tiny twin of the
same architecture (logits under bf16 autocast, bit for bit) before any model is changed.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ppo.fastpath.gate import fast_path_allowed, tiny_batch


def architecture_reason(config) -> str | None:
    """Any transformers model may try: the self-check on its twin decides."""
    return None


def frozen_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers of `model`'s decoder body and LM head that may be held in bf16: frozen,
    fp32, and not sharing a weight with a module of another kind. Empty for a model that is not a
    transformers model with a body (`base_model_prefix`)."""
    if hasattr(model, "get_base_model"):  # a peft wrapper: the transformers model inside
        model = model.get_base_model()
    body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    if not isinstance(body, torch.nn.Module):
        return []
    candidates = list(body.modules())
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.nn.Linear):
        candidates.append(head)
    shared = {
        id(p)
        for module in model.modules()
        if not isinstance(module, torch.nn.Linear)
        for p in module.parameters(recurse=False)
    }
    return [
        module
        for module in candidates
        if type(module) is torch.nn.Linear
        and module.weight.dtype == torch.float32
        and id(module.weight) not in shared
        and not any(p.requires_grad for p in module.parameters())
    ]


def hold_in_bf16(model: torch.nn.Module) -> int:
    """Cast `frozen_linears(model)` to bf16 in place; returns how many (0 where the gate says no)."""
    layers = frozen_linears(model)
    if not layers or not fast_path_allowed("bf16_frozen_weights", model):
        return 0
    for layer in layers:
        layer.to(torch.bfloat16)
    return len(layers)


@contextlib.contextmanager
def bf16_while(model: torch.nn.Module):
    """Inside: `frozen_linears(model)` hold bf16 copies of their weights and biases (where the gate
    allows; yields how many layers). After: the original fp32 parameters, the same objects."""
    layers = frozen_linears(model)
    if not layers or not fast_path_allowed("bf16_frozen_weights", model):
        yield 0
        return
    originals = [(layer.weight, layer.bias) for layer in layers]
    try:
        for layer in layers:
            for name in ("weight", "bias"):
                if getattr(layer, name) is not None:
                    held = getattr(layer, name).detach().to(torch.bfloat16)
                    setattr(layer, name, torch.nn.Parameter(held, requires_grad=False))
        yield len(layers)
    finally:
        for layer, (weight, bias) in zip(layers, originals):
            layer.weight, layer.bias = weight, bias


def mismatch_with_stock(twin) -> str | None:
    """The twin's logits and last hidden states under bf16 autocast, fp32-held against bf16-held
    linears: None when they are bit-identical."""
    twin.requires_grad_(False)
    held = copy.deepcopy(twin)
    for layer in frozen_linears(held):
        layer.to(torch.bfloat16)
    ids, mask, positions = tiny_batch()
    outputs = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for model in (twin, held):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                output_hidden_states=True,
            )
            outputs.append((out.logits, out.hidden_states[-1]))
    for name, stock, held_out in zip(("logits", "last hidden states"), *outputs):
        if stock.dtype != held_out.dtype or not torch.equal(stock, held_out):
            diff = float((stock.float() - held_out.float()).abs().max())
            return f"{name} differ ({stock.dtype} vs {held_out.dtype}, max |difference| {diff:.3g})"
    return None
