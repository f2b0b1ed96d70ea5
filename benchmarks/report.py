"""Turning benchmark runs into rows and the markdown table the README pastes.

A "run" is one process: one system on one workload at one precision, with its measured
iterations. Rows pool the measured iterations of every repeat of the same (workload, system,
precision), so `--repeats 3 --iters 3` gives medians over 9 iterations.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

PHASES = ("generate", "score", "update")
PEAK_DTYPE = {"fp32": "float32", "fp32-onednn": "float32-onednn", "bf16": "bfloat16"}


def matmul_peaks(runs: list[dict]) -> dict[str, float]:
    """Median over the runs of each dtype's measured matmul GFLOP/s (each ppo-rlhf run measures)."""
    samples = defaultdict(list)
    for run in runs:
        for dtype, peak in run.get("matmul_peak", {}).items():
            samples[dtype].append(peak["gflops_median"])
    return {dtype: statistics.median(values) for dtype, values in samples.items()}


def aggregate(runs: list[dict], peaks: dict[str, float]) -> list[dict]:
    """One row per (workload, system, precision), in the order the runs first appeared."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["workload"], run["system"], run["precision"]), []).append(run)
    rows = []
    for (workload, system, precision), group in groups.items():
        ok = [run for run in group if not run.get("error")]
        if not ok:
            rows.append({"workload": workload, "system": system, "precision": precision, "error": group[0]["error"]})
            continue
        iters = [it for run in ok for it in run["measured"]]
        iter_s = statistics.median(it["total_s"] for it in iters)
        row = {
            "workload": workload,
            "system": system,
            "precision": precision,
            "iterations": len(iters),
            "iter_s": iter_s,
            "iter_s_min": min(it["total_s"] for it in iters),
            "iter_s_max": max(it["total_s"] for it in iters),
            **{f"{phase}_s": statistics.median(it[f"{phase}_s"] for it in iters) for phase in PHASES},
            "rollout_s": statistics.median(it["generate_s"] + it["score_s"] for it in iters),
            # CPU seconds this process used per iteration: less sensitive to a busy machine than wall
            # time with 1 thread; with more, threads spinning at barriers while starved inflate it.
            "cpu_s": statistics.median(it["own_cpu_s"] for it in iters),
            "tokens_per_s": ok[0]["tokens_per_iter"] / iter_s,
            "peak_rss_mib": max(run["peak_rss_mib"] for run in ok),
            # cores' worth of CPU that other processes used while we measured: the noise indicator
            "others_cores": statistics.median(it["other_cpu_s"] / it["total_s"] for it in iters),
            "gflops": ok[0]["flops_per_iter"] / iter_s / 1e9,
        }
        peak = peaks.get(PEAK_DTYPE[precision])
        row["peak_gflops"] = peak
        row["fraction_of_peak"] = row["gflops"] / peak if peak else None
        splits = [run["matmul_split"] for run in ok if run.get("matmul_split")]
        if splits:
            row["matmul_split"] = pooled_split(splits, row)
        rows.append(row)
    add_ratios(rows)
    return rows


def pooled_split(splits: list[dict], row: dict) -> dict:
    """Per phase, the median over runs of each --split-matmul figure (profile_phases.split_step),
    and other_s = the row's phase time - matmul_s - attention_s (the three add up to it)."""
    pooled = {}
    for phase in PHASES:
        keys = [key for key in splits[0][phase] if key not in ("phase_s", "other_s")]
        piece = {key: statistics.median(split[phase][key] for split in splits) for key in keys}
        piece["phase_s"] = row[f"{phase}_s"]
        piece["other_s"] = piece["phase_s"] - piece["matmul_s"] - piece["attention_s"]
        pooled[phase] = piece
    return pooled


def add_ratios(rows: list[dict]) -> None:
    """ppo-rlhf / TRL for s/iteration, rollout, update and peak RSS (< 1: ppo-rlhf is better)."""
    anchors = {row["workload"]: row for row in rows if row["system"].startswith("TRL") and "error" not in row}
    for row in rows:
        anchor = anchors.get(row["workload"])
        if anchor is None or row is anchor or "error" in row:
            continue
        row["vs_trl"] = {
            key: row[key] / anchor[key] for key in ("iter_s", "rollout_s", "update_s", "peak_rss_mib", "cpu_s")
        }


