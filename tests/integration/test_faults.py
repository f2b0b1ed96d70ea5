"""Fault injection: nothing lost, nothing silent, no code run from a checkpoint (issue 18).

- SIGKILL at chosen and at seeded random moments - inside checkpoint writes (between any two
  file-system steps, half-way through deleting a replaced or pruned checkpoint), half-way through a
  metrics line, mid-step - then resume: the final weights and every metrics line equal those of an
  uninterrupted run, bit for bit (CPU, fp32). The runs are forked from one process that imported
  everything once (_fault_driver.py), so each costs its training steps only.
- SIGTERM / SIGINT through the CLI: a checkpoint, one line, exit 143 / 130, an exact resume.
- A full disk and a file-size limit during a save; a torn metrics line; a truncated or unsealed
  latest checkpoint; a changed batch plan; a malicious pickle planted as trainer state.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppo import PPOConfig, PPOTrainer, durable
from ppo import checkpoint as ckpt
from ppo.resume import repair_metrics
from ppo.state_file import LEGACY_STATE, UnsafeCheckpointError

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("_fault_driver.py")


class Driver:
    """The fork server: `run(kind=..., ...)` -> {"code", "log", "events"} of one forked run."""

    def __init__(self, tmp: Path):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
        }
        self.tmp, self.count = tmp, 0
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, **job) -> dict:
        self.count += 1
        job.setdefault("log", str(self.tmp / f"job{self.count}.log"))
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith('{"code"'):
                return json.loads(line)
        raise RuntimeError(f"the fault driver died (exit {self.proc.wait()})")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = Driver(tmp_path_factory.mktemp("fault-logs"))
    yield d
    d.close()


@pytest.fixture(scope="module")
def reference(driver, tmp_path_factory):
    """The uninterrupted run: its final weights, metrics and the events it went through."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = driver.run(kind="api", out=str(out))
    assert done["code"] == 0, done["log"]
    return {
        "weights": load_file(out / "final" / "model.safetensors"),
        "metrics": metrics(out),
        "events": done["events"],
    }


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def event(reference, prefix: str, occurrence: int = 1) -> int:
    """The 1-based number of the `occurrence`-th event starting with `prefix` in the reference run."""
    found = [i + 1 for i, name in enumerate(reference["events"]) if name.startswith(prefix)]
    assert len(found) >= occurrence, f"no event {prefix!r} #{occurrence} in {reference['events']}"
    return found[occurrence - 1]


def kill_resume_compare(driver, reference, out: Path, kills: list) -> None:
    """Kill the run at kills[0], each resumed run at the next kill point (an event number, or
    [event prefix, occurrence]), resume once more to the end; then the final weights and all
    metrics must equal the reference's exactly."""
    for i, kill_at in enumerate(kills):
        if (out / "final").is_dir() and durable.problem(out / "final") is None:
            break  # killed after the run was complete: nothing to resume
        resume = "latest" if ckpt.list_checkpoints(out) else ""
        if not resume:  # killed before the first checkpoint: start again, as with overwrite=true
            shutil.rmtree(out, ignore_errors=True)
        got = driver.run(kind="api", out=str(out), resume=resume, kill_at=kill_at)
        assert got["code"] in ((-9,) if i == 0 else (-9, 0)), got["log"]
    if not ((out / "final").is_dir() and durable.problem(out / "final") is None):
        resume = "latest" if ckpt.list_checkpoints(out) else ""
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
        got = driver.run(kind="api", out=str(out), resume=resume)
        assert got["code"] == 0, got["log"]
    weights = load_file(out / "final" / "model.safetensors")
    assert weights.keys() == reference["weights"].keys()
    for name, want in reference["weights"].items():
        assert torch.equal(weights[name], want), f"{name} differs after kills at {kills}"
    assert metrics(out) == reference["metrics"], f"metrics differ after kills at {kills}"


