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

Each stage is a function of `ppo.demo.stages` that goes through the same public API a user calls on
their own models (`train_sft`, `train_reward_model`, `PPOTrainer`, `evaluate_policy`), so the demo
is also their worked example.
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
import time
from dataclasses import asdict
from typing import Any

import torch

from ppo.config import DemoConfig, config_to_dict
from ppo.demo.stages import (
    RewardRefresh,
    evaluate_all,
    load_policy,
    plan_demo,
    prepare_output_dir,
    quiet_transformers,
    run_ppo,
    run_reward,
    run_sft,
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
