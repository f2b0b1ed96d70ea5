"""Forward passes shared by scoring (no grad) and the update (with grad).

One code path computes log-probabilities for both, which is what makes the PPO ratio exactly 1 on
the first mini-batch: the same positions, the same temperature, the same reductions. The maths
(log-softmax gather, entropy) is in `ppo.functional`; this module only runs models.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppo import functional as F
from ppo.collate import IGNORE_INDEX, TokenBatch
from ppo.fastpath import fused_head
from ppo.fastpath.last_layer import last_layer_rows
from ppo.rollout.hf import position_ids_from_mask


def state_columns(input_ids: Tensor, response_width: int) -> Tensor:
    """The columns of the states before each response token (P - 1 + t): what the LM head and the
    critic's head read."""
    width = input_ids.shape[1]
    return torch.arange(width - response_width - 1, width - 1, device=input_ids.device)


def response_logits(model, input_ids: Tensor, attention_mask: Tensor, response_width: int, output_hidden: bool = False):
    """Logits predicting each response token, `[B, R, V]`, and optionally the final hidden states at
    the same positions, `[B, R, H]`.

    The state before response token t sits at column P - 1 + t. `logits_to_keep` given as those
    column indices spares the LM head the prompt positions and the final one. As indices, not a
    count: gathering them makes a contiguous copy, so the LM head runs as one 2-D matmul; the slice a
    count gives is a strided view, which inference mode sends through a batched matmul that
    broadcasts the weight, 4x slower on CPU.
    """
    columns = state_columns(input_ids, response_width)
    with last_layer_rows(model, columns):  # nothing else is read
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=columns,
            output_hidden_states=output_hidden,
        )
    hidden = out.hidden_states[-1][:, columns] if output_hidden else None
    return out.logits, hidden


def policy_logprobs(
    model, input_ids, attention_mask, response_width, temperature, with_entropy=False, output_hidden=False
):
    """Log-probs `[B, R]` of the response tokens under `model`, entropy `[B, R]` or None, and the
    final hidden states `[B, R, H]` when asked (for a shared value head).

    The whole logits tensor goes to the log-prob functions, which bound their fp32 memory by
    chunking inside; slicing it here instead would make autograd build a zero-filled full-size
    gradient per slice."""
    fused = fused_head.response_logprobs(
        model,
        input_ids,
        attention_mask,
        position_ids_from_mask(attention_mask),
        state_columns(input_ids, response_width),
        temperature,
        with_entropy,
    )
    if fused is not None:  # never holds the [B, R, V] logits (ppo.fastpath.fused_head)
        return fused if output_hidden else (*fused[:2], None)
    logits, hidden = response_logits(model, input_ids, attention_mask, response_width, output_hidden)
    labels = input_ids[:, -response_width:]
    logprobs = F.logprobs_from_logits(logits, labels, temperature)
    entropy = F.entropy_from_logits(logits, temperature) if with_entropy else None
    return logprobs, entropy, hidden


def _backbone_and_head(model):
    """The transformer body and the scalar head of an AutoModelForSequenceClassification."""
    head = getattr(model, "score", None)
    if head is None:
        head = getattr(model, "classifier", None)
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if head is None or body is None:
        raise TypeError(
            f"{type(model).__name__} is not shaped like AutoModelForSequenceClassification "
            "(expected a backbone and a `score` head)"
        )
    return body, head


def read_head(head, hidden: Tensor) -> Tensor:
    """A scalar head `[..., H] -> [..., num_labels]` computed in fp32, outside any autocast.

    Under bf16 autocast a linear head is a bf16 matmul whose output has 8 bits of mantissa: every
    reward-model score and critic value would be rounded before it enters GAE (a score of 2.37 read
    as 2.375). The head is one row of weights, so fp32 costs nothing; the backbone's matmuls stay
    in bf16. A head that is not a plain nn.Linear runs in its own dtype, without autocast."""
    with torch.autocast(hidden.device.type, enabled=False):
        if isinstance(head, torch.nn.Linear):
            bias = None if head.bias is None else head.bias.float()
            return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)
        return head(hidden.to(next(head.parameters()).dtype)).float()


def token_values(critic, input_ids: Tensor, attention_mask: Tensor, response_width: int) -> Tensor:
    """The critic's score head read at every state before a response token: `[B, R]`."""
    body, head = _backbone_and_head(critic)
    columns = state_columns(input_ids, response_width)
    with last_layer_rows(body, columns):
        hidden = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state[:, columns]
    return read_head(head, hidden).squeeze(-1)


def sequence_scores(reward_model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """One score per sequence, `[B]`, read at the last real token whatever the padding side.

    We do the pooling ourselves: the models' own pooling looks for the pad id, which picks the
    wrong token when pad == EOS. A plain `nn.Module` reward model is called as
    `forward(input_ids, attention_mask)` and must return `[B]` or `[B, 1]`.
    """
    if not (
        hasattr(reward_model, "base_model_prefix")
        and (hasattr(reward_model, "score") or hasattr(reward_model, "classifier"))
    ):
        scores = reward_model(input_ids, attention_mask)
        scores = getattr(scores, "logits", scores)
        return scores.reshape(input_ids.shape[0], -1)[:, 0].float()
    body, head = _backbone_and_head(reward_model)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last_real = (attention_mask.bool() * columns).argmax(dim=1)
    with last_layer_rows(body, torch.unique(last_real)):  # sorted
        hidden = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_real]
    return read_head(head, pooled)[:, 0]


def by_rows(fn, rows: int | None, *batches):
    """`fn(*batches)` run on consecutive blocks of at most `rows` rows and concatenated: the same
    result, to float rounding, with one block's activations and logits alive at a time. A batch is
    anything with rows to slice (a tensor along dim 0, a list of texts); None passes through as
    None. `fn` returns a tensor or a tuple of tensors / None."""
    n = next(len(b) for b in batches if b is not None)
    if rows is None or rows >= n:
        return fn(*batches)
    parts = [fn(*(None if b is None else b[i : i + rows] for b in batches)) for i in range(0, n, rows)]
    if isinstance(parts[0], tuple):
        return tuple(None if pieces[0] is None else torch.cat(pieces) for pieces in zip(*parts))
    return torch.cat(parts)


def completion_loss_sum(model, batch: TokenBatch, fused_head_ok: bool = False) -> tuple[Tensor, int]:
    """Summed cross-entropy over the batch's completion tokens (0-d, fp32) and how many there are.

    A sum, not a mean, so that gradient accumulation can divide by the token count of the whole
    optimizer step: every completion token then weighs the same, however the batch was split.
    With `fused_head_ok`, where `ppo.fastpath.fused_head` allows it, only the completion tokens'
    states go through the LM head, a chunk at a time (no `[B, T, V]` logits); the same maths.
    """
    device = next(model.parameters()).device
    ids, mask, positions = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.position_ids))
    # The state at column t predicts the token at column t + 1.
    targets = batch.labels[:, 1:].to(device)
    count = int((targets != IGNORE_INDEX).sum())
    if fused_head_ok and count:
        next_tokens = torch.nn.functional.pad(targets, (0, 1), value=IGNORE_INDEX)  # [B, T], one per state
        logprobs = fused_head.token_logprobs(model, ids, mask, positions, next_tokens)
        if logprobs is not None:
            return -logprobs.sum(), count
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, count
