"""What each key of each config must be: one rule table per config class, checked at construction
(`ppo.config_io.validate`) after the key's type; None passes where the type allows it. The classes
and their help strings are in `ppo.config` (PPOConfig) and `ppo.stage_configs`; a check that
involves two keys is below (PPOConfig's) or stays with its class.
"""

from __future__ import annotations

import warnings

from ppo.config_io import FINITE, TEXT, ConfigError, above, at_least, between, check_list_items, one_of
from ppo.lr_schedule import SCHEDULES

PRECISION = one_of("fp32", "bf16", "auto")  # every config that trains or samples: PPO, the stages, the demo

# PPOConfig's keys without a rule are flags, paths, names or lists, checked in
# `check_ppo_relations` below.
PPO_RULES = {
    "num_epochs": at_least(1),
    "max_steps": at_least(1),
    "max_length": at_least(2),
    "learning_rate": above(0),
    "value_learning_rate": above(0),
    "weight_decay": at_least(0),
    "batch_size": at_least(1),
    "mini_batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "forward_batch_size": at_least(1),
    "ppo_epochs": at_least(1),
    "lr_scheduler": one_of(*SCHEDULES),
    "lr_schedule_steps": at_least(1),
    "warmup_steps": at_least(0),
    "max_grad_norm": above(0),
    "seed": at_least(0),
    "gamma": between(0, 1),
    "lam": between(0, 1),
    "clip_range": above(0),
    "clip_range_value": above(0),
    "vf_coef": at_least(0),
    "entropy_coef": FINITE,
    "reward_clip": above(0),
    "approx_kl_stop": above(0),
    "kl_coef": at_least(0),
    "target_kl": above(0),
    "kl_horizon": at_least(1),
    "kl_estimator": one_of("k1", "k2", "k3"),
    "max_new_tokens": at_least(1),
    "temperature": above(0),
    "top_k": at_least(0),
    "top_p": between(0, 1, low_open=True),
    "num_generations": at_least(1),
    "missing_eos_penalty": at_least(0),
    "value_head": one_of("separate", "shared"),
    "precision": PRECISION,
    "fp32_matmul": one_of("auto", "mkl", "onednn"),
    "lora_r": at_least(0),
    "lora_alpha": above(0),
    "lora_dropout": between(0, 1, high_open=True),
    "optimizer": one_of("adamw", "adamw_8bit"),
    "save_steps": at_least(0),
    "save_total_limit": at_least(1),
    "logging_steps": at_least(1),
    "torch_dtype": one_of("float32", "bfloat16", "float16", "auto"),
    "strategy": one_of("ddp", "fsdp"),
    "critic_warmup_steps": at_least(0),
    "tis_cap": at_least(1),
    "dist_timeout_s": above(0),
    "reward_timeout_s": at_least(0),
    "reward_max_abs": above(0),
    "output_dir": TEXT,
    "prompt_column": TEXT,
}


# ---- the stages around PPO (ppo.stage_configs) ----

# The keys SFTConfig and RewardConfig share (StageConfig's):
STAGE_RULES = {
    "max_length": at_least(2),
    "learning_rate": above(0),
    "batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "num_epochs": at_least(1),
    "weight_decay": at_least(0),
    "warmup_ratio": between(0, 1),
    "lr_scheduler": one_of(*SCHEDULES),
    "max_grad_norm": above(0),
    "seed": at_least(0),
    "eval_fraction": between(0, 1, high_open=True),
    "logging_steps": at_least(1),
    "dist_timeout_s": above(0),
    "output_dir": TEXT,
    "prompt_column": TEXT,
    "precision": PRECISION,
}

SFT_RULES = {**STAGE_RULES, "completion_column": TEXT, "messages_column": TEXT}

REWARD_RULES = {
    **STAGE_RULES,
    "margin": at_least(0),
    "center_rewards_coefficient": at_least(0),
    "chosen_column": TEXT,
    "rejected_column": TEXT,
}

EVAL_RULES = {
    "num_samples": at_least(1),
    "batch_size": at_least(1),
    "max_new_tokens": at_least(1),
    "temperature": at_least(0),
    "top_k": at_least(0),
    "top_p": between(0, 1, low_open=True),
    "best_of_n": at_least(1),
    "seed": at_least(0),
    "reward_timeout_s": at_least(0),
    "reward_max_abs": above(0),
    "output_dir": TEXT,
    "prompt_column": TEXT,
    "answer_column": TEXT,
}

_COUNTS = (
    "threads",
    "hidden_size",
    "num_layers",
    "intermediate_multiple",
    "n_sft",
    "n_pref",
    "n_ppo",
    "n_eval",
    "sft_epochs",
    "sft_batch_size",
    "reward_epochs",
    "reward_batch_size",
    "pair_samples",
    "refresh_prompts",
    "refresh_epochs",
    "ppo_steps",
    "ppo_batch_size",
    "ppo_mini_batch_size",
    "ppo_epochs",
    "num_generations",
    "max_new_tokens",
    "best_of_n",
)
DEMO_RULES = {
    **dict.fromkeys(_COUNTS, at_least(1)),
    "seed": at_least(0),
    "policy_pairs_per_prompt": at_least(0),
    "report_samples": at_least(0),
    **dict.fromkeys(
        ("sft_learning_rate", "reward_learning_rate", "ppo_learning_rate", "value_learning_rate"), above(0)
    ),
    "reward_eval_fraction": between(0, 1, high_open=True),
    "pair_temperature": above(0),
    "temperature": above(0),
    "refresh_at": between(0, 1, high_open=True),
    "kl_coef": at_least(0),
    "target_kl": above(0),
    "vf_coef": at_least(0),
    "missing_eos_penalty": at_least(0),
    "value_head": one_of("separate", "shared"),
    "precision": PRECISION,
    "ppo_lr_scheduler": one_of(*SCHEDULES),  # the PPO trainer's own
    "output_dir": TEXT,
}


