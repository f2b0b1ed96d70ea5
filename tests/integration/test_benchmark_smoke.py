"""`benchmarks/run.py --smoke` end to end: a subprocess per run, the table, the JSON record.

No timing thresholds: the machine running the tests may be busy. We check that the benchmark runs,
prints its table and records a positive time for every phase, and that the matmul split
(`--split-matmul`, on in a smoke run) times every product, forward and backward, inside its phase.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from profile_phases import MatmulClock, op_kind  # noqa: E402


def linears_per_forward(params: dict) -> int:
    """Products of one forward of a smoke / stand-in model: 7 per decoder layer (q, k, v, o, gate,
    up, down) and the LM or score head."""
    return 7 * params["layers"] + 1


def check_matmul_split(split: dict, phase_s: dict, params: dict) -> None:
    """The split's contract, for one run or row: positive pieces, the timed ones fitting inside the
    instrumented phase they were timed in, and matmul + attention + other = the measured phase time.
    The calls: one product per linear layer per forward (generation: the prompt and R - 1 decode
    steps), three per linear in the update (the forward, then the input and the weight gradients):
    a product missed or counted twice fails."""
    for phase in ("generate", "score", "update"):
        piece = split[phase]
        for key in ("matmul_s", "attention_s", "other_s"):
            assert piece[key] > 0, (phase, key, piece)
        assert piece["matmul_s"] + piece["attention_s"] < piece["timed_phase_s"], (phase, piece)
        assert math.isclose(piece["phase_s"], phase_s[phase], rel_tol=1e-9), (phase, piece, phase_s)
        parts = piece["matmul_s"] + piece["attention_s"] + piece["other_s"]
        assert math.isclose(parts, phase_s[phase], rel_tol=1e-6), (phase, piece)
        assert piece["ops"] > piece["matmul_calls"] + piece["attention_calls"] > 0, (phase, piece)
    per_forward = linears_per_forward(params)
    assert split["generate"]["matmul_calls"] == params["response_len"] * per_forward
    steps = params["ppo_epochs"] * params["mini_batches"]
    assert split["update"]["matmul_calls"] == steps * 2 * 3 * per_forward  # policy and critic


def test_matmul_clock_times_forward_and_backward_products():
    """One linear layer, forward and backward: three products (y = x W^T, dx, dW), each timed, and
    the elementwise work counted but not timed."""
    clock = MatmulClock()
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)
    with clock, clock.in_phase("update"):
        layer(x).relu().sum().backward()
    assert clock.calls["update"]["matmul"] == 3
    assert clock.seconds["update"]["matmul"] > 0
    assert clock.calls["update"]["other"] > 0 and "other" not in clock.seconds["update"]
    assert clock.calls["outside"]["matmul"] == 0
    assert [op_kind(n) for n in ("mm", "_linear_pointwise", "_scaled_dot_product_flash_attention_for_cpu")] == [
        "matmul",
        "matmul",
        "attention",
    ]
    assert op_kind("mul") == op_kind("_softmax") == "other"


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    # One thread: the split sets one instrumented iteration against the measured one, and with two
    # threads on shared cores every product can wait milliseconds at its barrier in one and not the other.
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--threads", "1", "--json-out", str(out)],
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
    assert "Where the time goes (--split-matmul):" in proc.stdout
    assert "| smoke | ppo-rlhf | bf16 | update |" in proc.stdout

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
        check_matmul_split(
            run["matmul_split"], {p: run[f"{p}_s_median"] for p in ("generate", "score", "update")}, params
        )
    for row, run in zip(payload["rows"], payload["runs"]):  # one run per row here
        phases = {p: row[f"{p}_s"] for p in ("generate", "score", "update")}
        check_matmul_split(row["matmul_split"], phases, run["workload_params"])


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


def test_a_row_names_the_bf16_attention_kernels_that_ran():
    """`fp32_attention: auto` may keep torch's bf16 kernels (on a CPU with AMX): the row says so,
    and says nothing where attention ran in fp32."""
    from ppo_bench import attention_switch, system_label

    from ppo.fastpath import fp32_attention

    assert attention_switch("fp32", "sdpa", asked_bf16=False) == ""
    assert attention_switch("bf16", fp32_attention.NAME, asked_bf16=False) == ""
    assert attention_switch("bf16", "sdpa", asked_bf16=False) == "bf16 attention (auto)"
    assert attention_switch("bf16", "sdpa", asked_bf16=True) == "bf16 attention"
    assert attention_switch("bf16", fp32_attention.DECODE_NAME, False) == "bf16 attention outside sampling (auto)"
    label = system_label(2, False, attention="bf16 attention (auto)")
    assert label == "ppo-rlhf, 2 micro-batches, bf16 attention (auto)"
