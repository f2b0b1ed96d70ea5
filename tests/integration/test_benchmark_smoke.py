"""`benchmarks/run.py --smoke` end to end: a subprocess per run, the table, the JSON record.

No timing thresholds: the machine running the tests may be busy. We check that the benchmark runs,
prints its table and records a positive time for every phase.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--json-out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| workload | system | precision |" in proc.stdout
    # fp32 rows name the kernel when `fp32_matmul=auto` took oneDNN on this machine
    assert "| smoke | ppo-rlhf | fp32 |" in proc.stdout or "| smoke | ppo-rlhf | fp32-onednn |" in proc.stdout
    assert "Machine:" in proc.stdout

    payload = json.loads(out.read_text())
    # By default both precisions (the smoke run does bf16 even where it is emulated: toy sizes).
    labels = [(r["system"], r["precision"].replace("fp32-onednn", "fp32")) for r in payload["rows"]]
    assert labels == [("ppo-rlhf", "fp32"), ("ppo-rlhf", "bf16")]
    for row in payload["rows"]:
        assert row["iterations"] == 1
        for key in (
            "iter_s",
            "generate_s",
            "score_s",
            "update_s",
            "rollout_s",
            "tokens_per_s",
            "peak_rss_mib",
            "gflops",
        ):
            assert row[key] > 0, (key, row)
    assert len(payload["runs"]) == 2
    for run in payload["runs"]:
        for iteration in run["iters"]:  # the warm-up too
            for phase in ("generate_s", "score_s", "update_s"):
                assert iteration[phase] > 0, (phase, iteration)
        # Every response ran to its full length, so the token count is exactly B * (P + R).
        params = run["workload_params"]
        assert run["tokens_per_iter"] == params["batch"] * (params["prompt_len"] + params["response_len"])


@pytest.mark.slow
def test_benchmark_memory_switches_get_their_own_row(tmp_path):
    """--micro-batches and --gradient-checkpointing reach the trainer, and the row and the record say so."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run.py"),
            "--smoke",
            "--precision",
            "fp32",
            "--micro-batches",
            "2",
            "--gradient-checkpointing",
            "--json-out",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| smoke | ppo-rlhf, 2 micro-batches, gradient checkpointing |" in proc.stdout
    assert "torch " in proc.stdout.split("Machine:")[1]  # versions come from a labelled row too
    (run,) = json.loads(out.read_text())["runs"]
    assert run["micro_batches"] == 2
    assert run["gradient_checkpointing"] is True