# The moments that matter, named by the reference run's events.
CHOSEN = {
    "mid-step 5": lambda r: [event(r, "reward", 5)],
    "inside step_4's write": lambda r: [event(r, "fsync_file OUT/.tmp-step_4/model.safetensors")],
    "before step_4 is renamed into place": lambda r: [event(r, "rename OUT/.tmp-step_4 OUT/step_4")],
    # step_4 complete but `latest` still step_2: the resumed run replaces step_4, and is killed
    # half-way through deleting the replaced one.
    "latest not yet updated, then mid-replace": lambda r: [
        event(r, "rename OUT/latest.tmp", 2),
        ["remove_tree OUT/.trash-step_4", 1],
    ],
    "half-way through pruning step_2": lambda r: [event(r, "remove_tree OUT/.trash-step_2")],
    "torn metrics line": lambda r: [event(r, "metrics step 3")],
    "before final/ is renamed into place": lambda r: [event(r, "rename OUT/.tmp-final OUT/final")],
}


@pytest.mark.parametrize("case", list(CHOSEN))
def test_sigkill_at_chosen_moments_resumes_exactly(driver, reference, tmp_path, case):
    kill_resume_compare(driver, reference, tmp_path / "run", CHOSEN[case](reference))


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_exactly(driver, reference, tmp_path):
    rng = random.Random(18)
    n = len(reference["events"])
    for case, first in enumerate(sorted(rng.sample(range(1, n + 1), 24))):
        kills = [first] + ([rng.randint(1, n)] if rng.random() < 0.5 else [])  # half are killed again while resuming
        kill_resume_compare(driver, reference, tmp_path / f"run{case}", kills)


# ---- signals and write errors through the CLI ----


@pytest.fixture(scope="module")
def cli_files(driver, tmp_path_factory):
    files = tmp_path_factory.mktemp("cli")
    assert driver.run(kind="prepare", dir=str(files))["code"] == 0
    return files


def cli_argv(files: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model_name_or_path={files / 'policy'}",
        f"prompts_file={files / 'prompts.txt'}",
        f"reward_funcs=[{files / 'rewards.py'}:words]",
        "batch_size=3",
        "mini_batch_size=2",
        "max_new_tokens=4",
        "num_epochs=2",
        "save_steps=2",
        "precision=fp32",
        "fp32_matmul=mkl",
        "learning_rate=1e-3",
        "seed=7",
        "progress_bar=false",
        f"output_dir={out}",
        *extra,
    ]


