"""What `ppo-rlhf eval` and the demo measure on a policy: sample (best-of-n when asked), score with
the reward sources, KL to a reference, exact-match accuracy, length, EOS, and perplexity on texts.

The measures, per sample, then averaged over the prompts:
    reward         the weighted sum of the reward sources (reward model first), as PPO scores it
    kl             sum over response tokens of log pi(a_t|s_t) - log pi_ref(a_t|s_t), both at the
                   sampling temperature: a one-sample estimate of KL(pi || pi_ref) per response
    accuracy       exact match with the answer column after whitespace normalisation
    perplexity     exp(mean negative log-likelihood per predicted token) over a text set

Best-of-n is the classic baseline that needs no training: sample n responses per prompt and keep
the one the reward sources score highest. Its KL to the sampling policy is at most
log(n) - (n - 1)/n (Stiennon et al., 2020; Beirami et al., 2024), reported as `kl_best_of_n`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ppo.data import collate_prompts, ensure_pad_token
from ppo.forward import policy_logprobs
from ppo.models import end_of_turn_ids
from ppo.rollout import HFRolloutEngine, SamplingParams


@dataclass
class _Samples:
    """One response per row of a (repeated) prompt batch, with what is measured on it."""

    texts: list[str]  # [N] decoded completions, special tokens dropped
    scores: torch.Tensor | None  # [N] weighted reward, None without reward sources
    per_source: dict[str, torch.Tensor]  # name -> [N] score of each reward source
    kl: torch.Tensor | None  # [N] summed log pi - log pi_ref over response tokens
    lengths: torch.Tensor  # [N] response tokens, the ending EOS included
    ended: torch.Tensor  # [N] bool, the response ended with EOS

    def pick(self, index: torch.Tensor) -> _Samples:
        scores = None if self.scores is None else self.scores[index]
        kl = None if self.kl is None else self.kl[index]
        return _Samples(
            [self.texts[i] for i in index.tolist()],
            scores,
            {k: v[index] for k, v in self.per_source.items()},
            kl,
            self.lengths[index],
            self.ended[index],
        )


def normalise_answer(text: str) -> str:
    """Whitespace folded to single spaces, ends stripped (case is kept: it can be the answer)."""
    return " ".join(str(text).split())


@torch.no_grad()
def evaluate_policy(
    model,
    tokenizer,
    rows: Sequence[dict | str],
    *,
    reward_model=None,
    reward_funcs: Callable | Sequence[Callable] | None = None,
    reward_weights: Sequence[float] | None = None,
    ref_model=None,
    reward_tokenizer=None,
    sampling: SamplingParams | None = None,
    best_of_n: int = 1,
    batch_size: int = 64,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    seed: int | None = None,
    reward_timeout_s: float | None = None,
    reward_max_abs: float | None = None,
) -> dict[str, Any]:
    """Sample one response per prompt (the best of `best_of_n` by the reward sources) and measure it.
    `reward_timeout_s` / `reward_max_abs`: limits of each reward-function call (None: none; see
    `ppo.rewards.call_reward_function`).

    `rows`: prompts, or dicts with `prompt_column` and optionally `answer_column` and any columns the
    reward functions read. `reward_tokenizer`: the reward model's, when it differs from the policy's
    (completions are then re-tokenized for it, as in PPO). `sampling` defaults to temperature 1, 32
    new tokens, stopping at EOS.
    Returns `num_prompts`, `response_length`, `eos_fraction`, and where computable `reward`
    (weighted), `rewards/<source>` per source, `kl` (needs `ref_model`), `accuracy` (rows with an
    answer), `kl_best_of_n`, plus `generations`: one dict per prompt (prompt, completion, answer,
    scores).
    """
    if best_of_n < 1:
        raise ValueError(f"best_of_n must be >= 1, got {best_of_n}")
    rows = [r if isinstance(r, dict) else {prompt_column: r} for r in rows]
    if not rows:
        raise ValueError("no prompts to evaluate: the list is empty")
    ensure_pad_token(tokenizer)
    if sampling is None:
        sampling = SamplingParams(max_new_tokens=32, stop_token_ids=end_of_turn_ids(tokenizer, model))
    if seed is not None:
        torch.manual_seed(seed)
    sources = _reward_sources(
        reward_model, reward_funcs, reward_weights, reward_tokenizer, reward_timeout_s, reward_max_abs
    )
    if best_of_n > 1 and sampling.temperature == 0:
        raise ValueError("best_of_n > 1 needs temperature > 0: greedy decoding gives every sample the same answer")
    if best_of_n > 1 and sources is None:
        raise ValueError("best_of_n > 1 needs a reward model or reward functions to pick the best sample")
    chunks = [
        _best_of(model, tokenizer, rows[s : s + batch_size], sources, ref_model, sampling, best_of_n, prompt_column)
        for s in range(0, len(rows), batch_size)
    ]
    samples = _concat(chunks)
    return _summarise(rows, samples, prompt_column, answer_column, best_of_n)


def _reward_sources(reward_model, reward_funcs, reward_weights, reward_tokenizer=None, timeout_s=None, max_abs=None):
    from ppo.rewards import RewardSources

    if reward_model is None and not reward_funcs:
        return None
    return RewardSources(
        reward_model, reward_funcs, reward_weights, reward_tokenizer, timeout_s=timeout_s, max_abs=max_abs
    )


def _best_of(model, tokenizer, rows, sources, ref_model, sampling, n, prompt_column) -> _Samples:
    """Sample n responses per row, score them, keep each row's highest-scoring one."""
    device = next(model.parameters()).device
    prompts = [r[prompt_column] for r in rows]
    extras = {k: [r.get(k) for r in rows] for k in rows[0] if k != prompt_column}
    batch = collate_prompts(tokenizer, prompts, extras, device=device).repeat(n)
    rollout = HFRolloutEngine(model, tokenizer).generate(batch, sampling)
    ids, mask, width = rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1]
    completion_ids = rollout.completion_ids()
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    scores, per_source = None, {}
    if sources is not None:
        # The same scoring path as PPO's: NaN checks, and re-tokenizing for a reward_tokenizer.
        per_column = sources.score_each(ids, mask, batch.texts, texts, completion_ids, batch.extras)
        per_source = dict(zip(sources.names, per_column.float().unbind(1)))
        scores = sources.combine(per_column)
    kl = None
    if ref_model is not None:
        # Both at the sampling temperature: the distribution the samples actually came from
        # (greedy decoding has none of its own: the models' temperature-1 distributions then).
        temperature = sampling.temperature or 1.0
        lp, _, _ = policy_logprobs(model, ids, mask, width, temperature)
        ref_lp, _, _ = policy_logprobs(ref_model, ids, mask, width, temperature)
        kl = ((lp - ref_lp).float() * rollout.response_mask).sum(dim=1).cpu()
    samples = _Samples(texts, scores, per_source, kl, rollout.response_mask.sum(dim=1).cpu(), rollout.ended.cpu())
    if n == 1:
        return samples
    # Rows i*n .. i*n+n-1 are prompt i's samples (PromptBatch.repeat); argmax keeps the first of ties.
    best = scores.view(len(rows), n).argmax(dim=1) + torch.arange(len(rows)) * n
    return samples.pick(best)


