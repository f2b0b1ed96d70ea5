"""Config loading: YAML + key=value overrides, strict keys, derived batch plan."""

import pytest

from ppo.config import ConfigError, PPOConfig, load_config, plan_batches, save_config


def test_defaults_match_the_public_contract():
    c = PPOConfig()
    assert (c.learning_rate, c.batch_size, c.gradient_accumulation_steps, c.ppo_epochs) == (1e-5, 4, 1, 4)
    assert (c.gamma, c.lam, c.clip_range, c.clip_range_value, c.kl_coef) == (1.0, 0.95, 0.2, 0.2, 0.1)
    assert (c.adap_kl_ctrl, c.target_kl, c.kl_horizon, c.vf_coef, c.entropy_coef) == (True, 0.01, 10000, 0.1, 0.0)
    assert (c.max_grad_norm, c.temperature, c.whiten_advantages, c.whiten_rewards) == (1.0, 1.0, True, False)
    assert c.missing_eos_penalty is None
    for name in [
        "mini_batch_size",
        "max_new_tokens",
        "top_k",
        "top_p",
        "value_learning_rate",
        "seed",
        "output_dir",
        "save_steps",
    ]:
        assert hasattr(c, name)


def test_yaml_sections_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\nsampling:\n  temperature: 0.7\n  top_k: 5\nbatch_size: 8\n")
    c = load_config(PPOConfig, path, ["batch_size=16", "--kl_coef=0.05", "stop_strings=[a, b]"])
    assert c.learning_rate == 1e-5 and isinstance(c.learning_rate, float)
    assert (c.temperature, c.top_k, c.batch_size, c.kl_coef, c.stop_strings) == (0.7, 5, 16, 0.05, ["a", "b"])


def test_unknown_key_names_file_key_and_close_match(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'learning_rat'.*Did you mean 'learning_rate'"):
        load_config(PPOConfig, path)
    with pytest.raises(ConfigError, match="Did you mean 'kl_coef'"):
        load_config(PPOConfig, None, ["kl_coeff=0.2"])


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="'batch_size' expects int"):
        load_config(PPOConfig, None, ["batch_size=many"])
    with pytest.raises(ConfigError, match="value_head must be one of"):
        load_config(PPOConfig, None, ["value_head=both"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(PPOConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe learning_rate")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(PPOConfig, bad)


def test_saved_config_loads_back(tmp_path):
    c = PPOConfig(batch_size=3, stop_strings=["x"], top_p=0.9)
    save_config(c, tmp_path / "config.yaml")
    assert load_config(PPOConfig, tmp_path / "config.yaml") == c


def test_batch_plan_is_derived_not_written_back():
    c = PPOConfig(batch_size=8, num_generations=2, mini_batch_size=4, gradient_accumulation_steps=2)
    plan = plan_batches(c)
    assert (plan.rollout_size, plan.mini_batch, plan.micro_batch, plan.steps_per_epoch) == (16, 4, 2, 4)
    assert c.mini_batch_size == 4 and c.batch_size == 8
    assert plan_batches(PPOConfig(batch_size=4)).mini_batch == 4
    with pytest.raises(ConfigError, match="divide evenly over 3 ranks"):
        plan_batches(c, world_size=3)


@pytest.mark.parametrize(
    "flags, capability, expected",
    [
        ("fpu avx2 avx512f avx512_bf16", "AVX512", "bf16"),
        ("fpu avx2 amx_bf16 avx512f", "AVX512", "bf16"),
        ("fpu avx2 fma", "AVX2", "fp32"),  # bf16 would be emulated: many times slower than fp32
    ],
)
def test_auto_precision_is_bf16_only_where_the_cpu_is_fast_at_it(monkeypatch, flags, capability, expected):
    import torch

    from ppo import precision

    assert PPOConfig().precision == "auto"
    monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: "avx512_bf16" in flags or "amx_bf16" in flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert precision.resolve_precision("auto", torch.device("cpu")) == expected
    assert precision.resolve_precision("fp32", torch.device("cpu")) == "fp32"