def last_line(log: str) -> str:
    return log.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cli_reference(driver, cli_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-reference") / "run"
    full = driver.run(kind="cli", argv=cli_argv(cli_files, out))
    assert full["code"] == 0, full["log"]
    return out


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("INT", 130)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(driver, cli_files, cli_reference, tmp_path, sig, code):
    out = tmp_path / "stopped"
    stopped = driver.run(kind="cli", argv=cli_argv(cli_files, out), env={"FAULT_SIGNALS": f"3:{sig}"})  # during step 3
    assert stopped["code"] == code, stopped["log"]
    assert "Traceback" not in stopped["log"] and "KeyboardInterrupt" not in stopped["log"]
    assert last_line(stopped["log"]) == (
        f"ppo-rlhf train: stopped by SIG{sig} after step 3; checkpoint {out / 'step_3'}; "
        "resume with the same command plus resume_from_checkpoint=latest"
    )
    assert durable.problem(out / "step_3") is None and not (out / "final").exists()
    resumed = driver.run(kind="cli", argv=cli_argv(cli_files, out, "resume_from_checkpoint=latest"))
    assert resumed["code"] == 0, resumed["log"]
    want, got = load_file(cli_reference / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert metrics(out) == metrics(cli_reference)


def test_second_signal_abandons_the_step(driver, cli_files, tmp_path):
    out = tmp_path / "run"
    stopped = driver.run(kind="cli", argv=cli_argv(cli_files, out), env={"FAULT_SIGNALS": "3:INT,3:INT"})
    assert stopped["code"] == 130, stopped["log"]
    assert "Traceback" not in stopped["log"]
    assert last_line(stopped["log"]) == (
        f"ppo-rlhf train: stopped by a second SIGINT, abandoning the step in progress (nothing saved "
        f"for it); the last checkpoint is {out / 'step_2'}; resume with the same command plus "
        "resume_from_checkpoint=latest"
    )
    assert sorted(p.name for p in ckpt.list_checkpoints(out)) == ["step_2"]


def test_file_size_limit_during_a_save_keeps_the_previous_checkpoint(driver, cli_files, tmp_path):
    out = tmp_path / "run"
    limit = 64 * 1024
    assert (cli_files / "policy" / "model.safetensors").stat().st_size > limit  # step_4's weights cannot be written
    failed = driver.run(
        kind="cli", argv=cli_argv(cli_files, out), env={"FAULT_FSIZE": f"3:{limit}"}
    )  # limit set in step 3
    assert failed["code"] == 1, failed["log"]
    line = last_line(failed["log"])
    assert (
        line.startswith(f"ppo-rlhf train: error: could not write checkpoint {out / 'step_4'}: ")
        and "File too large" in line
    ), line
    assert line.endswith(f"the previous checkpoint {out / 'step_2'} is intact")
    assert "Traceback" not in failed["log"]
    assert durable.problem(out / "step_2") is None and not (out / "step_4").exists()
    assert ckpt.resolve_checkpoint(out, "latest") == out / "step_2"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written directory left


# ---- in one process: write errors, damaged checkpoints, torn metrics, plan changes, pickles ----


def words(completions, **kw):
    return [len(c.split()) / 4 for c in completions]


PROMPTS = ["w3 w4", "w5", "w6 w7 w8", "w9", "w10 w11"]


def tiny_run(policy, tokenizer, out: Path, **overrides) -> PPOTrainer:
    config = {
        "batch_size": 2,
        "max_new_tokens": 3,
        "ppo_epochs": 1,
        "save_steps": 1,
        "output_dir": str(out),
        "progress_bar": False,
        "precision": "fp32",
        "fp32_matmul": "mkl",
        "seed": 3,
    }
    trainer = PPOTrainer(PPOConfig(**{**config, **overrides}), policy, tokenizer, reward_funcs=words)
    trainer.train(PROMPTS[:4], num_epochs=1)
    return trainer


def test_full_disk_keeps_the_previous_checkpoint(one_thread, tiny_policy, tiny_tokenizer, tmp_path, monkeypatch):
    real_fsync, calls = durable.fsync_file, []

    def fsync_until_full(path):
        calls.append(path)
        if ".tmp-step_2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_fsync(path)

    monkeypatch.setattr(durable, "fsync_file", fsync_until_full)
    with pytest.raises(
        ckpt.CheckpointWriteError,
        match=r"could not write checkpoint .*step_2: OSError: \[Errno 28\] No space left on device",
    ) as err:
        tiny_run(tiny_policy, tiny_tokenizer, tmp_path)
    assert f"the previous checkpoint {tmp_path / 'step_1'} is intact" in str(err.value)
    assert durable.problem(tmp_path / "step_1") is None and not (tmp_path / "step_2").exists()
    assert (tmp_path / "latest").read_text() == "step_1" and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    "damage",
    [
        "truncate model.safetensors",
        "truncate trainer_state.safetensors",
        "remove manifest.json",
        "alter trainer_state.json",
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    one_thread, tiny_policy, tiny_tokenizer, tmp_path, damage
):
    tiny_run(tiny_policy, tiny_tokenizer, tmp_path)  # step_1, step_2
    how, name = damage.split()
    path = tmp_path / "step_2" / name
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "remove":
        path.unlink()
    else:
        path.write_text(path.read_text().replace('"global_step": 2', '"global_step": 7'))
    step_2 = re.escape(str(tmp_path / "step_2"))
    with pytest.warns(UserWarning, match=rf"skipping {step_2}: {name}.*trying the previous checkpoint"):
        assert ckpt.resolve_checkpoint(tmp_path, "latest") == tmp_path / "step_1"
    with pytest.raises(ckpt.CheckpointError, match=rf"cannot resume from {step_2}: {name}"):
        ckpt.resolve_checkpoint(tmp_path, str(tmp_path / "step_2"))


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kl": 0.5}\n{"step": 2, "kl": 0.25}\n{"step": 3, "k')
    with pytest.warns(UserWarning, match=r"the last line \(3\) was cut off"):
        repair_metrics(path, through_step=2)
    assert path.read_text() == '{"step": 1, "kl": 0.5}\n{"step": 2, "kl": 0.25}\n'
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ckpt.CheckpointError, match=r"metrics.jsonl line 2 is not valid JSON"):
        repair_metrics(path, through_step=2)


def test_changed_batch_plan_or_nothing_left_is_refused_and_nothing_changes(
    one_thread, tiny_policy, tiny_tokenizer, tmp_path
):
    tiny_run(tiny_policy, tiny_tokenizer, tmp_path)  # 2 steps, finished: final/
    before = {p: p.read_bytes() for p in [tmp_path / "metrics.jsonl", *sorted((tmp_path / "final").iterdir())]}
    config = PPOConfig(
        batch_size=4,
        output_dir=str(tmp_path),
        resume_from_checkpoint=str(tmp_path / "step_1"),
        progress_bar=False,
        seed=3,
    )
    trainer = PPOTrainer(config, tiny_policy, tiny_tokenizer, reward_funcs=words)
    with pytest.raises(
        ckpt.CheckpointError, match=r"the batch plan changed since it was written \(batch_size 2 -> 4\)"
    ):
        trainer.train(PROMPTS[:4])
    trainer.config.batch_size, trainer.config.resume_from_checkpoint = 2, "latest"
    with pytest.raises(ckpt.CheckpointError, match=r"nothing to train: .*step_2 is already at the end of this run"):
        trainer.train(PROMPTS[:4])
    assert {p: p.read_bytes() for p in before} == before


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file when unpickled


def test_a_pickle_planted_as_trainer_state_is_never_run(one_thread, tiny_policy, tiny_tokenizer, tmp_path):
    tiny_run(tiny_policy, tiny_tokenizer, tmp_path / "run")
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"global_step": Evil(marker)})
    assert not marker.exists()
    # 1. An old-style checkpoint whose trainer_state.pt needs code: refused, naming the file.
    old = tmp_path / "run" / "step_2"
    for name in ("trainer_state.json", "trainer_state.safetensors", durable.MANIFEST):
        (old / name).unlink()
    (tmp_path / "raw.pt").write_bytes(evil)
    torch.save({"global_step": Evil(marker)}, tmp_path / "zip.pt")  # torch.save's zip layout too
    for planted in (tmp_path / "raw.pt", tmp_path / "zip.pt"):
        shutil.copy(planted, old / LEGACY_STATE)
        config = PPOConfig(
            batch_size=2, output_dir=str(tmp_path / "run"), resume_from_checkpoint=str(old), progress_bar=False, seed=3
        )
        trainer = PPOTrainer(config, tiny_policy, tiny_tokenizer, reward_funcs=words)
        with (
            pytest.warns(UserWarning, match="older ppo-rlhf"),
            pytest.raises(UnsafeCheckpointError, match=rf"{LEGACY_STATE} is a pickle that would run code"),
        ):
            trainer.train(PROMPTS[:4])
        assert not marker.exists()
    # 2. Planted beside the state of a current checkpoint: never read.
    (tmp_path / "run" / "step_1" / LEGACY_STATE).write_bytes(evil)
    assert ckpt.load_trainer_state(tmp_path / "run" / "step_1")["global_step"] == 1
    assert not marker.exists()


def test_signal_without_save_on_interrupt_names_the_last_checkpoint(driver, cli_files, tmp_path):
    out = tmp_path / "run"
    stopped = driver.run(
        kind="cli", argv=cli_argv(cli_files, out, "save_on_interrupt=false"), env={"FAULT_SIGNALS": "3:TERM"}
    )
    assert stopped["code"] == 143, stopped["log"]
    assert last_line(stopped["log"]) == (
        f"ppo-rlhf train: stopped by SIGTERM after step 3 without a checkpoint of it (save_on_interrupt=false); "
        f"the last checkpoint is {out / 'step_2'}; resume with the same command plus resume_from_checkpoint=latest"
    )
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_2"]