def _concat(chunks: list[_Samples]) -> _Samples:
    def cat(values):
        return None if values[0] is None else torch.cat(values)

    return _Samples(
        [t for c in chunks for t in c.texts],
        cat([c.scores for c in chunks]),
        {k: torch.cat([c.per_source[k] for c in chunks]) for k in chunks[0].per_source},
        cat([c.kl for c in chunks]),
        torch.cat([c.lengths for c in chunks]),
        torch.cat([c.ended for c in chunks]),
    )


def _summarise(rows, samples: _Samples, prompt_column, answer_column, n) -> dict[str, Any]:
    result: dict[str, Any] = {"num_prompts": len(rows), "best_of_n": n}
    if samples.scores is not None:
        result["reward"] = samples.scores.mean().item()
        result.update({f"rewards/{k}": v.mean().item() for k, v in samples.per_source.items()})
    if samples.kl is not None:
        result["kl"] = samples.kl.mean().item()
    if n > 1:
        result["kl_best_of_n"] = math.log(n) - (n - 1) / n
    answered = [i for i, r in enumerate(rows) if r.get(answer_column) is not None]
    if answered:
        hits = [normalise_answer(samples.texts[i]) == normalise_answer(rows[i][answer_column]) for i in answered]
        result["accuracy"] = sum(hits) / len(hits)
    result["response_length"] = samples.lengths.float().mean().item()
    result["eos_fraction"] = samples.ended.float().mean().item()
    result["generations"] = [
        {
            "prompt": r[prompt_column],
            "completion": samples.texts[i],
            **({"answer": r[answer_column]} if r.get(answer_column) is not None else {}),
            **({"reward": samples.scores[i].item()} if samples.scores is not None else {}),
            **{k: v[i].item() for k, v in samples.per_source.items()},
            **({"kl": samples.kl[i].item()} if samples.kl is not None else {}),
        }
        for i, r in enumerate(rows)
    ]
    return result


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> float:
    """exp(total negative log-likelihood / predicted tokens) over `texts`.

    Each text is tokenized on its own (with the tokenizer's special tokens, e.g. a BOS) and every
    token after the first is predicted from the ones before it; padding predicts nothing.
    """
    from ppo.collate import collate
    from ppo.forward import completion_loss_sum

    encoded = [tokenizer(t)["input_ids"] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        part = encoded[start : start + batch_size]
        # Through the fused head where it may: a large vocabulary's [B, T, V] logits are never held.
        loss, n = completion_loss_sum(model, collate(part, tokenizer.pad_token_id, labels=part), fused_head_ok=True)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return math.exp(total / count)
