"""Evaluation (`ppo-rlhf eval`): how good is a policy, by every measure we can name?

The recipe, top to bottom (`run_eval`):
    1. refuse to overwrite a different run in output_dir (before anything is loaded or written)
    2. load the policy, and the reference / reward model / reward functions that were asked for
    3. read the prompts (with any `answer` column) and keep the first `num_samples`
    4. sample (best-of-n when asked), score, measure KL, accuracy, length, EOS (`evaluate_policy`)
    5. perplexity on a text set (`perplexity`), when one is given
    6. output_dir/eval.json (numbers and generations) and config.yaml; print a summary

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

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ppo.config import EvalConfig, save_config
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

    def pick(self, index: torch.Tensor) -> "_Samples":
        scores = None if self.scores is None else self.scores[index]
        kl = None if self.kl is None else self.kl[index]
        return _Samples([self.texts[i] for i in index.tolist()], scores, {k: v[index] for k, v in self.per_source.items()},
                        kl, self.lengths[index], self.ended[index])


def normalise_answer(text: str) -> str:
    """Whitespace folded to single spaces, ends stripped (case is kept: it can be the answer)."""
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------


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
    sampling: SamplingParams | None = None,
    best_of_n: int = 1,
    batch_size: int = 64,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    seed: int | None = None,
) -> dict[str, Any]:
    """Sample one response per prompt (the best of `best_of_n` by the reward sources) and measure it.

    `rows`: prompts, or dicts with `prompt_column` and optionally `answer_column` and any columns the
    reward functions read. `sampling` defaults to temperature 1, 32 new tokens, stopping at EOS.
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
    sources = _reward_sources(reward_model, reward_funcs, reward_weights)
    if best_of_n > 1 and sources is None:
        raise ValueError("best_of_n > 1 needs a reward model or reward functions to pick the best sample")
    chunks = [_best_of(model, tokenizer, rows[s : s + batch_size], sources, ref_model, sampling, best_of_n, prompt_column)
              for s in range(0, len(rows), batch_size)]
    samples = _concat(chunks)
    return _summarise(rows, samples, prompt_column, answer_column, best_of_n)


def _reward_sources(reward_model, reward_funcs, reward_weights):
    from ppo.rewards import RewardSources

    if reward_model is None and not reward_funcs:
        return None
    return RewardSources(reward_model, reward_funcs, reward_weights)


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
        per_column = _score_each(sources, ids, mask, batch, texts, completion_ids)
        per_source = dict(zip(sources.names, per_column.unbind(1)))
        scores = per_column @ torch.tensor(sources.weights)
    kl = None
    if ref_model is not None:
        # Both at the sampling temperature: the distribution the samples actually came from.
        lp, _, _ = policy_logprobs(model, ids, mask, width, sampling.temperature)
        ref_lp, _, _ = policy_logprobs(ref_model, ids, mask, width, sampling.temperature)
        kl = ((lp - ref_lp).float() * rollout.response_mask).sum(dim=1).cpu()
    samples = _Samples(texts, scores, per_source, kl, rollout.response_mask.sum(dim=1).cpu(), rollout.ended.cpu())
    if n == 1:
        return samples
    # Rows i*n .. i*n+n-1 are prompt i's samples (PromptBatch.repeat); argmax keeps the first of ties.
    best = scores.view(len(rows), n).argmax(dim=1) + torch.arange(len(rows)) * n
    return samples.pick(best)


def _score_each(sources, ids, mask, batch, texts, completion_ids) -> torch.Tensor:
    """`[N, sources]` scores, one column per reward source (unweighted)."""
    from ppo.rewards import call_reward_function
    from ppo.rewards.model import reward_model_scores

    columns = []
    if sources.reward_model is not None:
        columns.append(reward_model_scores(sources.reward_model, ids, mask, batch.texts, texts).float().cpu())
    for func in sources.funcs:
        values = call_reward_function(func, batch.texts, texts, completion_ids, batch.extras)
        columns.append(torch.tensor(values, dtype=torch.float32))
    return torch.stack(columns, dim=1)


