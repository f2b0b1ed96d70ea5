"""Exact resume: a run killed (SIGKILL) after a checkpoint and resumed ends where an uninterrupted
run ends - the same weights bit for bit, the same metrics and learning rates for the remaining
steps (CPU, fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from ppo import PPOConfig, PPOTrainer
    from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model, build_tokenizer

    out, resume, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tok = build_tokenizer([f"w{i}" for i in range(29)])
    policy = build_policy(tok, TinyModelSpec(), seed=0)
    reward_model = build_reward_model(tok, TinyModelSpec(), seed=1)
    calls = {"n": 0}

    def words(completions, **kw):
        calls["n"] += 1
        if calls["n"] == kill_at:  # die mid-step, after the previous step's checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return [len(c.split()) / 4 for c in completions]

    config = PPOConfig(batch_size=3, mini_batch_size=2, max_new_tokens=4, learning_rate=1e-3, save_steps=2, precision="fp32", fp32_matmul="mkl",
                       output_dir=out, progress_bar=False, seed=7, temperature=0.9, lam=0.9,
                       lr_scheduler="cosine", warmup_steps=1, resume_from_checkpoint=resume or None)
    trainer = PPOTrainer(config, policy, tok, reward_model=reward_model, reward_funcs=words, reward_weights=[0.5, 1.0])
    prompts = [" ".join(f"w{(i * 5 + j) % 29}" for j in range(1 + i % 3)) for i in range(9)]
    trainer.train(prompts, num_epochs=2)   # 3 batches per epoch -> 6 steps
    """
)


def run(script, out, resume="", kill_at=0):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, str(script), str(out), resume, str(kill_at)], capture_output=True, text=True, env=env)


def metrics(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("time/")} for r in rows}


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    full = run(script, tmp_path / "full")
    assert full.returncode == 0, full.stderr
    killed = run(script, tmp_path / "killed", kill_at=5)  # killed inside step 5: step_4 is on disk
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "killed").glob("step_*")) == ["step_2", "step_4"]
    assert not list((tmp_path / "killed").glob(".tmp-*"))  # no half-written checkpoint left
    resumed = run(script, tmp_path / "killed", resume="latest")
    assert resumed.returncode == 0, resumed.stderr

    want = load_file(tmp_path / "full" / "final" / "model.safetensors")
    got = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    full_metrics, resumed_metrics = metrics(tmp_path / "full" / "metrics.jsonl"), metrics(tmp_path / "killed" / "metrics.jsonl")
    for step in (5, 6):
        assert resumed_metrics[step] == full_metrics[step]
    assert full_metrics[5]["kl"] != full_metrics[6]["kl"]  # the comparison is not vacuous
    # The learning-rate schedule (warm-up, then cosine over train()'s 6 steps) picks up where it was.
    assert [full_metrics[s]["learning_rate"] for s in range(1, 7)] == pytest.approx([5e-4, 1e-3, 0.9045e-3, 0.6545e-3, 0.3455e-3, 0.0955e-3], rel=1e-3)
    assert resumed_metrics[5]["learning_rate"] == full_metrics[5]["learning_rate"]


def resumable_run(out, tokenizer, resume=None, **overrides):
    """4 steps (2 prompts x 2 samples each), checkpointed at step 2; the history of the steps run."""
    from ppo import PPOConfig, PPOTrainer
    from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model

    policy = build_policy(tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=0)
    reward_model = build_reward_model(tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=1)
    config = PPOConfig(batch_size=2, num_generations=2, mini_batch_size=2, ppo_epochs=2, max_new_tokens=4, learning_rate=1e-3, save_steps=2,
                       precision="fp32", fp32_matmul="mkl", output_dir=str(out), progress_bar=False, seed=7, temperature=0.9,
                       target_kl=1e-3, resume_from_checkpoint=resume, **overrides)
    trainer = PPOTrainer(config, policy, tokenizer, reward_model=reward_model, reward_funcs=lambda completions, **kw: [len(c.split()) / 4 for c in completions])
    history = trainer.train([" ".join(f"w{(i * 5 + j) % 29}" for j in range(1 + i % 3)) for i in range(8)])
    return history, policy


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    dict(advantage_estimator="grpo"),
    dict(advantage_estimator="rloo", kl_in_loss=True),
    dict(advantage_estimator="reinforce_pp"),
    dict(critic_warmup_steps=3),  # resumed at step 2, inside the warm-up; step 4 trains the policy
], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_resume_is_exact_for_every_estimator(tiny_tokenizer, tmp_path, overrides):
    """In one process (the SIGKILL test above covers a dead process): resuming step_2 of a run gives
    steps 3-4 and final weights equal to the uninterrupted run's."""
    full, full_policy = resumable_run(tmp_path / "full", tiny_tokenizer, **overrides)
    resumed, resumed_policy = resumable_run(tmp_path / "resumed", tiny_tokenizer, resume=str(tmp_path / "full" / "step_2"), **overrides)
    assert len(full) == 4 and len(resumed) == 2
    # NaN (a warm-up step's policy statistics) made comparable, as metrics.jsonl writes it
    drop_time = [{k: "nan" if v != v else v for k, v in h.items() if not k.startswith("time/")} for h in full[2:] + resumed]
    assert drop_time[2:] == drop_time[:2]
    for name, weight in full_policy.state_dict().items():
        assert torch.equal(resumed_policy.state_dict()[name], weight), name
    assert full[2]["kl"] != full[3]["kl"]  # the comparison is not vacuous
    if "critic_warmup_steps" in overrides:
        assert [h.get("critic_warmup") for h in full] == [1.0, 1.0, 1.0, None]
