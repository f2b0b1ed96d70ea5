"""`ppo-rlhf demo` (also `python -m ppo.demo.run`): the whole RLHF pipeline on a laptop CPU.

The recipe, top to bottom (`run_demo`):
    1. the digit-filter task and its disjoint splits; a word-level tokenizer and a tiny Qwen3 base
       model built from the config, saved as Hugging Face directories      -> output_dir/base
    2. SFT of the base model on the sloppy demonstrations                   -> output_dir/sft/final
    3. a reward model started from the SFT policy (same backbone, fresh head), trained on the
       oracle-labelled pairs; its held-out pairwise accuracy              -> output_dir/reward/final
    4. PPO from the SFT policy against the learned reward model, never the oracle; each step's
       samples are also scored by the oracle, for the report only         -> output_dir/ppo/final
       After `refresh_at` of the steps, one online round: the labeller compares the PPO policy's
       samples and the reward model trains on (online RLHF)       -> output_dir/reward_refresh/final
    5. evaluation on held-out prompts of SFT, best-of-n from SFT (picked by the reward model) and
       PPO: proxy (reward model) and gold (oracle) scores, KL to SFT, RM accuracy on the samples
    6. report.md, report.png and summary.json; the targets printed with PASS / MISS

Every stage goes through the same public API a user calls on their own models (`train_sft`,
`train_reward_model`, `PPOTrainer`, `evaluate_policy`), so the demo is also their worked example.
The run is deterministic for a seed on CPU at a fixed thread count: every stage is seeded, and the
data order is a pure function of the seed.
"""

from __future__ import annotations

import os
import sys

from ppo.host_cpu import others_keep_a_core_busy

# Before torch loads OpenMP, which reads this once. An idle OpenMP thread spins, waiting for the
# next op: right on a quiet machine (the demo's thousands of tiny ops per step). When another
# process holds a core, a spinning thread waits out a scheduler slice per op instead. Measured, a
# PPO step of the demo with 2 threads: quiet 1.2 s spinning vs 2.6 s sleeping; one core busy 14 s
# spinning vs 2.3 s sleeping. So sleep only when the machine is busy at start (or when told to);
# once torch is loaded (the demo imported by a program) the setting would come too late.
if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ and others_keep_a_core_busy():
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ppo.config import DemoConfig, PPOConfig, RewardConfig, SFTConfig, config_to_dict, save_config

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


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run steps 1-6 of the module docstring; returns the summary (also written as summary.json)."""
    from ppo.demo.report import check_targets, write_report
    from ppo.demo.task import DemoTask, make_splits
    from ppo.demo.tiny import TinyModelSpec, build_policy, build_tokenizer

    out = prepare_output_dir(config)
    torch.set_num_threads(config.threads)
    quiet_transformers()
    plan, timer = plan_demo(config), StageTimer()
    # 1. task, splits, tokenizer and the from-scratch base model
    with timer("1 data + base model"):
        task = DemoTask()
        splits = make_splits(task, config.seed, plan.n_sft, plan.n_pref, plan.n_ppo, plan.n_eval)
        tokenizer = build_tokenizer(task.vocabulary())
        spec = TinyModelSpec(config.hidden_size, config.num_layers, intermediate_multiple=config.intermediate_multiple)
        policy = build_policy(tokenizer, spec, seed=config.seed)
        policy.save_pretrained(out / "base")
        tokenizer.save_pretrained(out / "base")
    # 2. SFT on the sloppy demonstrations (the model object is trained in place)
    with timer("2 SFT"):
        sft_metrics = run_sft(config, plan, policy, tokenizer, splits["sft"], out)
    # 3. the reward model, started from the SFT policy
    with timer("3 reward model"):
        reward_model, rm_metrics = run_reward(config, plan, policy, tokenizer, task, splits["preference"], out)
    # 4. PPO from a fresh copy of the SFT policy; the in-memory SFT model is the frozen reference
    with timer("4 PPO"):
        refresh = RewardRefresh(config, plan, reward_model, tokenizer, task, rm_metrics.pop("rows"), out)
        history = run_ppo(config, plan, policy, tokenizer, reward_model, splits["ppo"], out, refresh)
        rm_metrics["refresh"] = refresh.result
        if refresh.result:  # the reward model PPO ended with, the one evaluation uses
            rm_metrics.update(
                accuracy_initial=rm_metrics["accuracy"],
                **{k: v for k, v in refresh.result.items() if k.startswith("accuracy_")},
            )
            rm_metrics["accuracy"] = refresh.result["accuracy_all"]
        ppo_policy = load_policy(out / "ppo" / "final")
    # 5. held-out evaluation of SFT, best-of-n from SFT and PPO
    with timer("5 evaluation"):
        results = evaluate_all(config, policy, ppo_policy, tokenizer, reward_model, splits["eval"], task.pair_margin)
    # 6. the report and the targets
    with timer("6 report"):
        summary = {
            "config": config_to_dict(config),
            "plan": asdict(plan),
            "sft": {k: sft_metrics[k] for k in ("final_loss", "steps", "train_rows")},
            "reward": {
                k: rm_metrics.get(k)
                for k in (
                    "accuracy",
                    "accuracy_task",
                    "accuracy_policy",
                    "accuracy_initial",
                    "refresh",
                    "steps",
                    "train_rows",
                    "eval_rows",
                    "policy_pairs",
                )
            },
            "ppo": {"steps": len(history), "history": history},
            "eval": {name: {k: v for k, v in r.items() if k != "generations"} for name, r in results.items()},
            "samples": sample_table(results, config.report_samples),
            "times": dict(timer.seconds),  # stages 1-5; the report takes well under a second
        }
        summary["targets"] = check_targets(summary)
        write_report(out, summary)
    summary["times"] = dict(timer.seconds)
    summary["targets"] = check_targets(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


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


class StageTimer:
    """Wall-clock seconds per numbered stage, printed as each one ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                print(f"\n== step {name} ==", flush=True)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds.pop("total", None)  # kept last
                timer.seconds[name] = time.perf_counter() - self.t0
                timer.seconds["total"] = time.perf_counter() - timer._start
                if exc[0] is None:
                    print(f"   step {name}: {timer.seconds[name]:.1f} s", flush=True)

        return _Stage()


