"""Two ranks equal one process: PPO (DDP and FSDP2), SFT and reward-model training launched with
torchrun on CPU (gloo) end where the same runs end in a single process; checkpoints written by two
ranks resume on two ranks and on one; a rank that crashes or hangs ends the whole run, with a
message naming the rank, well within the timeout.

The runs themselves are in `_worker.py` (its `ppo` docstring explains why the comparison is exact
up to float summation order). Each launch costs a few seconds of start-up, so the runs of one kind
share a launch (module-scoped fixtures) and the tests compare their outputs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("_worker.py")
ROOT = WORKER.parents[2]
ATOL = 1e-5  # fp32; the measured differences are ~1e-7 (float summation order)
EXACT = ("response_length", "eos_fraction", "rewards/words_reward", "ppo_epochs_run")  # functions of the sampled tokens


def launch(
    job: str, out: Path, *args: str, ranks: int = 2, timeout_s: float = 30, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `_worker.py job out args` alone (ranks=1) or under torchrun with `ranks` processes."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}"]
    command = (torchrun if ranks > 1 else [sys.executable]) + [str(WORKER), job, str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TEST_DIST_TIMEOUT_S": str(timeout_s)}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    launch("all", out, ranks=1)
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    launch("all", out, ranks=2)
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def assert_same_metrics(a: Path, b: Path, exact: tuple[str, ...] = ()) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] and ma
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key in exact:
                assert ra[key] == rb[key], (ra["step"], key)
            elif isinstance(ra[key], (int, float)):
                # A clip fraction counts values on either side of a threshold: one that sits within
                # float rounding of it may land on either side. Allow one token of the step's 64.
                tolerance = 1 / 64 if key.endswith("clipfrac") else ATOL
                assert ra[key] == pytest.approx(rb[key], abs=tolerance), (ra["step"], key)


@pytest.mark.parametrize("run", ["ppo_ddp", "ppo_fsdp", "ppo_grpo"])
def test_ppo_on_two_ranks_equals_one_process(one, two, run):
    diff = max_weight_diff(one / run, two / run)
    print(f"{run}: max |1-process - 2-rank| weight difference {diff:.3g}")
    assert diff < ATOL
    assert_same_metrics(one / run, two / run, exact=EXACT)
    # Not vacuous: the last step moved the weights far more than the tolerance.
    at_step_2 = load_file(one / run / "step_2" / "model.safetensors")
    assert max((at_step_2[k] - v).abs().max().item() for k, v in weights(one / run).items()) > 100 * ATOL
    config = json.loads((two / run / "final" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]  # a plain HF directory, even from FSDP2


def test_fsdp_checkpoint_is_sharded_and_exports_to_hf(one, two, tmp_path):
    from ppo.checkpoint import export_hf

    step = two / "ppo_fsdp" / "step_2"
    assert (step / "dcp" / ".metadata").exists() and not (step / "model.safetensors").exists()
    exported = export_hf(step, tmp_path / "hf")
    want = load_file(one / "ppo_fsdp" / "step_2" / "model.safetensors")  # one process writes HF directly
    got = load_file(exported / "model.safetensors")
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) < ATOL


@pytest.mark.parametrize("ranks", [2, 1])
def test_two_rank_checkpoints_resume_on_two_ranks_and_on_one(one, two, tmp_path, ranks):
    # step_2 of each 2-rank run, continued to step 3: DDP's HF directories and FSDP2's DCP shards
    # (resharded when loaded by one process) end where the uninterrupted run ends.
    launch("resume", tmp_path, str(two), ranks=ranks)
    for run in ("ppo_ddp", "ppo_fsdp"):
        assert max_weight_diff(one / run, tmp_path / run) < ATOL, run
        assert_same_metrics(one / run, tmp_path / run, exact=EXACT)


def test_teardown_frees_the_process_group_fsdp_used(two):
    # FSDP2's device meshes outlive the run in DTensor's caches; if they kept the gloo group, its
    # threads would run into interpreter shutdown, where a finished run could abort (SIGABRT).
    for rank in (0, 1):
        threads = json.loads((two / f"threads_after_teardown_rank{rank}.json").read_text())
        if threads is None:
            pytest.skip("no /proc/self/task to list the threads")
        assert not [name for name in threads if "gloo" in name], (rank, threads)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_stage_on_two_ranks_equals_one_process(one, two, stage):
    assert max_weight_diff(one / stage, two / stage) < ATOL
    assert_same_metrics(one / stage, two / stage)
    summary = metrics(two / stage)[-1]
    assert summary["eval_loss"] < summary["eval_loss_before"] - 0.01  # it trained: not vacuous


@pytest.mark.parametrize("failure", ["crash", "hang"])
def test_a_failing_rank_ends_the_run(tmp_path, failure):
    timeout_s = 8
    started = time.monotonic()
    result = launch(failure, tmp_path, timeout_s=timeout_s, check=False)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert elapsed < 120  # start-up included; a hang would run into the 300 s subprocess limit
    if failure == "crash":
        # The failing rank names itself and its error, and torchrun names it as the root cause. Rank 0
        # reports the broken connection too, unless torchrun has already stopped it (a race).
        assert "rank 1 of 2: ppo training failed" in output and "injected failure on rank 1" in output
        assert re.search(r"Root Cause.*?rank\s*:\s*1 ", output, re.DOTALL)
    else:  # rank 0 gives up after the timeout, saying so; torchrun then stops rank 1
        assert "rank 0 of 2: ppo training failed: lost the other ranks" in output
        assert f"dist_timeout_s={timeout_s}s" in output and "Timed out" in output


def test_every_rank_attends_as_rank_zeros_timing_says(tmp_path):
    """`fp32_attention: auto` times the kernels on each rank's CPU; where the timings disagree, all
    ranks take rank 0's choice (here: the forwards on the bf16 kernel, sampling in fp32)."""
    launch("attention", tmp_path)
    chosen = [json.loads((tmp_path / f"attention_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert chosen == ["ppo_fp32_decode_sdpa", "ppo_fp32_decode_sdpa"]
