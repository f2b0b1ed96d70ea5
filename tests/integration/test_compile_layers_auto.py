"""compile_layers: auto compiles the decoder layers under bf16 on a CPU with AMX when they are big
enough, and nowhere else; true/false as given; the choice is recorded in run.json.

Nothing here compiles: the layers are routed to the compiled graph at construction and compiled
at their first call, which these tests never make (test_compiled_layers.py runs them, slowly).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ppo import PPOConfig, PPOTrainer
from ppo.config import ConfigError, load_config
from ppo.fastpath import compiled_layers
from ppo.fastpath.compiled_layers import decoder_layers, uncompile_decoder_layers, worth_compiling

CPU = torch.device("cpu")


def layer_parameters(model) -> int:
    return sum(p.numel() for p in decoder_layers(model).parameters())


@pytest.fixture
def amx(monkeypatch):
    monkeypatch.setattr(compiled_layers, "cpu_flags", lambda: {"avx2", "avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("mode", [True, False])
def test_true_and_false_are_taken_as_given(tiny_policy, mode):
    assert worth_compiling(mode, tiny_policy, "fp32", CPU) is mode


def test_auto_compiles_bf16_on_amx_from_the_size_threshold(tiny_policy, amx, monkeypatch):
    size = layer_parameters(tiny_policy)
    monkeypatch.setattr(compiled_layers, "MIN_LAYER_PARAMETERS", size)
    assert worth_compiling("auto", tiny_policy, "bf16", CPU)
    monkeypatch.setattr(compiled_layers, "MIN_LAYER_PARAMETERS", size + 1)
    assert not worth_compiling("auto", tiny_policy, "bf16", CPU)


def test_auto_leaves_fp32_gpus_and_cpus_without_amx_alone(tiny_policy, monkeypatch):
    monkeypatch.setattr(compiled_layers, "MIN_LAYER_PARAMETERS", 0)
    monkeypatch.setattr(compiled_layers, "cpu_flags", lambda: {"avx2", "avx512_bf16", "amx_bf16"})
    assert not worth_compiling("auto", tiny_policy, "fp32", CPU)
    assert not worth_compiling("auto", tiny_policy, "bf16", torch.device("cuda"))
    monkeypatch.setattr(compiled_layers, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert not worth_compiling("auto", tiny_policy, "bf16", CPU)


def test_the_default_threshold_keeps_tiny_models_eager(tiny_policy, amx):
    assert layer_parameters(tiny_policy) < compiled_layers.MIN_LAYER_PARAMETERS
    assert not worth_compiling("auto", tiny_policy, "bf16", CPU)


def test_the_config_takes_auto_true_false_and_refuses_the_rest():
    assert PPOConfig().compile_layers == "auto"
    for raw, value in [("auto", "auto"), ("true", True), ("false", False)]:
        assert load_config(PPOConfig, overrides=[f"compile_layers={raw}"]).compile_layers == value
    with pytest.raises(ConfigError, match="compile_layers must be true, false or auto; got 'fast'"):
        load_config(PPOConfig, overrides=["compile_layers=fast"])
    # auto steps aside where true is refused: it never compiles a recomputing layer
    assert PPOConfig(compile_layers="auto", gradient_checkpointing=True).compile_layers == "auto"


def run_config(tmp_path, **overrides):
    return PPOConfig(
        batch_size=2,
        mini_batch_size=2,
        max_new_tokens=2,
        output_dir=str(tmp_path / "run"),
        **overrides,
    )


def count_w1(completions, **kwargs):
    return [float(c.split().count("w1")) for c in completions]


@pytest.mark.parametrize(
    "threshold, checkpointing, compiled", [(0, False, True), (None, False, False), (0, True, False)]
)
def test_the_trainer_follows_auto(
    tmp_path, tiny_policy, tiny_tokenizer, amx, monkeypatch, quiet_bf16_emulation, threshold, checkpointing, compiled
):
    if threshold is not None:
        monkeypatch.setattr(compiled_layers, "MIN_LAYER_PARAMETERS", threshold)
    config = run_config(tmp_path, precision="bf16", gradient_checkpointing=checkpointing)
    trainer = PPOTrainer(config, tiny_policy, tiny_tokenizer, reward_funcs=[count_w1])
    try:
        assert trainer.compiles_layers is compiled
        forwards = [vars(layer).get("forward") for layer in decoder_layers(tiny_policy)]
        routed = [isinstance(forward, compiled_layers._CompiledForward) for forward in forwards]
        assert routed == [compiled] * len(routed)
    finally:
        for model in (trainer.policy, trainer.ref_model, trainer.critic.module):
            uncompile_decoder_layers(model)


def test_run_json_records_what_compile_layers_did(
    tmp_path, tiny_policy, tiny_tokenizer, amx, monkeypatch, quiet_bf16_emulation
):
    monkeypatch.setattr(compiled_layers, "MIN_LAYER_PARAMETERS", 0)
    trainer = PPOTrainer(run_config(tmp_path, precision="bf16"), tiny_policy, tiny_tokenizer, reward_funcs=[count_w1])
    try:
        from ppo.run_record import ppo_run

        record = ppo_run(trainer)
        assert record["compile_layers"] == {"asked": "auto", "ran": True}
    finally:
        for model in (trainer.policy, trainer.ref_model, trainer.critic.module):
            uncompile_decoder_layers(model)
    trainer = PPOTrainer(run_config(tmp_path, precision="fp32"), tiny_policy, tiny_tokenizer, reward_funcs=[count_w1])
    assert ppo_run(trainer)["compile_layers"] == {"asked": "auto", "ran": False}
    assert json.dumps(ppo_run(trainer))  # serialisable as it is written


def test_auto_leaves_lora_runs_eager_and_true_compiles_them(
    tmp_path, tiny_policy, tiny_tokenizer, amx, monkeypatch, quiet_bf16_emulation
):
    pytest.importorskip("peft")
    monkeypatch.setattr(compiled_layers, "MIN_LAYER_PARAMETERS", 0)
    assert not worth_compiling("auto", tiny_policy, "bf16", CPU, adapters=True)
    for mode, compiled in (("auto", False), (True, True)):
        config = run_config(tmp_path, precision="bf16", lora_r=4, lora_alpha=8, compile_layers=mode)
        trainer = PPOTrainer(config, copy.deepcopy(tiny_policy), tiny_tokenizer, reward_funcs=[count_w1])
        try:
            assert trainer.compiles_layers is compiled
        finally:
            uncompile_decoder_layers(trainer.policy)