# ----------------------------------------------------------------------------------------------
# The stages (each a call of the public API with the demo's settings)
# ----------------------------------------------------------------------------------------------


def run_sft(config: DemoConfig, plan: DemoPlan, policy, tokenizer, rows, out: Path) -> dict:
    from ppo.sft_stage import train_sft

    sft_config = SFTConfig(
        output_dir=str(out / "sft"),
        learning_rate=config.sft_learning_rate,
        batch_size=config.sft_batch_size,
        num_epochs=plan.sft_epochs,
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        seed=config.seed,
        logging_steps=10,
        progress_bar=config.progress_bar,
        max_length=64,
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
    rm_config = RewardConfig(
        output_dir=str(out / "reward"),
        init_from_policy=True,
        learning_rate=config.reward_learning_rate,
        batch_size=config.reward_batch_size,
        num_epochs=plan.reward_epochs,
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        eval_fraction=0.0,
        seed=config.seed,
        logging_steps=10,
        progress_bar=config.progress_bar,
        max_length=64,
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


def ppo_config(config: DemoConfig, plan: DemoPlan, out: Path) -> PPOConfig:
    rollout = plan.ppo_batch_size * config.num_generations  # `quick` shrinks the batch below the mini-batch
    mini_batch = None if config.ppo_mini_batch_size is None else min(config.ppo_mini_batch_size, rollout)
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


def sample_table(results: dict[str, dict], n: int) -> list[dict]:
    """The first `n` held-out prompts with the SFT and PPO samples and their gold scores."""
    rows = []
    for sft, ppo in list(zip(results["sft"]["generations"], results["ppo"]["generations"]))[:n]:
        rows.append(
            {
                "prompt": sft["prompt"],
                "ideal": sft.get("answer"),
                "sft": sft["completion"],
                "sft_gold": sft["gold_reward"],
                "ppo": ppo["completion"],
                "ppo_gold": ppo["gold_reward"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """`ppo-rlhf demo [--config demo.yaml] key=value ...`; returns the exit code."""
    from ppo.demo.report import format_targets
    from ppo.stage import run_cli

    def demo(config: DemoConfig) -> dict:
        summary = run_demo(config)
        print(format_targets(summary))
        return {"steps": summary["ppo"]["steps"], "output_dir": config.output_dir, "summary": summary}

    def line(metrics: dict) -> str:
        ev = metrics["summary"]["eval"]
        sft, ppo = ev["sft"]["rewards/gold_reward"], ev["ppo"]["rewards/gold_reward"]
        return f"gold SFT {sft:.1f} -> PPO {ppo:.1f}, report.md written"

    return run_cli("demo", DemoConfig, demo, argv, line)


if __name__ == "__main__":
    sys.exit(main())