def _concat(chunks: list[_Samples]) -> _Samples:
    def cat(values):
        return None if values[0] is None else torch.cat(values)

    return _Samples(
        [t for c in chunks for t in c.texts], cat([c.scores for c in chunks]),
        {k: torch.cat([c.per_source[k] for c in chunks]) for k in chunks[0].per_source},
        cat([c.kl for c in chunks]), torch.cat([c.lengths for c in chunks]), torch.cat([c.ended for c in chunks]),
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
        {"prompt": r[prompt_column], "completion": samples.texts[i],
         **({"answer": r[answer_column]} if r.get(answer_column) is not None else {}),
         **({"reward": samples.scores[i].item()} if samples.scores is not None else {}),
         **{k: v[i].item() for k, v in samples.per_source.items()},
         **({"kl": samples.kl[i].item()} if samples.kl is not None else {})}
        for i, r in enumerate(rows)
    ]
    return result


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> float:
    """exp(total negative log-likelihood / predicted tokens) over `texts`.

    Each text is tokenized on its own (with the tokenizer's special tokens, e.g. a BOS) and every
    token after the first is predicted from the ones before it; padding predicts nothing.
    """
    from ppo.sft import collate, completion_loss_sum

    encoded = [tokenizer(t)["input_ids"] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        part = encoded[start : start + batch_size]
        loss, n = completion_loss_sum(model, collate(part, tokenizer.pad_token_id, labels=part))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return math.exp(total / count)


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """`ppo-rlhf eval`: everything in the module docstring, from a config; returns eval.json's dict."""
    from ppo.stage import check_output_dir, load_causal_lm

    # 1. refuse to clobber another run before anything is loaded or written
    out = check_output_dir(config)
    # 2. models and reward sources
    model, tokenizer = load_causal_lm(config)
    model.eval()
    ref_model = _load_ref(config.ref_model_path, model) if config.ref_model_path else None
    reward_model = _load_reward_model(config.reward_model_path, model) if config.reward_model_path else None
    from ppo.rewards import resolve_reward_function

    funcs = [resolve_reward_function(spec) for spec in config.reward_funcs]
    # 3. prompts
    result: dict[str, Any] = {}
    rows = _eval_rows(config, tokenizer)
    # 4. samples and their measures
    if rows:
        sampling = SamplingParams(config.max_new_tokens, config.temperature, config.top_k, config.top_p,
                                  stop_token_ids=end_of_turn_ids(tokenizer, model))
        result = evaluate_policy(model, tokenizer, rows, reward_model=reward_model, reward_funcs=funcs,
                                 reward_weights=config.reward_weights, ref_model=ref_model, sampling=sampling,
                                 best_of_n=config.best_of_n, batch_size=config.batch_size,
                                 prompt_column=config.prompt_column, answer_column=config.answer_column, seed=config.seed)
    # 5. perplexity
    if config.text_file:
        from ppo.formats import read_prompts_file

        result["perplexity"] = perplexity(model, tokenizer, read_prompts_file(config.text_file), config.batch_size)
    if not result:
        raise ValueError("nothing to evaluate: give prompts_file / dataset_name and/or text_file")
    # 6. outputs
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    (out / "eval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    result["output_dir"] = str(out)
    return result


def _load_ref(path: str, like):
    from ppo.models import load_causal_lm

    ref = load_causal_lm(path, dtype=next(like.parameters()).dtype)
    return ref.to(next(like.parameters()).device).eval()


def _load_reward_model(path: str, like):
    from ppo.models import load_sequence_classifier
    from ppo.train_reward import check_reward_model

    model = load_sequence_classifier(path, num_labels=None, dtype=torch.float32)
    check_reward_model(model, path)
    return model.to(next(like.parameters()).device).eval()


def _eval_rows(config: EvalConfig, tokenizer) -> list[dict]:
    source = config.prompts_file or config.dataset_name
    if source is None:
        return []
    from ppo.formats import load_prompt_rows, read_prompts_file

    if config.prompts_file and Path(config.prompts_file).suffix in ("", ".txt"):
        rows = [{"prompt": p} for p in read_prompts_file(config.prompts_file)]
    else:
        rows = load_prompt_rows(source, tokenizer, prompt_column=config.prompt_column)
        rows = [{config.prompt_column: r.pop("prompt"), **r} for r in rows]
    return rows[: config.num_samples] if config.num_samples else rows


def format_summary(result: dict[str, Any]) -> str:
    """The scalar results, one `name: value` per line."""
    lines = [f"  {k:<24} {v:.4f}" if isinstance(v, float) else f"  {k:<24} {v}"
             for k, v in result.items() if isinstance(v, (int, float))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`ppo-rlhf eval --config eval.yaml key=value ...`; returns the exit code (2: config error)."""
    import argparse

    from ppo.config import ConfigError, config_help, load_config

    keys = "\n".join(f"  {name} (default {default}): {help_}" for name, default, help_ in config_help(EvalConfig))
    parser = argparse.ArgumentParser(prog="ppo-rlhf eval", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Evaluate a policy from a YAML config plus key=value overrides.",
                                     epilog=f"keys:\n{keys}")
    parser.add_argument("--config", help="YAML file of keys (see below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, values parsed as YAML")
    args, extra = parser.parse_known_args(argv)  # `--key=value` is accepted as an override too
    try:
        result = run_eval(load_config(EvalConfig, args.config, args.overrides + extra))
    except ConfigError as err:
        print(f"ppo-rlhf eval: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"ppo-rlhf eval: error: {err}", file=sys.stderr)
        return 1
    print(f"ppo-rlhf eval: {result.get('num_prompts', 0)} prompts; outputs in {result['output_dir']}\n{format_summary(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
