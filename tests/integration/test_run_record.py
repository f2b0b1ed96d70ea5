"""output_dir/run.json: one record per start of a run, saying what it ran on and what its `auto`
settings resolved to; a resumed run adds its own record, a new run starts the file afresh."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ppo import PPOConfig, PPOTrainer
from ppo.fastpath import gate
from ppo.rewards.funcs import RewardFunctionError

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_gate", "quiet_bf16_emulation")

PROMPTS = ["w1 w2", "w3", "w4 w5 w6", "w7"]


def trainer_for(policy, tokenizer, reward_model, out, reward_funcs=None, **overrides):
    config = PPOConfig(
        batch_size=2, max_new_tokens=3, output_dir=str(out), progress_bar=False, save_steps=1, **overrides
    )
    return PPOTrainer(
        config, copy.deepcopy(policy), tokenizer, reward_model=copy.deepcopy(reward_model), reward_funcs=reward_funcs
    )


def starts(out):
    return json.loads((out / "run.json").read_text())["starts"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_records_what_it_ran_on(tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path, precision):
    trainer = trainer_for(tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path, precision=precision)
    trainer.train(PROMPTS, num_epochs=1)
    [record] = starts(tmp_path)
    assert record["step"] == 0 and record["world_size"] == 1
    assert record["versions"]["torch"] == torch.__version__
    assert record["device"] == "cpu" and record["threads"] == torch.get_num_threads()
    assert record["precision"] == {"asked": precision, "ran": trainer.precision}
    assert record["fp32_matmul"] == {"asked": "auto", "ran": trainer.fp32_kernel}
    assert record["fp32_attention"] == {"asked": "auto"}
    implementations = {
        "policy": trainer.policy.config._attn_implementation,
        "reference": trainer.ref_model.config._attn_implementation,
        "critic": trainer.critic.module.config._attn_implementation,
        "reward_model": trainer.rewards.reward_model.config._attn_implementation,
    }
    assert record["attention"] == implementations
    if precision == "fp32":  # no autocast: attention stays transformers' own
        assert set(implementations.values()) == {"sdpa"}
    # completed after the first step: the fast paths decided inside a step are in it too
    assert record["fast_paths"] == gate.verdicts()
    assert any(key.startswith("kv_cache") for key in record["fast_paths"])


def test_a_resumed_run_adds_its_start_and_a_new_run_starts_afresh(
    tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path
):
    calls = {"n": 0}

    def fails_in_step_two(completions, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("reward server down")
        return [0.0] * len(completions)

    crashing = trainer_for(tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path, [fails_in_step_two])
    with pytest.raises(RewardFunctionError, match="reward server down"):
        crashing.train(PROMPTS, num_epochs=1)
    assert [s["step"] for s in starts(tmp_path)] == [0]  # written before the step that failed

    resumed = trainer_for(
        tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path, [fails_in_step_two], resume_from_checkpoint="latest"
    )
    resumed.train(PROMPTS, num_epochs=1)
    assert [s["step"] for s in starts(tmp_path)] == [0, 1]

    fresh = trainer_for(tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path, [fails_in_step_two], overwrite=True)
    fresh.train(PROMPTS[:2], num_epochs=1)
    assert [s["step"] for s in starts(tmp_path)] == [0]


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_the_sft_and_reward_stages_record_what_they_ran_on(tmp_path, stage):
    from ppo.config import RewardConfig, SFTConfig
    from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model, build_tokenizer
    from ppo.reward_stage import train_reward_model
    from ppo.sft_stage import train_sft

    tokenizer = build_tokenizer([f"w{i}" for i in range(29)])
    common = {"output_dir": str(tmp_path), "num_epochs": 1, "batch_size": 2, "progress_bar": False}
    if stage == "sft":
        rows = [{"prompt": f"w{i}", "completion": f" w{i + 1}"} for i in range(4)]
        metrics = train_sft(SFTConfig(**common), build_policy(tokenizer, TinyModelSpec(), seed=0), tokenizer, rows)
    else:
        rows = [{"prompt": f"w{i}", "chosen": f" w{i + 1}", "rejected": f" w{i + 2}"} for i in range(4)]
        model = build_reward_model(tokenizer, TinyModelSpec(), seed=1)
        metrics = train_reward_model(RewardConfig(**common), model, tokenizer, rows)
    [record] = starts(tmp_path)
    assert record["step"] == 0 and record["precision"] == {"asked": "auto", "ran": metrics["precision"]}
    assert set(record["attention"]) == {"model"} and record["fast_paths"] == gate.verdicts()


def test_a_record_that_cannot_be_completed_warns_and_the_run_goes_on(
    tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path, monkeypatch
):
    from ppo import run_record

    trainer = trainer_for(tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path)
    written = run_record._write

    def full_disk_after_the_start(path, starts):
        if "fast_paths" in starts[-1] and any(k.startswith("kv_cache") for k in starts[-1]["fast_paths"]):
            raise OSError(28, "No space left on device")
        written(path, starts)

    monkeypatch.setattr(run_record, "_write", full_disk_after_the_start)
    with pytest.warns(UserWarning, match="could not complete .*run.json.*No space left"):
        trainer.train(PROMPTS, num_epochs=1)
    assert trainer.global_step == 2 and (tmp_path / "final").is_dir()
    [record] = starts(tmp_path)  # the start's own record stays
    assert record["step"] == 0
