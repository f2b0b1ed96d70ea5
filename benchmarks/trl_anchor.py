"""The TRL 1.12 anchor: its virtual environment, its bench script, and its results in our shape.

TRL's PPO runs in a virtual environment of its own (TRL 1.13+ has no PPO trainer, and its
dependency pins must not touch ours). Where the environment lives, in order:
  1. $PPO_BENCH_TRL_VENV;
  2. `.venv-trl` at the repository root;
  3. `.venv-trl` next to the repository (beside `../shared`, where the bench script lives);
and when none holds a working trl==1.12.0 it is created at the first of 1-2 (`ensure_venv`).
The bench script is `../shared/bench/trl_ppo_bench.py` relative to the repository root, or
$PPO_BENCH_TRL_SCRIPT.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_VERSION = "1.12.0"
TORCH_VERSION = "2.13.0"
# Where torch comes from is the machine's pip configuration, as for the README's install command (here
# a local CPU wheel; an index may be unreachable). Where the default index would pull CUDA libraries,
# PPO_BENCH_TORCH_INDEX=https://download.pytorch.org/whl/cpu names the CPU one.
TORCH_INDEX = os.environ.get("PPO_BENCH_TORCH_INDEX")


def bench_script() -> Path:
    script = Path(os.environ.get("PPO_BENCH_TRL_SCRIPT", REPO.parent / "shared" / "bench" / "trl_ppo_bench.py"))
    if not script.is_file():
        raise SystemExit(
            f"TRL bench script not found at {script}.\n"
            "It lives in the shared folder beside the repository (../shared/bench/trl_ppo_bench.py); "
            "set PPO_BENCH_TRL_SCRIPT to its path, or run without --vs trl."
        )
    return script


def venv_candidates() -> list[Path]:
    if os.environ.get("PPO_BENCH_TRL_VENV"):
        return [Path(os.environ["PPO_BENCH_TRL_VENV"])]
    return [REPO / ".venv-trl", REPO.parent / ".venv-trl"]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def has_trl(venv: Path) -> bool:
    """True when the venv's python imports trl at exactly TRL_VERSION with its PPO trainer."""
    python = venv_python(venv)
    if not python.exists():
        return False
    check = f"import trl, trl.experimental.ppo; assert trl.__version__ == {TRL_VERSION!r}, trl.__version__"
    return subprocess.run([str(python), "-c", check], check=False, capture_output=True).returncode == 0


def create_venv(venv: Path) -> None:
    """`python -m venv`, torch, trl, then trl pinned back to the last release with a PPO trainer."""
    print(f"[trl] creating {venv} (torch {TORCH_VERSION} CPU, trl {TRL_VERSION}); this downloads ~1 GiB", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv_python(venv)), "-m", "pip", "install", "--upgrade", "pip"],
        [str(venv_python(venv)), "-m", "pip", "install", f"torch=={TORCH_VERSION}"]
        + (["--index-url", TORCH_INDEX] if TORCH_INDEX else []),
        # `pip install trl` resolves trl's dependencies (accelerate, datasets, ...) at versions that
        # work with this torch; the pinned reinstall then swaps in the trl code that has PPO.
        [str(venv_python(venv)), "-m", "pip", "install", "trl"],
        [str(venv_python(venv)), "-m", "pip", "install", "--force-reinstall", "--no-deps", f"trl=={TRL_VERSION}"],
    ]
    for cmd in steps:
        print("[trl] $ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            raise SystemExit(
                f"[trl] failed: {' '.join(cmd)}\nFix the error above, or point PPO_BENCH_TRL_VENV at a working venv."
            )
    if not has_trl(venv):
        raise SystemExit(f"[trl] {venv} was created but does not import trl=={TRL_VERSION} with trl.experimental.ppo")


def ensure_venv(force_setup: bool = False) -> Path:
    """The venv to run TRL in, created when none works (or when `force_setup`)."""
    candidates = venv_candidates()
    if not force_setup:
        for venv in candidates:
            if has_trl(venv):
                return venv
    target = candidates[0]
    if not has_trl(target):
        create_venv(target)
    return target


def command(
    venv: Path, trl_args: list[str], iters: int, warmup: int, threads: int, seed: int, output_dir: str
) -> list[str]:
    return [
        str(venv_python(venv)),
        str(bench_script()),
        *trl_args,
        "--iters",
        str(iters),
        "--warmup",
        str(warmup),
        "--threads",
        str(threads),
        "--seed",
        str(seed),
        "--output-dir",
        output_dir,
    ]


def normalise(result: dict) -> dict:
    """A trl_ppo_bench RESULT_JSON in the shape of ppo_bench's: per-iteration generate / score /
    update seconds, where TRL's "score" is its rollout minus generation (ref, value and reward
    forwards plus GAE; TRL takes the policy's log-probs from generation itself)."""
    measured = result["iters"][result["warmup_iters"] :]
    iters = [
        {
            "total_s": r["total_s"],
            "generate_s": r["gen_s"],
            "score_s": r["rollout_s"] - r["gen_s"],
            "update_s": r["update_s"],
            "rollout_s": r["rollout_s"],
            "other_cpu_s": r["other_cpu_s"],
            "own_cpu_s": r["own_cpu_s"],
            "gc_collect_s": r["gc_collect_s"],
        }
        for r in measured
    ]
    return {
        "system": "TRL " + result["versions"]["trl"],
        "precision": "fp32",  # its bf16 flag is ignored by PPO in TRL 1.12 (BENCHMARKS.md)
        "measured": iters,
        "peak_rss_mib": result["peak_rss_mib"],
        "flops_per_iter": result["flops_per_iter"],
        "tokens_per_iter": result["tokens_per_iter"],
        "versions": result["versions"],
        "optimizer_steps_per_iter": result["optimizer_steps_per_iter"],
    }
