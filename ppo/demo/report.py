"""The demo's report: the targets of issue 3, report.md (tables, samples) and report.png (curves).

Everything here reads the summary dict that `ppo.demo.run.run_demo` builds; nothing trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# The targets of the demo (issue 3). Time is measured, never asserted in tests.
TIME_LIMIT_S = 600.0
TIME_AIM_S = 300.0
RM_ACCURACY = 0.90
GOLD_GAIN = 25.0

CURVES = (  # (history key, title) of each panel of report.png
    ("proxy", "proxy reward (reward model)"),
    ("gold", "gold score (oracle, 0-100)"),
    ("kl", "KL to SFT (nats per response)"),
    ("entropy", "entropy (nats per token)"),
    ("response_length", "response length (tokens)"),
)


def _policies(summary: dict) -> list[tuple[str, str, dict]]:
    """(key, label, eval result) for SFT, best-of-n and PPO, in table order."""
    ev = summary["eval"]
    bon = next(k for k in ev if k.startswith("best_of_"))
    return [("sft", "SFT (sampled)", ev["sft"]), (bon, f"best-of-{bon.split('_')[-1]} from SFT", ev[bon]),
            ("ppo", "PPO", ev["ppo"])]


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _gold(result: dict) -> float:
    return result["rewards/gold_reward"]


def kl_to_sft(result: dict) -> float:
    """KL to SFT of one policy's row: the measured per-sample KL, plus for best-of-n the analytic
    log(n) - (n-1)/n that the selection adds (the sampling policy itself is SFT: measured KL 0)."""
    return result.get("kl", 0.0) + result.get("kl_best_of_n", 0.0)


def check_targets(summary: dict) -> list[dict[str, Any]]:
    """One {name, value, target, passed} per target of issue 3."""
    (_, _, sft), (_, bon_label, bon), (_, _, ppo) = _policies(summary)
    total = summary["times"].get("total", float("nan"))
    rm_acc = summary["reward"]["accuracy"]
    return [
        {"name": "whole demo time", "value": f"{total:.0f} s", "target": f"<= {TIME_LIMIT_S:.0f} s (aim {TIME_AIM_S:.0f} s)",
         "passed": total <= TIME_LIMIT_S},
        {"name": "reward model held-out pairwise accuracy", "value": f"{rm_acc:.1%}", "target": f">= {RM_ACCURACY:.0%}",
         "passed": rm_acc is not None and rm_acc >= RM_ACCURACY},
        {"name": "PPO gold - SFT gold", "value": f"{_gold(ppo) - _gold(sft):+.1f}", "target": f">= +{GOLD_GAIN:.0f}",
         "passed": _gold(ppo) - _gold(sft) >= GOLD_GAIN},
        {"name": f"PPO gold vs {bon_label} gold", "value": f"{_gold(ppo):.1f} vs {_gold(bon):.1f}", "target": "PPO higher",
         "passed": _gold(ppo) > _gold(bon)},
        {"name": "PPO KL to SFT reported", "value": f"{ppo['kl']:.3f} nats", "target": "finite",
         "passed": math.isfinite(ppo["kl"])},
    ]


def format_targets(summary: dict) -> str:
    """The closing block of the demo: time per stage, the results table, the targets."""
    lines = ["", "== wall time per stage =="]
    lines += [f"  {name:<22} {seconds:7.1f} s" for name, seconds in summary["times"].items()]
    lines += ["", f"== held-out evaluation ({summary['plan']['n_eval']} prompts) ==", _text_table(summary), ""]
    lines.append("== targets (issue 3) ==")
    for t in summary["targets"]:
        lines.append(f"  [{'PASS' if t['passed'] else 'MISS'}] {t['name']}: {t['value']} (target {t['target']})")
    if summary["config"].get("quick"):
        lines.append("  (quick run: a smoke test of the pipeline, not tuned to reach the targets)")
    return "\n".join(lines)


def _rows(summary: dict) -> list[list[str]]:
    rows = []
    for _, label, r in _policies(summary):
        agree = r.get("rm_accuracy")
        rows.append([label, f"{r['rewards/reward_model']:.2f}", f"{_gold(r):.1f}", f"{kl_to_sft(r):.3f}",
                     "n/a" if agree is None else f"{agree:.1%}", f"{r.get('accuracy', float('nan')):.1%}",
                     f"{r['response_length']:.2f}"])
    return rows


HEADER = ["policy", "proxy (RM)", "gold (0-100)", "KL to SFT", "RM accuracy on its samples", "exact match", "length"]


def _text_table(summary: dict) -> str:
    rows = [HEADER] + _rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]


def write_report(out: Path, summary: dict) -> None:
    """output_dir/report.md and output_dir/report.png."""
    plot_curves(summary["ppo"]["history"], out / "report.png")
    (out / "report.md").write_text(markdown(summary), encoding="utf-8")


def markdown(summary: dict) -> str:
    from ppo.demo.task import DemoTask, describe

    rm = summary["reward"]
    lines = ["# ppo-rlhf demo report", "", describe(DemoTask()), "",
             "Pipeline: SFT on the demonstrations -> reward model on oracle-labelled pairs (started from the SFT "
             "policy) -> PPO against the reward model. The oracle (gold) is never used for training.", "",
             "## Results on held-out prompts", "",
             f"Reward model held-out pairwise accuracy: {rm['accuracy']:.1%} on {rm['eval_rows']} pairs of held-out prompts "
             f"(task pairs {_pct(rm['accuracy_task'])}, pairs of SFT samples {_pct(rm['accuracy_policy'])}); trained on "
             f"{rm['train_rows']} pairs.", ""]
    if rm.get("refresh"):
        ref = rm["refresh"]
        lines[-1:] = [f"Online round: after {summary['config']['refresh_at']:.0%} of the PPO steps the labeller compared "
                      f"samples of the PPO policy; the reward model trained on {ref['pairs']} such pairs plus "
                      f"{ref['replayed']} replayed ones (held-out accuracy {_pct(rm.get('accuracy_initial'))} before, "
                      f"{_pct(rm['accuracy'])} after; the evaluation uses this reward model).", ""]
    lines += _md_table(HEADER, _rows(summary))
    lines += ["", "- proxy: the reward model's score; gold: the oracle's 0-100 score; every policy sampled at the "
              "PPO temperature on the same prompts.",
              "- KL to SFT: mean over samples of the summed log pi - log pi_SFT of the response tokens; for best-of-n "
              "the analytic log(n) - (n-1)/n of the selection.",
              "- RM accuracy on its samples: share of sample pairs (gold gap >= the task's pair margin) that the reward "
              "model orders as the oracle does; a drop for PPO would be reward hacking.", "",
              "## Targets", ""]
    lines += _md_table(["target", "value", "goal", ""], [[t["name"], t["value"], t["target"], "PASS" if t["passed"] else "MISS"]
                                                         for t in summary["targets"]])
    lines += ["", "## PPO training", "", "![curves](report.png)", ""]
    hist = summary["ppo"]["history"]
    if hist:
        first, last = hist[0], hist[-1]
        lines += [f"Over {len(hist)} steps: proxy {first['proxy']:.2f} -> {last['proxy']:.2f}, gold {first['gold']:.1f} -> "
                  f"{last['gold']:.1f}, KL {first['kl']:.3f} -> {last['kl']:.3f}, entropy {first['entropy']:.3f} -> "
                  f"{last['entropy']:.3f}.", ""]
    lines += ["## Sample generations (held-out prompts, before and after PPO)", ""]
    lines += _md_table(["prompt", "ideal", "SFT", "gold", "PPO", "gold"],
                       [[s["prompt"], s["ideal"], s["sft"], f"{s['sft_gold']:.0f}", s["ppo"], f"{s['ppo_gold']:.0f}"]
                        for s in summary["samples"]])
    lines += ["", "## Wall time", ""]
    lines += _md_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in summary["times"].items()])
    return "\n".join(lines) + "\n"


def plot_curves(history: list[dict], path: Path) -> None:
    """Five panels against PPO step: proxy reward, gold, KL, entropy, response length."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, no GUI backend imported
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    steps = [h["step"] for h in history]
    for ax, (key, title) in zip(axes, CURVES):
        ax.plot(steps, [h[key] for h in history], lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
