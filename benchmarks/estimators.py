"""PPO-GAE, GRPO, RLOO and REINFORCE++ side by side on the demo task, with the same budget of samples.

    python benchmarks/estimators.py --out /tmp/estimators                # the full demo, ~30-40 min on 2 cores
    python benchmarks/estimators.py --out /tmp/est --quick               # smoke sizes, a few minutes

Each estimator is one `ppo-rlhf demo` run (`advantage_estimator=...`) in a process of its own: the
same seed, so the same base model, SFT policy and reward model, then PPO with the same number of
steps and of sampled responses per step (prompts x num_generations; the group estimators need
several samples per prompt, GAE and REINFORCE++ take one sample of more prompts). Recorded per run,
for the PPO stage alone: wall time (and the time of every step, for the plot), peak RSS (the
kernel's high-water mark, reset when PPO starts: `/proc/self/clear_refs`), the sampled tokens, and
the held-out gold score (the hidden oracle) of the SFT policy and of the PPO policy. Writes
`estimators.md` (the table) and `estimators.png` (gold score of the training samples against wall
time) in --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# (estimator, prompts per step, samples per prompt): 64 sampled responses per step in every row.
RUNS = [("gae", 64, 1), ("grpo", 16, 4), ("rloo", 16, 4), ("reinforce_pp", 64, 1)]
QUICK_RUNS = [(name, 8, 2) for name in ("gae", "grpo", "rloo", "reinforce_pp")]  # quick mode fixes 8 prompts


def child(out: Path, overrides: list[str]) -> None:
    """One demo run; PPO's steps timed and its peak RSS measured from the start of the PPO stage."""
    import ppo.demo.run as demo
    from ppo.trainer import PPOTrainer

    record: dict = {"step_end_s": []}
    step, run_ppo = PPOTrainer.step, demo.run_ppo

    def timed_step(self, *args, **kwargs):
        stats = step(self, *args, **kwargs)
        record["step_end_s"].append(time.perf_counter() - record["start"])
        record.setdefault("sampled_tokens", 0)
        record["sampled_tokens"] += int(stats["response_length"] * len(stats["generated_texts"]))
        record["trainable_params"] = sum(p.numel() for o in self.optimizers.values() for g in o.param_groups for p in g["params"])
        return stats

    def measured_ppo(*args, **kwargs):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the PPO stage alone
        record["start"] = time.perf_counter()
        history = run_ppo(*args, **kwargs)
        record["ppo_s"] = time.perf_counter() - record["start"]
        record["peak_rss_mib"] = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))) / 1024
        return history

    PPOTrainer.step, demo.run_ppo = timed_step, measured_ppo
    code = demo.main([f"output_dir={out}", "overwrite=true", "progress_bar=false", *overrides])
    (out / "estimator_run.json").write_text(json.dumps(record))
    sys.exit(code)


def row(name: str, prompts: int, gens: int, out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "estimator_run.json").read_text())
    ev = summary["eval"]
    return {"estimator": name, "samples": f"{prompts} x {gens}", "steps": summary["ppo"]["steps"],
            "sampled_tokens": run["sampled_tokens"], "gold_sft": ev["sft"]["rewards/gold_reward"],
            "gold_ppo": ev["ppo"]["rewards/gold_reward"], "proxy_ppo": ev["ppo"]["rewards/reward_model"],
            "kl": ev["ppo"]["kl"], "ppo_s": run["ppo_s"], "peak_rss_mib": run["peak_rss_mib"],
            "trainable_params": run["trainable_params"],
            "curve": list(zip(run["step_end_s"], [h["gold"] for h in summary["ppo"]["history"]]))}


def table(rows: list[dict]) -> str:
    lines = ["| estimator | prompts x samples | sampled tokens | held-out gold: SFT -> after | proxy (RM) | KL to SFT | PPO wall s | PPO peak RSS MiB | trained params |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['samples']} | {r['sampled_tokens']} | {r['gold_sft']:.1f} -> **{r['gold_ppo']:.1f}** | "
                     f"{r['proxy_ppo']:.2f} | {r['kl']:.2f} | {r['ppo_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['trainable_params']:,} |")
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
    parser.add_argument("--quick", action="store_true", help="the demo's smoke sizes (checks the pipeline, not tuned to learn)")
    parser.add_argument("--estimators", default="gae,grpo,rloo,reinforce_pp")
    parser.add_argument("--kl-in-loss", action="store_true", help="KL in the policy loss instead of the reward (every row)")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()  # extra: demo overrides (key=value) for every run
    if args.child is not None:
        child(args.out, args.child)
    wanted = args.estimators.split(",")
    rows = []
    for name, prompts, gens in [r for r in (QUICK_RUNS if args.quick else RUNS) if r[0] in wanted]:
        out = args.out / name
        overrides = [f"advantage_estimator={name}", f"ppo_batch_size={prompts}", f"num_generations={gens}",
                     f"quick={str(args.quick).lower()}", f"kl_in_loss={str(args.kl_in_loss).lower()}", *extra]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        print(f"== {name}: {' '.join(overrides)}", flush=True)
        subprocess.run([sys.executable, __file__, "--out", str(out), "--child", *overrides], check=True, env=env)
        rows.append(row(name, prompts, gens, out))
    text = table(rows)
    (args.out / "estimators.md").write_text(f"`python benchmarks/estimators.py {' '.join(sys.argv[1:])}`\n\n{text}\n")
    (args.out / "estimators.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "estimators.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
