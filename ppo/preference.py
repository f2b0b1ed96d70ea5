"""Preference pairs: tokenize prompt + chosen / prompt + rejected, score both, the Bradley–Terry
loss and pairwise accuracy. Shared by reward-model training and the demo.

Scores are read with `ppo.forward.sequence_scores` (the last real token, whatever the padding side),
the very function PPO scores with, so training and use read the same position.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ppo import distributed as dist
from ppo.collate import collate, encode_prompt_completion
from ppo.forward import sequence_scores

Pair = tuple[list[int], list[int]]  # token ids of (prompt + chosen, prompt + rejected)


def encode_pairs(tokenizer, rows: list[dict], max_length: int) -> list[Pair]:
    """Token ids of prompt + chosen and prompt + rejected for each row (EOS-terminated)."""
    return [
        (
            encode_prompt_completion(tokenizer, r["prompt"], r["chosen"], max_length)[0],
            encode_prompt_completion(tokenizer, r["prompt"], r["rejected"], max_length)[0],
        )
        for r in rows
    ]


def pair_scores(model, pairs: list[Pair], pad_id: int, scorer=None) -> tuple[Tensor, Tensor]:
    """Scores `[B]` of the chosen and `[B]` of the rejected sequences, in one forward pass over the
    distinct sequences among them: when several pairs share a prompt (K responses give up to K(K-1)/2
    pairs, as in InstructGPT) each response is scored once and its score feeds every pair it is in.
    `scorer(input_ids, attention_mask)` replaces `sequence_scores(model, ...)` (a DDP-wrapped call)."""
    slots: dict[tuple[int, ...], int] = {}
    index = [slots.setdefault(tuple(seq), len(slots)) for seq in [c for c, _ in pairs] + [r for _, r in pairs]]
    batch = collate([list(seq) for seq in slots], pad_id)
    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    scores = (scorer(ids, mask) if scorer is not None else sequence_scores(model, ids, mask))[
        torch.tensor(index, device=device)
    ]
    return scores[: len(pairs)], scores[len(pairs) :]


def pairwise_loss(chosen: Tensor, rejected: Tensor, margin: float = 0.0, center_coef: float = 0.0) -> Tensor:
    """Per-pair loss `[B]` from scores `[B]`, `[B]`: the Bradley–Terry negative log-likelihood
    `-logsigmoid(r_c - r_r - margin)` plus `center_coef * (r_c + r_r)^2`.

    The margin asks chosen to win by at least that much (Llama 2, Touvron et al., 2023); the
    centering term (Eisenstein et al., 2023) pins the free offset of the scores near 0, which the
    pairwise loss alone leaves undetermined.
    """
    loss = -torch.nn.functional.logsigmoid(chosen - rejected - margin)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


@torch.no_grad()
def evaluate_pairs(
    model,
    tokenizer,
    rows: list[dict],
    batch_size: int = 8,
    max_length: int = 512,
    margin: float = 0.0,
    autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """On preference rows: `accuracy` (share with r_chosen > r_rejected, ties count as wrong),
    `loss` (mean Bradley–Terry loss with `margin`) and `score_gap` (mean r_chosen - r_rejected).
    Each forward runs in a fresh `autocast()` context; the scores come out fp32."""
    was_training = model.training
    model.eval()
    chosen, rejected = [torch.zeros(0)], [torch.zeros(0)]
    mine = rows[dist.shard_slice(len(rows))]  # under torchrun each rank scores its share
    for start in range(0, len(mine), batch_size):
        with autocast():
            c, r = pair_scores(
                model, encode_pairs(tokenizer, mine[start : start + batch_size], max_length), tokenizer.pad_token_id
            )
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    model.train(was_training)
    chosen, rejected = (
        dist.all_gather_rows(torch.cat(chosen).to(dist.device())),
        dist.all_gather_rows(torch.cat(rejected).to(dist.device())),
    )
    return {
        "accuracy": (chosen > rejected).float().mean().item(),
        "loss": pairwise_loss(chosen, rejected, margin).mean().item(),
        "score_gap": (chosen - rejected).mean().item(),
    }


def pairwise_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 8, max_length: int = 512) -> float:
    """Share of {"prompt", "chosen", "rejected"} rows where the model scores chosen above rejected."""
    return evaluate_pairs(model, tokenizer, rows, batch_size, max_length)["accuracy"]
