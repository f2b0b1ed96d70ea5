"""The demo's steps, each a call of the public API with the demo's settings, and their set-up.

`ppo.demo.run` (the recipe, `ppo-rlhf demo`) calls them top to bottom; `benchmarks/estimators.py`
calls them too, to run stages 1-3 once and stage 4 once per advantage estimator, so they live
outside the recipe (no module imports a recipe). Every stage goes through the same public API a
user calls on their own models (`train_sft`, `train_reward_model`, `PPOTrainer`, `evaluate_policy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ppo.config import DemoConfig, PPOConfig, RewardConfig, SFTConfig, save_config

DEMO_OUTPUTS = (
    "config.yaml",
    "base",
    "sft",
    "reward",
    "reward_refresh",
    "ppo",
    "report.md",
    "report.png",
    "summary.json",
)


@dataclass(frozen=True)
class DemoPlan:
    """The sizes a run actually uses: the config's, or the smoke-test ones with `quick`.
    Derived here, never written back into the user's config."""

    n_sft: int
    n_pref: int
    n_ppo: int
    n_eval: int
    sft_epochs: int
    reward_epochs: int
    ppo_steps: int
    ppo_batch_size: int


def plan_demo(config: DemoConfig) -> DemoPlan:
    if config.quick:  # enough rows that every stage runs a step or two and the report has data
        return DemoPlan(
            n_sft=64, n_pref=64, n_ppo=32, n_eval=16, sft_epochs=1, reward_epochs=1, ppo_steps=3, ppo_batch_size=8
        )
    return DemoPlan(
        config.n_sft,
        config.n_pref,
        config.n_ppo,
        config.n_eval,
        config.sft_epochs,
        config.reward_epochs,
        config.ppo_steps,
        config.ppo_batch_size,
    )


def prepare_output_dir(config: DemoConfig) -> Path:
    """Refuse a directory holding another run (before anything is written), then clear the demo's
    previous outputs so no stage refuses its own sub-directory and nothing stale survives."""
    from ppo.stage import check_output_dir, remove_outputs

    out = check_output_dir(config, DEMO_OUTPUTS, finished="summary.json")
    remove_outputs(out, DEMO_OUTPUTS)
    save_config(config, out / "config.yaml")
    return out


