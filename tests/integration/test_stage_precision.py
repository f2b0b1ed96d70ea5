"""The SFT and reward-model stages in bf16 (`precision`): the models' matmuls run in bf16 autocast,
while weights, AdamW states, losses, scores and accuracies stay fp32 and agree with an fp32 run to
bf16's rounding; `auto` resolves as PPO's does; the saved model is a plain fp32 directory."""

from __future__ import annotations

import json

import pytest
import torch

from ppo.config import ConfigError, RewardConfig, SFTConfig
from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model, build_tokenizer
from ppo.fastpath import fp32_attention
from ppo.precision import resolve_precision
from ppo.reward_stage import train_reward_model
from ppo.sft_stage import train_sft

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_bf16_emulation")

WORDS = [f"w{i}" for i in range(29)] + ["user", "assistant", ":"]
SFT_ROWS = [{"prompt": f"w{i}", "completion": f"w{i + 1} w{i + 2}"} for i in range(2, 14)]
PAIRS = [{"prompt": f"w1 w{i}", "chosen": f"w25 w{i + 1}", "rejected": f"w{i + 2} w{i + 3}"} for i in range(2, 18)]


def stage_config(cls, tmp_path, precision: str, **values):
    return cls(
        output_dir=str(tmp_path / precision),
        learning_rate=1e-3,
        batch_size=4,
        lr_scheduler="constant",
        progress_bar=False,
        eval_fraction=0.25,
        precision=precision,
        **values,
    )


def matmul_dtypes(model) -> tuple[list, object]:
    """The output dtypes of the first attention projection's calls, and the hook's handle."""
    seen: list[torch.dtype] = []
    layer = model.model.layers[0].self_attn.q_proj
    return seen, layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))


def run_sft(tmp_path, precision: str):
    tokenizer = build_tokenizer(WORDS)
    model = build_policy(tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=0)
    seen, hook = matmul_dtypes(model)
    metrics = train_sft(stage_config(SFTConfig, tmp_path, precision, num_epochs=2), model, tokenizer, rows=SFT_ROWS)
    hook.remove()
    return model, metrics, seen


def run_reward(tmp_path, precision: str):
    tokenizer = build_tokenizer(WORDS)
    model = build_reward_model(tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=1)
    seen, hook = matmul_dtypes(model)
    metrics = train_reward_model(
        stage_config(RewardConfig, tmp_path, precision, num_epochs=2), model, tokenizer, rows=PAIRS
    )
    hook.remove()
    return model, metrics, seen


@pytest.mark.parametrize("run", [run_sft, run_reward], ids=["sft", "reward"])
def test_bf16_stage_runs_its_matmuls_in_bf16_and_agrees_with_fp32(tmp_path, run):
    fp32_model, fp32, fp32_seen = run(tmp_path, "fp32")
    bf16_model, bf16, bf16_seen = run(tmp_path, "bf16")
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    assert set(fp32_seen) == {torch.float32} and set(bf16_seen) == {torch.bfloat16}
    # weights (and so AdamW's master copies) stay fp32; the losses are fp32 numbers
    assert {p.dtype for p in bf16_model.parameters()} == {torch.float32}
    # the same data in the same order: losses within bf16's rounding of the model, step by step
    assert len(bf16["train_loss"]) == len(fp32["train_loss"])
    for step, (a, b) in enumerate(zip(bf16["train_loss"], fp32["train_loss"])):
        assert a == pytest.approx(b, rel=3e-2, abs=1e-3), step
    assert bf16["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=3e-2)
    assert bf16["eval_loss"] != fp32["eval_loss"]  # it did run in another precision
    # on a CPU attention takes the fp32 kernel under bf16 where it is the faster one here, as in PPO
    on_cpu = bf16_model.device.type == "cpu"
    faster_in_fp32 = on_cpu and fp32_attention.choose(bf16_model, "auto") == fp32_attention.NAME
    assert fp32_attention.uses_fp32_attention(bf16_model) == faster_in_fp32
    assert not fp32_attention.uses_fp32_attention(fp32_model)


def test_bf16_reward_scores_enter_the_loss_in_fp32(tmp_path, monkeypatch):
    """The scores the Bradley-Terry loss sees are fp32 values, not bf16 ones cast up (the score
    head is read in fp32 outside autocast, `ppo.forward.read_head`)."""
    import ppo.reward_stage

    seen = []

    def recording_loss(chosen, rejected, *args):
        seen.extend([chosen.detach(), rejected.detach()])
        return ppo.preference.pairwise_loss(chosen, rejected, *args)

    monkeypatch.setattr(ppo.reward_stage, "pairwise_loss", recording_loss)
    _, _, matmuls = run_reward(tmp_path, "bf16")
    assert set(matmuls) == {torch.bfloat16}
    scores = torch.cat(seen)
    assert scores.dtype == torch.float32
    off_grid = scores != scores.to(torch.bfloat16).float()
    assert off_grid.float().mean() > 0.9


def test_bf16_saved_model_is_a_plain_fp32_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    run_sft(tmp_path, "bf16")
    final = tmp_path / "bf16" / "final"
    config = json.loads((final / "config.json").read_text())
    assert fp32_attention.NAME not in json.dumps(config)  # our attention name must not leak into the save
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.config._attn_implementation != fp32_attention.NAME


def test_auto_resolves_as_ppo_does(tmp_path):
    _, metrics, seen = run_sft(tmp_path, "auto")
    expected = resolve_precision("auto", torch.device("cpu"))
    assert metrics["precision"] == expected
    assert set(seen) == {torch.bfloat16 if expected == "bf16" else torch.float32}


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig])
def test_an_unknown_precision_is_refused_by_name(cls):
    with pytest.raises(ConfigError, match="precision.*fp16"):
        cls(precision="fp16")
