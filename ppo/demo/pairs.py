"""Preference pairs the demo's labeller (the oracle) is shown: pairs of a policy's own samples.

InstructGPT's data collection: a reward model trained only on demonstrations never sees the mistakes
a policy makes once PPO pushes it away from them (repeated digits, digits not in the list), scores
them at random, and PPO finds them. So the labeller also compares the policy's own samples - the SFT
policy's before PPO and, in the refresh half-way through PPO (online RLHF, Bai et al., 2022), the
PPO policy's.
"""

from __future__ import annotations

import torch

from ppo.config import DemoConfig


@torch.no_grad()
def policy_pairs(config: DemoConfig, policy, tokenizer, task, prompts: list[str]) -> list[dict]:
    """Up to `policy_pairs_per_prompt` pairs per prompt, drawn at random among the decisive pairs
    (gold gap >= the task's margin, the better one chosen) of a pool: `pair_samples` samples of the
    policy at `pair_temperature` and, with `drift_edits`, one drifted copy of each sample."""
    import random

    from ppo.data import collate_prompts
    from ppo.demo.task import drift
    from ppo.rollout import HFRolloutEngine, SamplingParams

    k = config.pair_samples
    if not prompts or config.policy_pairs_per_prompt == 0:
        return []
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    params = SamplingParams(config.max_new_tokens, config.pair_temperature, stop_token_ids=(tokenizer.eos_token_id,))
    engine, pairs = HFRolloutEngine(policy, tokenizer), []
    for start in range(0, len(prompts), 256):
        chunk = prompts[start : start + 256]
        rollout = engine.generate(collate_prompts(tokenizer, chunk).repeat(k), params)
        texts = tokenizer.batch_decode(rollout.completion_ids(), skip_special_tokens=True)
        for i, prompt in enumerate(chunk):
            pool = texts[i * k : (i + 1) * k]
            if config.drift_edits:
                pool += [drift(prompt, t, rng) for t in pool]
            pool = sorted(set(pool))  # sorted: a deterministic order to draw from
            gold = {t: task.gold_score(prompt, t) for t in pool}
            decisive = [(a, b) for a in pool for b in pool if gold[a] - gold[b] >= task.pair_margin]
            for chosen, rejected in rng.sample(decisive, min(len(decisive), config.policy_pairs_per_prompt)):
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def refresh_reward_model(config: DemoConfig, reward_model, ppo_policy, tokenizer, task, reward_rows: dict, out) -> dict:
    """Online RLHF's second round, in place on `reward_model` (which PPO keeps using): oracle-labelled
    pairs of the PPO policy's samples on `refresh_prompts` training prompts, plus as many replayed
    pairs of the first round (so it does not forget the SFT policy's mistakes), `refresh_epochs`
    passes. Returns the held-out accuracies after it, on the first round's held-out pairs."""
    import random

    from ppo.config import RewardConfig
    from ppo.demo.stages import stage_config
    from ppo.preference import pairwise_accuracy
    from ppo.reward_stage import train_reward_model

    prompts = sorted({r["prompt"] for r in reward_rows["train"]})[: config.refresh_prompts]
    fresh = policy_pairs(config, ppo_policy, tokenizer, task, prompts)
    replay = random.Random(config.seed).sample(reward_rows["train"], min(len(fresh), len(reward_rows["train"])))
    rm_config = stage_config(
        RewardConfig,
        config,
        out / "reward_refresh",
        learning_rate=config.reward_learning_rate,
        batch_size=config.reward_batch_size,
        num_epochs=config.refresh_epochs,
        eval_fraction=0.0,
        seed=config.seed + 1,
    )
    reward_model.requires_grad_(True)  # the PPO trainer froze it as a scorer
    train_reward_model(rm_config, model=reward_model, tokenizer=tokenizer, rows=fresh + replay)
    reward_model.requires_grad_(False).eval()
    held = reward_rows["held"]
    result = {k: pairwise_accuracy(reward_model, tokenizer, v, 256) if v else None for k, v in held.items()}
    print(
        f"   reward model refreshed on {len(fresh)} pairs of PPO samples + {len(replay)} replayed: held-out "
        f"accuracy {result['all']:.1%} (task pairs {result['task']:.1%}, "
        f"SFT-sample pairs {result['policy'] or float('nan'):.1%})"
    )
    return {"pairs": len(fresh), "replayed": len(replay), **{f"accuracy_{k}": v for k, v in result.items()}}