def quiet_transformers() -> None:
    """The stages show their own progress; transformers' per-load bars and notices are noise here."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------------
# The stages (each a call of the public API with the demo's settings)
# ----------------------------------------------------------------------------------------------


def stage_config(cls, config: DemoConfig, output_dir: Path, **values):
    """An SFTConfig or RewardConfig (`cls`) with the settings every training stage of the demo
    shares (a cosine schedule after 5% warm-up, a metrics line every 10 steps, prompt + completion
    of 64 tokens at most, the demo's precision) and the stage's own `values`."""
    return cls(
        output_dir=str(output_dir),
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        logging_steps=10,
        progress_bar=config.progress_bar,
        max_length=64,
        precision=config.precision,
        **values,
    )


def run_sft(config: DemoConfig, plan: DemoPlan, policy, tokenizer, rows, out: Path) -> dict:
    from ppo.sft_stage import train_sft

    sft_config = stage_config(
        SFTConfig,
        config,
        out / "sft",
        learning_rate=config.sft_learning_rate,
        batch_size=config.sft_batch_size,
        num_epochs=plan.sft_epochs,
        seed=config.seed,
    )
    metrics = train_sft(sft_config, model=policy, tokenizer=tokenizer, rows=rows)
    print(f"   SFT: {metrics['steps']} steps, final loss {metrics['final_loss']:.3f}")
    return metrics


def run_reward(config: DemoConfig, plan: DemoPlan, policy, tokenizer, task, rows, out: Path):
    """(reward model loaded back from output_dir/reward/final, metrics with held-out accuracies).

    The pairs are the task's (two demonstrations, or one and an edit of it) plus pairs of the SFT
    policy's own samples, both labelled by the oracle. The second kind is InstructGPT's data
    collection, and it is what keeps PPO honest: a reward model that never saw the mistakes the
    policy makes when it drifts (repeated digits, digits not in the list) scores them at random,
    and PPO finds them. Prompts are held out whole, so no held-out pair shares a prompt with a
    training pair.
    """
    from transformers import AutoModelForSequenceClassification

    from ppo.demo.pairs import policy_pairs
    from ppo.preference import pairwise_accuracy
    from ppo.reward_stage import train_reward_model
    from ppo.stage import split_rows

    train_task, held_task = split_rows(rows, config.reward_eval_fraction, config.seed)
    train_policy = policy_pairs(config, policy, tokenizer, task, [r["prompt"] for r in train_task])
    held_policy = policy_pairs(config, policy, tokenizer, task, [r["prompt"] for r in held_task])
    rm_config = stage_config(
        RewardConfig,
        config,
        out / "reward",
        init_from_policy=True,
        learning_rate=config.reward_learning_rate,
        batch_size=config.reward_batch_size,
        num_epochs=plan.reward_epochs,
        eval_fraction=0.0,
        seed=config.seed,
    )
    metrics = train_reward_model(rm_config, model=policy, tokenizer=tokenizer, rows=train_task + train_policy)
    model = AutoModelForSequenceClassification.from_pretrained(out / "reward" / "final", dtype=torch.float32).eval()
    held = {"task": held_task, "policy": held_policy, "all": held_task + held_policy}
    metrics.update(
        {f"accuracy_{k}": pairwise_accuracy(model, tokenizer, v, 256) if v else None for k, v in held.items()}
    )
    metrics["rows"] = {
        "train": train_task + train_policy,
        "held": held,
    }  # for the refresh during PPO; not in the summary
    metrics.update(
        accuracy=metrics["accuracy_all"],
        train_rows=len(train_task) + len(train_policy),
        eval_rows=len(held["all"]),
        policy_pairs=len(train_policy) + len(held_policy),
    )
    print(
        f"   reward model: {metrics['train_rows']} training pairs ({metrics['policy_pairs']} from SFT samples); "
        f"held-out pairwise accuracy {metrics['accuracy']:.1%} (task pairs {metrics['accuracy_task']:.1%}, "
        f"SFT-sample pairs {metrics['accuracy_policy'] or float('nan'):.1%})"
    )
    return model, metrics


def capped_mini_batch(mini_batch: int | None, prompts: int, generations: int) -> int | None:
    """The mini-batch, at most one rollout (`prompts` x `generations` samples) long."""
    return None if mini_batch is None else min(mini_batch, prompts * generations)


def ppo_config(config: DemoConfig, plan: DemoPlan, out: Path) -> PPOConfig:
    # `quick` shrinks the batch below the mini-batch
    mini_batch = capped_mini_batch(config.ppo_mini_batch_size, plan.ppo_batch_size, config.num_generations)
    return PPOConfig(
        output_dir=str(out / "ppo"),
        seed=config.seed,
        learning_rate=config.ppo_learning_rate,
        value_learning_rate=config.value_learning_rate,
        batch_size=plan.ppo_batch_size,
        mini_batch_size=mini_batch,
        ppo_epochs=config.ppo_epochs,
        num_generations=config.num_generations,
        kl_coef=config.kl_coef,
        adap_kl_ctrl=config.adap_kl_ctrl,
        target_kl=config.target_kl,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        whiten_rewards=config.whiten_rewards,
        missing_eos_penalty=config.missing_eos_penalty,
        vf_coef=config.vf_coef,
        value_head=config.value_head,
        precision=config.precision,
        advantage_estimator=config.advantage_estimator,
        kl_in_loss=config.kl_in_loss,
        # torch's default kernel whatever the CPU: a step of these tiny models is per-op overhead,
        # which oneDNN's autograd detour would add to, and the README's numbers come from this one.
        fp32_matmul="mkl",
        progress_bar=config.progress_bar,
        lr_scheduler=config.ppo_lr_scheduler,
        lr_schedule_steps=plan.ppo_steps,
    )


class RewardRefresh:
    """Calls `ppo.demo.pairs.refresh_reward_model` once, after `refresh_at` of the PPO steps."""

    def __init__(self, config: DemoConfig, plan: DemoPlan, reward_model, tokenizer, task, rows: dict, out: Path):
        self.step = round(config.refresh_at * plan.ppo_steps) if config.refresh_at > 0 else None
        self.config, self.reward_model, self.tokenizer, self.task, self.rows, self.out = (
            config,
            reward_model,
            tokenizer,
            task,
            rows,
            out,
        )
        self.result: dict | None = None

    def __call__(self, step: int, ppo_policy) -> None:
        if step == self.step:
            from ppo.demo.pairs import refresh_reward_model

            self.result = refresh_reward_model(
                self.config, self.reward_model, ppo_policy, self.tokenizer, self.task, self.rows, self.out
            )


def run_ppo(
    config: DemoConfig, plan: DemoPlan, sft_policy, tokenizer, reward_model, rows, out: Path, refresh=None
) -> list[dict]:
    """PPO steps against the reward model (`PPOTrainer.train`, `plan.ppo_steps` of them); returns one
    record per step (with the gold score). `refresh(step, policy)` runs after each step (the reward
    model's second round)."""
    from ppo import PPOTrainer
    from ppo.demo.task import gold_reward

    cfg = ppo_config(config, plan, out)
    save_config(cfg, out / "ppo" / "config.yaml")
    policy = load_policy(out / "sft" / "final")
    trainer = PPOTrainer(cfg, model=policy, tokenizer=tokenizer, reward_model=reward_model, ref_model=sft_policy)

    def on_step(stats: dict, batch_rows: list[dict]) -> dict:
        # The oracle scores the samples for the report only: nothing of it reaches the update.
        repeated = [r["prompt"] for r in batch_rows for _ in range(cfg.num_generations)]
        gold = gold_reward(repeated, stats["generated_texts"])
        if refresh is not None:
            refresh(trainer.global_step, trainer.policy)
        return {"proxy": stats["rewards/reward_model"], "gold": sum(gold) / len(gold)}

    epochs = math.ceil(plan.ppo_steps / math.ceil(len(rows) / cfg.batch_size))
    history = trainer.train(rows, num_epochs=epochs, on_step=on_step, max_steps=plan.ppo_steps)
    keys = (
        "proxy",
        "gold",
        "mean_reward",
        "kl",
        "kl_coef",
        "entropy",
        "response_length",
        "eos_fraction",
        "clipfrac",
        "explained_variance",
    )
    # A critic-free estimator has no explained variance: its records simply lack the key.
    return [{"step": i + 1, **{k: stats[k] for k in keys if k in stats}} for i, stats in enumerate(history)]


def load_policy(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def evaluate_all(
    config: DemoConfig, sft_policy, ppo_policy, tokenizer, reward_model, rows, margin: float
) -> dict[str, dict]:
    """SFT, best-of-n from SFT and PPO on the same held-out prompts and sampling settings."""
    from ppo.demo.task import gold_reward
    from ppo.measures import evaluate_policy
    from ppo.rollout import SamplingParams

    sampling = SamplingParams(config.max_new_tokens, config.temperature, stop_token_ids=(tokenizer.eos_token_id,))
    # Weight 0 for gold: best-of-n must pick by the reward model alone; gold is only reported.
    common = dict(
        reward_model=reward_model,
        reward_funcs=[gold_reward],
        reward_weights=[1.0, 0.0],
        ref_model=sft_policy,
        sampling=sampling,
        batch_size=128,
    )
    results = {
        "sft": evaluate_policy(sft_policy, tokenizer, rows, seed=config.seed, **common),
        f"best_of_{config.best_of_n}": evaluate_policy(
            sft_policy, tokenizer, rows, best_of_n=config.best_of_n, seed=config.seed, **common
        ),
        "ppo": evaluate_policy(ppo_policy, tokenizer, rows, seed=config.seed, **common),
    }
    for result in results.values():
        result["rm_accuracy"] = rm_gold_agreement(result["generations"], margin)
    return results


def rm_gold_agreement(generations: list[dict], margin: float) -> float | None:
    """Share of pairs of samples whose gold scores differ by >= `margin` that the reward model
    orders as the oracle does: the RM's pairwise accuracy on this policy's own samples, where a
    reward hacker would show up as a drop."""
    rm = torch.tensor([g["reward_model"] for g in generations])
    gold = torch.tensor([g["gold_reward"] for g in generations])
    gold_gap = gold[:, None] - gold[None, :]
    pairs = gold_gap >= margin
    if not pairs.any():
        return None
    return ((rm[:, None] > rm[None, :]) & pairs).sum().item() / pairs.sum().item()
