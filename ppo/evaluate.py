"""Evaluation (`ppo-rlhf eval`): how good is a policy, by every measure we can name?

The recipe, top to bottom (`run_eval`):
    1. refuse to overwrite a different run in output_dir (before anything is loaded or written)
    2. load the policy, and the reference / reward model / reward functions that were asked for
    3. read the prompts (with any `answer` column) and keep the first `num_samples`
    4. sample (best-of-n when asked), score, measure KL, accuracy, length, EOS (`evaluate_policy`)
    5. perplexity on a text set (`perplexity`), when one is given
    6. output_dir/eval.json (numbers and generations), config.yaml and run.json; print a summary

The measures (reward, KL, accuracy, best-of-n, perplexity) are defined in `ppo.measures`, which the
demo uses too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ppo.config import EvalConfig, save_config
from ppo.data import ensure_pad_token
from ppo.measures import evaluate_policy, perplexity
from ppo.models import end_of_turn_ids
from ppo.rollout import SamplingParams

# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """`ppo-rlhf eval`: everything in the module docstring, from a config; returns eval.json's dict."""
    from ppo.run_record import record_start, what_ran
    from ppo.stage import EVAL_OUTPUTS, check_output_dir, load_causal_lm

    # 1. refuse to clobber another run before anything is loaded or written (the same command again
    #    may run: an evaluation replaces only its own eval.json, with the same numbers)
    out = check_output_dir(config, EVAL_OUTPUTS, finished=None)
    # 2. models and reward sources
    model, tokenizer = load_causal_lm(config)
    model.eval()
    ref_model = _load_ref(config.ref_model_path, model) if config.ref_model_path else None
    reward_model, reward_tokenizer = None, None
    if config.reward_model_path:
        reward_model, reward_tokenizer = _load_reward_model(config.reward_model_path, model, tokenizer)
    from ppo.rewards import resolve_reward_function

    funcs = [resolve_reward_function(spec) for spec in config.reward_funcs]
    # 3. prompts
    result: dict[str, Any] = {}
    rows = _eval_rows(config, tokenizer)
    # 4. samples and their measures
    if rows:
        sampling = SamplingParams(
            config.max_new_tokens,
            config.temperature,
            config.top_k,
            config.top_p,
            stop_token_ids=end_of_turn_ids(tokenizer, model),
        )
        result = evaluate_policy(
            model,
            tokenizer,
            rows,
            reward_model=reward_model,
            reward_funcs=funcs,
            reward_weights=config.reward_weights,
            ref_model=ref_model,
            reward_tokenizer=reward_tokenizer,
            sampling=sampling,
            best_of_n=config.best_of_n,
            batch_size=config.batch_size,
            prompt_column=config.prompt_column,
            answer_column=config.answer_column,
            seed=config.seed,
            reward_timeout_s=config.reward_timeout_s,
            reward_max_abs=config.reward_max_abs,
        )
    # 5. perplexity
    if config.text_file:
        from ppo.formats import read_prompts_file

        result["perplexity"] = perplexity(model, tokenizer, read_prompts_file(config.text_file), config.batch_size)
    if not result:
        raise ValueError("nothing to evaluate: give prompts_file / dataset_name and/or text_file")
    # 6. outputs; run.json says what the numbers came from (eval samples and scores in fp32)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    (out / "eval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    device = next(model.parameters()).device
    models = {"policy": model, "reference": ref_model, "reward_model": reward_model}
    record_start(out, what_ran(config, device, "fp32", models))
    result["output_dir"] = str(out)
    return result


def _load_ref(path: str, like):
    from ppo.models import load_causal_lm

    ref = load_causal_lm(path, dtype=next(like.parameters()).dtype)
    return ref.to(next(like.parameters()).device).eval()


def _load_reward_model(path: str, like, policy_tokenizer):
    """(reward model, its tokenizer when it differs from the policy's, else None). A directory
    without tokenizer files is taken to share the policy's tokenizer."""
    from transformers import AutoTokenizer

    from ppo.models import load_sequence_classifier
    from ppo.rewards.model import check_reward_model

    model = load_sequence_classifier(path, num_labels=None, dtype=torch.float32)
    check_reward_model(model, path)
    model = model.to(next(like.parameters()).device).eval()
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in tokenizer_files):
        return model, None
    reward_tokenizer = AutoTokenizer.from_pretrained(path)
    if reward_tokenizer.get_vocab() == policy_tokenizer.get_vocab():
        return model, None
    ensure_pad_token(reward_tokenizer)  # its batches of re-tokenized texts are padded
    return model, reward_tokenizer  # completions are re-tokenized for it, as in PPO


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
    lines = [
        f"  {k:<24} {v:.4f}" if isinstance(v, float) else f"  {k:<24} {v}"
        for k, v in result.items()
        if isinstance(v, (int, float))
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`ppo-rlhf eval --config eval.yaml key=value ...`; returns the exit code (2: config error)."""
    import argparse

    from ppo.config import ConfigError, config_help, load_config

    keys = "\n".join(f"  {name} (default {default}): {help_}" for name, default, help_ in config_help(EvalConfig))
    parser = argparse.ArgumentParser(
        prog="ppo-rlhf eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a policy from a YAML config plus key=value overrides.",
        epilog=f"keys:\n{keys}",
    )
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
    print(
        f"ppo-rlhf eval: {result.get('num_prompts', 0)} prompts; outputs in "
        f"{result['output_dir']}\n{format_summary(result)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