COLUMNS = [
    "workload",
    "system",
    "precision",
    "s/iter median [min–max]",
    "generate s",
    "score s",
    "update s",
    "CPU s/iter",
    "tokens/s",
    "peak RSS MiB",
    "GFLOP/s (% peak)",
    "others' load",
    "÷TRL s/iter",
    "÷TRL rollout",
    "÷TRL update",
    "÷TRL RSS",
    "÷TRL CPU s",
]


def _cells(row: dict) -> list[str]:
    head = [row["workload"], row["system"], row["precision"]]
    if "error" in row:
        return head + [f"not run: {row['error']}"] + [""] * (len(COLUMNS) - 4)
    pct = f" ({row['fraction_of_peak']:.0%})" if row.get("fraction_of_peak") is not None else ""
    ratios = row.get("vs_trl")
    ratio_cells = (
        [f"{ratios[k]:.2f}x" for k in ("iter_s", "rollout_s", "update_s", "peak_rss_mib", "cpu_s")]
        if ratios
        else ["–"] * 5
    )
    return head + [
        f"{row['iter_s']:.3f} [{row['iter_s_min']:.3f}–{row['iter_s_max']:.3f}]",
        f"{row['generate_s']:.3f}",
        f"{row['score_s']:.3f}",
        f"{row['update_s']:.3f}",
        f"{row['cpu_s']:.2f}",
        f"{row['tokens_per_s']:.0f}",
        f"{row['peak_rss_mib']:.0f}",
        f"{row['gflops']:.1f}{pct}",
        f"{row['others_cores']:.2f} cores",
        *ratio_cells,
    ]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


SPLIT_COLUMNS = [
    "workload",
    "system",
    "precision",
    "phase",
    "phase s",
    "matmul s",
    "attention s",
    "other s",
    "matmul share",
    "matmul calls",
    "instrumented phase s",
]


def split_table(rows: list[dict]) -> str:
    """The --split-matmul table: per row and phase, its measured time, the seconds inside matrix
    products and fused attention kernels (timed in one instrumented iteration), and the rest;
    "" when no row has a split."""
    lines = []
    for row in rows:
        for phase, p in (row.get("matmul_split") or {}).items():
            cells = [
                row["workload"],
                row["system"],
                row["precision"],
                phase,
                f"{p['phase_s']:.3f}",
                f"{p['matmul_s']:.3f}",
                f"{p['attention_s']:.3f}",
                f"{p['other_s']:.3f}",
                f"{p['matmul_s'] / p['phase_s']:.0%}" if p["phase_s"] > 0 else "–",
                f"{p['matmul_calls']:.0f}",
                f"{p['timed_phase_s']:.3f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ["| " + " | ".join(SPLIT_COLUMNS) + " |", "|" + "|".join(" --- " for _ in SPLIT_COLUMNS) + "|"]
    return "\n".join(head + lines)


def split_summary(split: dict[str, dict]) -> str:
    """A few lines of text: per phase, matmul / attention / other seconds and their shares."""
    lines = []
    for phase, p in split.items():
        total = p["phase_s"] or 1.0
        lines.append(
            f"{phase:<8} {p['phase_s']:8.3f} s: matmul {p['matmul_s']:.3f} s ({p['matmul_s'] / total:.0%}, "
            f"{p['matmul_calls']} calls), attention {p['attention_s']:.3f} s ({p['attention_s'] / total:.0%}), "
            f"other {p['other_s']:.3f} s ({p['other_s'] / total:.0%}); instrumented: {p['timed_phase_s']:.3f} s"
        )
    return "\n".join(lines)


def machine_line(machine: dict, peaks: dict[str, float], load_start, load_end) -> str:
    flags = ", ".join(machine.get("cpu_flags") or []) or "none of avx2/avx512f/avx512_bf16/amx_bf16"
    versions = ", ".join(f"{name} {machine[name]}" for name in ("torch", "transformers", "trl") if machine.get(name))
    peak_txt = ", ".join(f"{dtype} {value:.1f}" for dtype, value in sorted(peaks.items())) or "not measured"

    def fmt(load):
        return "/".join(f"{x:.2f}" for x in load)

    return (
        f"Machine: {machine['cpu']} ({flags}), {machine['logical_cpus']} logical CPUs, {machine['threads']} "
        "threads per run; "
        f"{versions}. Matmul peak (GFLOP/s, {machine['threads']} threads): {peak_txt}. "
        f"Load average (1/5/15 min) at start {fmt(load_start)}, at end {fmt(load_end)}."
    )
