"""PPO-GAE, GRPO, RLOO and REINFORCE++ side by side on the demo task, with the same budget of samples.

    python benchmarks/estimators.py --out /tmp/estimators                  # the demo's sizes
    python benchmarks/estimators.py --out /tmp/est --quick                 # smoke sizes (not tuned to learn)
    python benchmarks/estimators.py --out /tmp/est ppo_steps=40 n_sft=2000  # any demo option, every run

The demo's stages 1-3 run once (task, base model, SFT, reward model: `ppo.demo.stages`, the
recipe's own steps), then stage 4 (PPO from the SFT policy against the reward model) and the held-out
evaluation once per estimator, each with the same number of steps and of sampled responses per
step (prompts x num_generations: the group estimators need several samples per prompt, GAE and
REINFORCE++ take one sample of more prompts). Recorded per estimator, for the PPO stage alone:
wall time (and each step's, for the plot), peak RSS (the kernel's high-water mark, reset when the
stage starts through /proc/self/clear_refs, after freed heap is handed back), the sampled tokens,
the trained parameters, and the held-out gold score (the hidden oracle, never seen by training)
of the SFT policy and of the trained one. Writes estimators.md (the table), estimators.png (gold
of the training samples against wall time) and estimators.json in --out, and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import sys
import time
from pathlib import Path

# (estimator, prompts per step, samples per prompt): the same 64 sampled responses per step.
RUNS = [("gae", 64, 1), ("grpo", 16, 4), ("rloo", 16, 4), ("reinforce_pp", 64, 1)]


def ppo_stage(config, plan, sft, tokenizer, reward_model, splits, task, out: Path) -> dict:
    """Stage 4 and the evaluation for one estimator (`config.advantage_estimator`)."""
    from ppo.demo import stages as demo
    from ppo.fastpath.host_memory import release_free_memory
    from ppo.trainer import PPOTrainer

    record: dict = {"step_end_s": [], "sampled_tokens": 0}
    step = PPOTrainer.step

    def timed_step(self, *args, **kwargs):
        stats = step(self, *args, **kwargs)
        record["step_end_s"].append(time.perf_counter() - start)
        record["sampled_tokens"] += round(stats["response_length"] * len(stats["generated_texts"]))
        record["trainable_params"] = sum(
            p.numel() for o in self.optimizers.values() for g in o.param_groups for p in g["params"]
        )
        return stats

    shutil.rmtree(out / "ppo", ignore_errors=True)
    gc.collect()
    release_free_memory()  # the previous estimator's freed heap must not count as this one's peak
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    PPOTrainer.step = timed_step
    start = time.perf_counter()
    try:
        history = demo.run_ppo(config, plan, sft, tokenizer, reward_model, splits["ppo"], out)
    finally:
        PPOTrainer.step = step
    record["ppo_s"] = time.perf_counter() - start
    record["peak_rss_mib"] = (
        int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))) / 1024
    )
    trained = demo.load_policy(out / "ppo" / "final")
    record["eval"] = demo.evaluate_all(config, sft, trained, tokenizer, reward_model, splits["eval"], task.pair_margin)
    record["history"] = history
    return record


def row(name: str, config, record: dict) -> dict:
    ev = record["eval"]
    return {
        "estimator": name,
        "samples": f"{config.ppo_batch_size} x {config.num_generations}",
        "steps": len(record["history"]),
        "sampled_tokens": record["sampled_tokens"],
        "gold_sft": ev["sft"]["rewards/gold_reward"],
        "gold_ppo": ev["ppo"]["rewards/gold_reward"],
        "proxy_ppo": ev["ppo"]["rewards/reward_model"],
        "kl": ev["ppo"]["kl"],
        "ppo_s": record["ppo_s"],
        "peak_rss_mib": record["peak_rss_mib"],
        "trainable_params": record["trainable_params"],
        "curve": list(zip(record["step_end_s"], [h["gold"] for h in record["history"]])),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| estimator | prompts x samples per step | sampled tokens | held-out gold: SFT -> trained | RM score | "
        "KL to SFT | PPO wall s | PPO peak RSS MiB | trained params |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['estimator']} | {r['samples']} | {r['sampled_tokens']} | {r['gold_sft']:.1f} -> "
            f"**{r['gold_ppo']:.1f}** | "
            f"{r['proxy_ppo']:.2f} | {r['kl']:.2f} | {r['ppo_s']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['trainable_params']:,} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        seconds, gold = zip(*r["curve"])
        ax.plot(seconds, gold, label=f"{r['estimator']} ({r['samples']})")
    ax.set_xlabel("PPO wall time (s)")
    ax.set_ylabel("gold score of the training samples")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="the demo's smoke sizes: 8 prompts x 2 samples, 3 steps")
    parser.add_argument("--estimators", default="gae,grpo,rloo,reinforce_pp")
    parser.add_argument(
        "--kl-in-loss", action="store_true", help="KL in the policy loss instead of the reward (every run)"
    )
    args, overrides = parser.parse_known_args()  # the rest: demo options (key=value) for every run

    import torch

    from ppo.config import DemoConfig, load_config
    from ppo.demo import stages as demo
    from ppo.demo.task import DemoTask, make_splits
    from ppo.demo.tiny import TinyModelSpec, build_policy, build_tokenizer

    base = load_config(
        DemoConfig,
        overrides=[
            f"output_dir={args.out}",
            "progress_bar=false",
            f"quick={str(args.quick).lower()}",
            f"kl_in_loss={str(args.kl_in_loss).lower()}",
            *overrides,
        ],
    )
    out = demo.prepare_output_dir(dataclasses.replace(base, overwrite=True))
    torch.set_num_threads(base.threads)
    demo.quiet_transformers()
    plan = demo.plan_demo(base)
    # Stages 1-3 of the demo, once: the same SFT policy and reward model for every estimator.
    task = DemoTask()
    splits = make_splits(task, base.seed, plan.n_sft, plan.n_pref, plan.n_ppo, plan.n_eval)
    tokenizer = build_tokenizer(task.vocabulary())
    policy = build_policy(
        tokenizer,
        TinyModelSpec(base.hidden_size, base.num_layers, intermediate_multiple=base.intermediate_multiple),
        seed=base.seed,
    )
    demo.run_sft(base, plan, policy, tokenizer, splits["sft"], out)
    reward_model, _ = demo.run_reward(base, plan, policy, tokenizer, task, splits["preference"], out)
    rows = []
    for name, prompts, gens in [r for r in RUNS if r[0] in args.estimators.split(",")]:
        if args.quick:
            prompts, gens = 8, 2  # quick mode fixes 8 prompts per step
        config = dataclasses.replace(
            base,
            advantage_estimator=name,
            ppo_batch_size=prompts,
            num_generations=gens,
            ppo_mini_batch_size=demo.capped_mini_batch(base.ppo_mini_batch_size, prompts, gens),
        )
        print(f"== {name}: {prompts} prompts x {gens} samples per step", flush=True)
        rows.append(
            row(
                name,
                config,
                ppo_stage(config, demo.plan_demo(config), policy, tokenizer, reward_model, splits, task, out),
            )
        )
        print(table(rows[-1:]), flush=True)
    text = table(rows)
    (out / "estimators.md").write_text(f"`python benchmarks/estimators.py {' '.join(sys.argv[1:])}`\n\n{text}\n")
    (out / "estimators.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "estimators.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