def check_ppo_relations(cfg) -> None:
    """PPOConfig's rules that involve two keys, and the items of list keys."""
    check_list_items(
        cfg,
        "reward_funcs",
        lambda f: callable(f) or (isinstance(f, str) and f.strip() != ""),
        "a built-in name, `module:function`, `file.py:function` or a callable",
    )
    check_list_items(cfg, "reward_weights", lambda w: FINITE.allows(w), "a finite number")
    check_list_items(cfg, "stop_strings", lambda x: isinstance(x, str) and x != "", "a non-empty string")
    check_list_items(cfg, "lora_target_modules", lambda x: isinstance(x, str) and x != "", "a module name")
    check_list_items(
        cfg, "report_to", lambda x: x in ("tensorboard", "wandb", "none", "jsonl"), "one of tensorboard, wandb, none"
    )
    rollout = cfg.batch_size * cfg.num_generations
    if cfg.mini_batch_size is not None and cfg.mini_batch_size > rollout:
        raise ConfigError(
            f"PPOConfig.mini_batch_size must be <= the {rollout} samples of one rollout (batch_size {cfg.batch_size} "
            f"x num_generations {cfg.num_generations}), got {cfg.mini_batch_size}",
            key="mini_batch_size",
        )
    mini = cfg.mini_batch_size or rollout
    if rollout % mini:
        warnings.warn(
            f"mini_batch_size {mini} does not divide the rollout of {rollout} samples: each epoch's last "
            f"mini-batch has {rollout % mini}",
            stacklevel=3,
        )
    if cfg.gradient_accumulation_steps > mini:
        raise ConfigError(
            f"PPOConfig.gradient_accumulation_steps must be <= the mini-batch's {mini} samples (it splits each "
            f"mini-batch into that many micro-batches), got {cfg.gradient_accumulation_steps}",
            key="gradient_accumulation_steps",
        )
    if cfg.lr_schedule_steps is not None and cfg.warmup_steps > cfg.lr_schedule_steps:
        raise ConfigError(
            f"PPOConfig.warmup_steps must be <= lr_schedule_steps ({cfg.lr_schedule_steps}), got {cfg.warmup_steps}",
            key="warmup_steps",
        )
    if not (isinstance(cfg.fp32_attention, bool) or cfg.fp32_attention == "auto"):
        raise ConfigError(
            f"PPOConfig.fp32_attention must be true, false or auto; got {cfg.fp32_attention!r}", key="fp32_attention"
        )
    if not (isinstance(cfg.fused_lm_head, bool) or cfg.fused_lm_head == "auto"):
        raise ConfigError(
            f"PPOConfig.fused_lm_head must be true, false or auto; got {cfg.fused_lm_head!r}", key="fused_lm_head"
        )
    if not (isinstance(cfg.rollout_logprobs, bool) or cfg.rollout_logprobs == "auto"):
        raise ConfigError(
            f"PPOConfig.rollout_logprobs must be true, false or auto; got {cfg.rollout_logprobs!r}",
            key="rollout_logprobs",
        )
    if cfg.tis_cap is not None and cfg.rollout_logprobs is True:
        raise ConfigError(
            "PPOConfig.tis_cap weights pi_old (a scoring forward) against the sampling pass; with "
            "rollout_logprobs=true they are the same numbers and every weight is 1: set rollout_logprobs=auto "
            "or false",
            key="tis_cap",
        )
    if cfg.gradient_checkpointing and cfg.fp32_matmul == "onednn":
        raise ConfigError(
            "PPOConfig.fp32_matmul=onednn cannot run with gradient_checkpointing: the recomputation in backward "
            "runs outside the oneDNN context and computes the layers with another kernel; use auto or mkl",
            key="fp32_matmul",
        )
    if not (isinstance(cfg.compile_layers, bool) or cfg.compile_layers == "auto"):
        raise ConfigError(
            f"PPOConfig.compile_layers must be true, false or auto; got {cfg.compile_layers!r}", key="compile_layers"
        )
    if cfg.compile_layers is True and (cfg.gradient_checkpointing or cfg.fp32_matmul == "onednn"):
        other = "gradient_checkpointing=true" if cfg.gradient_checkpointing else "fp32_matmul=onednn"
        raise ConfigError(
            f"PPOConfig.compile_layers=true cannot run with {other}: the compiled layers are traced with torch's "
            "own kernels and without recomputation; turn one of them off",
            key="compile_layers",
        )
    if cfg.resume_from_checkpoint and cfg.overwrite:
        raise ConfigError(
            "PPOConfig: resume_from_checkpoint and overwrite=true contradict each other (overwrite would delete "
            "the run being resumed); set only one",
            key="overwrite",
        )
