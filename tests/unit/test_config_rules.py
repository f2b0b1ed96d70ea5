"""Every key of every stage's config is checked at construction, in the Python API as in YAML:
each bad value is refused with a message naming the key, the value and the rule (and the file or
override it came from)."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from ppo.config import (
    PPO_RULES,
    DemoConfig,
    EvalConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    load_config,
)
from ppo.config_io import ConfigError
from ppo.stage_configs import DEMO_RULES, EVAL_RULES, REWARD_RULES, SFT_RULES

RULES = {
    PPOConfig: PPO_RULES,
    SFTConfig: SFT_RULES,
    RewardConfig: REWARD_RULES,
    EvalConfig: EVAL_RULES,
    DemoConfig: DEMO_RULES,
}

# (config class, keyword arguments, fragments the message must hold)
BAD = [
    (PPOConfig, {"batch_size": "4"}, ["batch_size", "'4'", "int", "str"]),
    (PPOConfig, {"batch_size": 4.0}, ["batch_size", "4.0", "expects int"]),
    (PPOConfig, {"batch_size": True}, ["batch_size", "True", "expects int"]),
    (PPOConfig, {"learning_rate": "1e-5"}, ["learning_rate", "'1e-5'", "float"]),
    (PPOConfig, {"learning_rate": 0.0}, ["learning_rate", "> 0", "0.0"]),
    (PPOConfig, {"learning_rate": math.nan}, ["learning_rate", "nan"]),
    (PPOConfig, {"value_learning_rate": -1e-5}, ["value_learning_rate", "> 0"]),
    (PPOConfig, {"mini_batch_size": -1}, ["mini_batch_size", ">= 1", "-1"]),
    (PPOConfig, {"mini_batch_size": 0}, ["mini_batch_size", ">= 1", "got 0"]),
    (PPOConfig, {"mini_batch_size": 8}, ["mini_batch_size", "<= the 4 samples", "got 8"]),
    (
        PPOConfig,
        {"mini_batch_size": 4, "gradient_accumulation_steps": 8},
        ["gradient_accumulation_steps", "<= the mini-batch's 4", "got 8"],
    ),
    (PPOConfig, {"top_p": 1.5}, ["top_p", "in (0, 1]", "1.5"]),
    (PPOConfig, {"top_p": 0.0}, ["top_p", "in (0, 1]", "0.0"]),
    (PPOConfig, {"top_k": -1}, ["top_k", ">= 0", "-1"]),
    (PPOConfig, {"temperature": 0.0}, ["temperature", "> 0"]),
    (PPOConfig, {"temperature": math.inf}, ["temperature", "inf"]),
    (PPOConfig, {"kl_coef": -1.0}, ["kl_coef", ">= 0", "-1.0"]),
    (PPOConfig, {"target_kl": 0.0}, ["target_kl", "> 0"]),
    (PPOConfig, {"kl_horizon": 0}, ["kl_horizon", ">= 1"]),
    (PPOConfig, {"save_steps": -1}, ["save_steps", ">= 0", "-1"]),
    (PPOConfig, {"save_total_limit": 0}, ["save_total_limit", ">= 1"]),
    (PPOConfig, {"num_epochs": 0}, ["num_epochs", ">= 1", "got 0"]),
    (PPOConfig, {"ppo_epochs": 0}, ["ppo_epochs", ">= 1"]),
    (PPOConfig, {"clip_range": 0.0}, ["clip_range", "> 0"]),
    (PPOConfig, {"clip_range_value": -0.2}, ["clip_range_value", "> 0"]),
    (PPOConfig, {"gamma": 1.01}, ["gamma", "in [0, 1]", "1.01"]),
    (PPOConfig, {"lam": -0.1}, ["lam", "in [0, 1]"]),
    (PPOConfig, {"vf_coef": -0.1}, ["vf_coef", ">= 0"]),
    (PPOConfig, {"max_grad_norm": 0.0}, ["max_grad_norm", "> 0"]),
    (PPOConfig, {"reward_clip": -1.0}, ["reward_clip", "> 0"]),
    (PPOConfig, {"missing_eos_penalty": -1.0}, ["missing_eos_penalty", ">= 0"]),
    (PPOConfig, {"max_new_tokens": 0}, ["max_new_tokens", ">= 1"]),
    (PPOConfig, {"max_length": 1}, ["max_length", ">= 2"]),
    (PPOConfig, {"lora_dropout": 1.0}, ["lora_dropout", "in [0, 1)"]),
    (PPOConfig, {"seed": -3}, ["seed", ">= 0"]),
    (PPOConfig, {"warmup_steps": 5, "lr_schedule_steps": 3}, ["warmup_steps", "lr_schedule_steps (3)", "got 5"]),
    (PPOConfig, {"kl_estimator": "k4"}, ["kl_estimator", "one of k1, k2, k3", "'k4'"]),
    (PPOConfig, {"torch_dtype": "fp16"}, ["torch_dtype", "float16", "'fp16'"]),
    (PPOConfig, {"report_to": ["tb"]}, ["report_to[0]", "tensorboard", "'tb'"]),
    (PPOConfig, {"stop_strings": ["ok", ""]}, ["stop_strings[1]", "non-empty"]),
    (PPOConfig, {"reward_weights": [1.0, "x"]}, ["reward_weights[1]", "finite", "'x'"]),
    (PPOConfig, {"reward_funcs": [3]}, ["reward_funcs[0]", "module:function", "3"]),
    (PPOConfig, {"reward_timeout_s": -1.0}, ["reward_timeout_s", ">= 0"]),
    (PPOConfig, {"reward_max_abs": 0.0}, ["reward_max_abs", "> 0"]),
    (PPOConfig, {"dist_timeout_s": 0.0}, ["dist_timeout_s", "> 0"]),
    (PPOConfig, {"progress_bar": "yes"}, ["progress_bar", "bool", "'yes'"]),
    (PPOConfig, {"output_dir": None}, ["output_dir", "str", "None"]),
    (
        PPOConfig,
        {"resume_from_checkpoint": "latest", "overwrite": True},
        ["resume_from_checkpoint", "overwrite", "contradict"],
    ),
    (PPOConfig, {"output_dir": ""}, ["output_dir", "a non-empty string", "''"]),
    (PPOConfig, {"prompt_column": " "}, ["prompt_column", "a non-empty string"]),
    (SFTConfig, {"output_dir": ""}, ["SFTConfig.output_dir", "non-empty"]),
    (RewardConfig, {"chosen_column": ""}, ["chosen_column", "non-empty"]),
    (EvalConfig, {"reward_funcs": [""]}, ["reward_funcs[0]", "built-in name"]),
    (DemoConfig, {"output_dir": ""}, ["DemoConfig.output_dir", "non-empty"]),
    (SFTConfig, {"num_epochs": 0}, ["SFTConfig.num_epochs", ">= 1"]),
    (SFTConfig, {"learning_rate": -1.0}, ["SFTConfig.learning_rate", "> 0"]),
    (SFTConfig, {"eval_fraction": 1.0}, ["eval_fraction", "in [0, 1)"]),
    (SFTConfig, {"warmup_ratio": 1.5}, ["warmup_ratio", "in [0, 1]"]),
    (SFTConfig, {"batch_size": "8"}, ["SFTConfig.batch_size", "int", "'8'"]),
    (SFTConfig, {"weight_decay": -0.1}, ["weight_decay", ">= 0"]),
    (SFTConfig, {"lr_scheduler": "step"}, ["lr_scheduler", "constant, linear, cosine", "'step'"]),
    (RewardConfig, {"margin": -1.0}, ["RewardConfig.margin", ">= 0"]),
    (RewardConfig, {"center_rewards_coefficient": -0.01}, ["center_rewards_coefficient", ">= 0"]),
    (RewardConfig, {"max_grad_norm": 0.0}, ["RewardConfig.max_grad_norm", "> 0"]),
    (RewardConfig, {"logging_steps": 0}, ["logging_steps", ">= 1"]),
    (EvalConfig, {"top_p": 2.0}, ["EvalConfig.top_p", "in (0, 1]"]),
    (EvalConfig, {"top_k": -5}, ["EvalConfig.top_k", ">= 0"]),
    (EvalConfig, {"num_samples": 0}, ["num_samples", ">= 1"]),
    (EvalConfig, {"best_of_n": 0}, ["best_of_n", ">= 1"]),
    (EvalConfig, {"reward_weights": [math.inf]}, ["reward_weights[0]", "finite"]),
    (DemoConfig, {"ppo_mini_batch_size": 128}, ["ppo_mini_batch_size", "<= the 64 samples"]),
    (DemoConfig, {"refresh_at": 1.0}, ["refresh_at", "in [0, 1)"]),
    (DemoConfig, {"pair_samples": 1}, ["pair_samples", ">= 2"]),
    (DemoConfig, {"kl_coef": -0.2}, ["DemoConfig.kl_coef", ">= 0"]),
    (DemoConfig, {"ppo_learning_rate": 0.0}, ["ppo_learning_rate", "> 0"]),
    (DemoConfig, {"threads": 0}, ["threads", ">= 1"]),
]


@pytest.mark.parametrize(("cls", "kwargs", "fragments"), BAD, ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _ in BAD])
def test_bad_values_are_refused_naming_key_value_and_rule(cls, kwargs, fragments):
    with pytest.raises(ConfigError) as caught:
        cls(**kwargs)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("cls", list(RULES))
def test_defaults_pass_and_every_number_has_a_rule(cls):
    cls()
    hints = typing.get_type_hints(cls)
    numeric = [
        f.name for f in dataclasses.fields(cls) if {int, float} & set(typing.get_args(hints[f.name]) or [hints[f.name]])
    ]
    assert numeric and not [name for name in numeric if name not in RULES[cls]]
    assert not [name for name in RULES[cls] if name not in hints]  # no rule for a key that is gone


GOOD = [
    (PPOConfig, {"top_p": 1.0, "top_k": 0, "kl_coef": 0.0, "save_steps": 0, "gamma": 0.0, "lam": 1.0}),
    (PPOConfig, {"learning_rate": 1, "mini_batch_size": 2, "gradient_accumulation_steps": 2, "stop_strings": ("x",)}),
    (PPOConfig, {"reward_timeout_s": 0.0, "reward_max_abs": None, "reward_funcs": ["length_penalty", len]}),
    (SFTConfig, {"eval_fraction": 0.0, "warmup_ratio": 1.0, "max_grad_norm": None}),
    (EvalConfig, {"top_p": None, "top_k": None, "reward_timeout_s": None}),
    (DemoConfig, {"ppo_mini_batch_size": None, "policy_pairs_per_prompt": 0, "pair_samples": 1}),
]


@pytest.mark.parametrize(("cls", "kwargs"), GOOD)
def test_edge_values_that_are_allowed(cls, kwargs):
    config = cls(**kwargs)
    assert all(getattr(config, k) == v for k, v in kwargs.items())  # kept as given, not rewritten


def test_a_mini_batch_that_does_not_divide_the_rollout_warns():
    with pytest.warns(UserWarning, match="last mini-batch has 1"):
        PPOConfig(batch_size=3, mini_batch_size=2)


def test_the_error_names_the_file_or_the_override(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("batch_size: 4\nsampling:\n  top_p: 1.5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: PPOConfig.top_p must be in \(0, 1\], got 1.5$"):
        load_config(PPOConfig, path)
    with pytest.raises(ConfigError, match=r"^override 'kl_coef=-1': PPOConfig.kl_coef must be >= 0, got -1"):
        load_config(PPOConfig, path, ["top_p=0.9", "kl_coef=-1"])
    with pytest.raises(
        ConfigError, match=r"^override 'batch_size=four': key 'batch_size' expects int, got 'four' \(str\)"
    ):
        load_config(SFTConfig, None, ["batch_size=four"])
    path.write_text("mini_batch_size: 16\n")  # a relation: names the key that broke it
    with pytest.raises(ConfigError, match=rf"^{path}: PPOConfig.mini_batch_size must be <= the 4 samples"):
        load_config(PPOConfig, path)
    with pytest.raises(ConfigError, match=r"override 'top_p=\[0.5': the value is not valid YAML"):
        load_config(PPOConfig, None, ["top_p=[0.5"])
