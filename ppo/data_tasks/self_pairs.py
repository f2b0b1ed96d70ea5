"""Preference pairs from a policy's own samples, labelled by a rule: the data for a reward model
that judges exactly the mistakes this policy makes.

    python -m ppo.data_tasks.self_pairs --model out/smollm2-135m --prompts data/arithmetic/train.jsonl \\
        --out data/arithmetic/pairs.jsonl --reward final_number --samples 4 --num-prompts 400

For each prompt: `--samples` responses at `--temperature`, each scored by the rule reward (any
name or `module:function` that `reward_funcs` accepts; it sees the prompt row's columns, e.g.
`answer`); every (higher, lower) pair of distinct responses, up to `--pairs-per-prompt` drawn at
random, becomes {"prompt", "chosen", "rejected"}. Prompts whose samples all score the same give no
pair. The prompt is kept as chat messages, so `ppo-rlhf reward` renders it with the chat template,
exactly as PPO's prompts are.

`--precision` (default auto: bf16 where the hardware is fast at it, as PPO's) samples under bf16
autocast with the frozen sampler's linear weights held in bf16 and attention on torch's fp32 CPU
kernels, as PPO's frozen models run: the pairs' responses are then the bf16 policy's samples.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch


@torch.no_grad()
def build_pairs(
    model,
    tokenizer,
    rows: list[dict],
    reward,
    samples: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    pairs_per_prompt: int = 2,
    batch_size: int = 32,
    seed: int = 0,
    precision: str = "auto",
) -> tuple[list[dict], dict]:
    """(pairs, stats): `rows` are prompt rows as `load_prompt_rows` gives them (`prompt` as text or
    chat messages, plus the other columns, which the rule reward reads). `model` is frozen in place
    (and under bf16 its linear weights held in bf16): it only samples."""
    from ppo.data import collate_prompts
    from ppo.models import end_of_turn_ids
    from ppo.precision import autocast_context, resolve_precision
    from ppo.rewards import call_reward_function
    from ppo.roles import attend_in_fp32, freeze, hold_frozen_in_bf16
    from ppo.rollout import HFRolloutEngine, SamplingParams

    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    freeze(model)
    hold_frozen_in_bf16([model], precision, strategy="ddp", world_size=1)
    attend_in_fp32([model], precision, device)
    engine = HFRolloutEngine(model, tokenizer, lambda: autocast_context(precision, device))
    params = SamplingParams(max_new_tokens, temperature, stop_token_ids=end_of_turn_ids(tokenizer, model))
    pairs, scored = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        extras = {k: [r.get(k) for r in chunk] for k in chunk[0] if k != "prompt"}
        batch = collate_prompts(tokenizer, [r["prompt"] for r in chunk], extras).repeat(samples)
        rollout = engine.generate(batch, params)
        completion_ids = rollout.completion_ids()
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        values = call_reward_function(reward, batch.texts, texts, completion_ids, batch.extras)
        for i, row in enumerate(chunk):
            # PromptBatch.repeat keeps a prompt's samples together: rows i*samples .. i*samples+samples-1.
            pool = {}
            for k in range(i * samples, (i + 1) * samples):
                pool.setdefault(texts[k].strip(), float(values[k] or 0.0))
            scored.extend(pool.values())
            ordered = sorted(pool.items())  # a deterministic order to draw from
            decisive = [(a, b) for a, sa in ordered for b, sb in ordered if sa > sb]
            for chosen, rejected in rng.sample(decisive, min(len(decisive), pairs_per_prompt)):
                pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
        print(f"self_pairs: {min(start + batch_size, len(rows))}/{len(rows)} prompts, {len(pairs)} pairs", flush=True)
    mean_reward = sum(scored) / max(len(scored), 1)
    stats = {"prompts": len(rows), "pairs": len(pairs), "mean_rule_reward": mean_reward, "precision": precision}
    return pairs, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppo.data_tasks.self_pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the policy: any source ppo.models loads (dir, .gguf, pkg:NAME)")
    parser.add_argument("--prompts", required=True, help="prompt rows (JSONL with prompt and e.g. answer)")
    parser.add_argument("--out", required=True, help="JSONL file of {prompt, chosen, rejected}")
    parser.add_argument("--reward", default="final_number", help="rule reward: a built-in name or module:function")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--pairs-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per sampling batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="sampling precision: auto is bf16 where the hardware is fast at it (as in PPO), else fp32",
    )
    args = parser.parse_args(argv)
    try:
        from ppo.data import ensure_pad_token
        from ppo.formats import load_prompt_rows
        from ppo.models import load_causal_lm, load_tokenizer
        from ppo.rewards import resolve_reward_function

        reward = resolve_reward_function(args.reward)
        tokenizer = load_tokenizer(args.model)
        ensure_pad_token(tokenizer)
        rows = load_prompt_rows(args.prompts, tokenizer)[: args.num_prompts]
        if not rows:
            raise ValueError(f"no prompts in {args.prompts}")
        model = load_causal_lm(args.model).eval()
        pairs, stats = build_pairs(
            model,
            tokenizer,
            rows,
            reward,
            args.samples,
            args.max_new_tokens,
            args.temperature,
            args.pairs_per_prompt,
            args.batch_size,
            args.seed,
            args.precision,
        )
    except (ValueError, OSError) as err:
        print(f"self_pairs: error: {err}", file=sys.stderr)
        return 1
    if not pairs:
        print(
            "self_pairs: error: no pair: every prompt's samples scored the same; raise --samples or --temperature",
            file=sys.stderr,
        )
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    print(
        f"self_pairs: wrote {stats['pairs']} pairs from {stats['prompts']} prompts to {out} "
        f"(mean rule reward of the samples {stats['mean_rule_reward']:.3f}, sampled in {stats['precision']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
