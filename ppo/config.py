"""Typed configuration: dataclasses with one help string per field, loaded from YAML plus
`key=value` overrides.

Why this shape: a misspelt key must fail at load time (naming the file, the key and the closest
valid key) instead of silently falling back to a default, and the sizes we derive from the user's
numbers (mini-batch counts, per-rank batches) live in `BatchPlan`, never written back into the
config the user gave us.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names file, key and value."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help string (shown by `ppo-rlhf <stage> --help` and the README)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class PPOConfig:
    """Everything one PPO run needs. `PPOConfig()` works; names follow TRL's where they exist."""

    # --- models and data (used by the CLI recipes; the Python API takes model objects) ---
    model_name_or_path: str | None = opt(None, "Policy: a Hugging Face model directory or hub name.")
    reward_model_path: str | None = opt(None, "Reward model directory (AutoModelForSequenceClassification, num_labels=1).")
    value_model_path: str | None = opt(None, "Critic to start from; default: the reward model, else the policy.")
    ref_model_path: str | None = opt(None, "Frozen reference; default: a copy of the starting policy.")
    prompts_file: str | None = opt(None, "Prompts: a text file (one per line) or a JSONL/JSON/CSV/Parquet file.")
    dataset_name: str | None = opt(None, "A `datasets` name or local path, instead of prompts_file.")
    prompt_column: str = opt("prompt", "Dataset column holding the prompt (a string or chat messages).")
    reward_funcs: list = opt([], "Reward functions: built-in names or `module:function` / `file.py:function`.")
    reward_weights: list | None = opt(None, "One weight per reward source: the reward model first, then each function.")
    num_epochs: int = opt(1, "Passes over the prompt set.")
    max_length: int | None = opt(None, "Cap on prompt + response tokens; longer prompts are cut from the left.")

    # --- optimisation ---
    learning_rate: float = opt(1e-5, "AdamW learning rate of the policy.")
    value_learning_rate: float | None = opt(None, "AdamW learning rate of the critic; None: learning_rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    batch_size: int = opt(4, "Prompts per PPO iteration (global, across all ranks).")
    mini_batch_size: int | None = opt(None, "Samples per optimizer step; None: the whole rollout (one step per epoch).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches each mini-batch is split into (memory, not maths).")
    ppo_epochs: int = opt(4, "Passes of the update over each rollout.")
    max_grad_norm: float | None = opt(1.0, "Gradient-norm clip per model; None disables.")
    seed: int = opt(0, "Seeds sampling, shuffling and initialisation.")

    # --- PPO ---
    gamma: float = opt(1.0, "Discount factor.")
    lam: float = opt(0.95, "GAE lambda.")
    clip_range: float = opt(0.2, "Policy ratio clip epsilon.")
    clip_range_value: float = opt(0.2, "Value clip around the rollout's values.")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    entropy_coef: float = opt(0.0, "Weight of the entropy bonus (0: entropy is only logged).")
    whiten_advantages: bool = opt(True, "Normalise advantages over the batch's real tokens.")
    whiten_rewards: bool = opt(False, "Normalise per-token rewards (mean kept) before GAE.")
    reward_clip: float | None = opt(None, "Clip scores to [-reward_clip, reward_clip] before the KL penalty.")
    approx_kl_stop: float | None = opt(None, "Stop the epochs early when a mini-batch's approx-KL exceeds this.")

    # --- KL to the reference ---
    kl_coef: float = opt(0.1, "Initial KL penalty coefficient.")
    adap_kl_ctrl: bool = opt(True, "Adapt kl_coef towards target_kl (Ziegler et al., 2019).")
    target_kl: float = opt(0.01, "Target of the adaptive controller (summed KL per response).")
    kl_horizon: int = opt(10000, "Horizon of the adaptive controller.")
    kl_estimator: str = opt("k1", "Per-token KL estimator in the reward: k1, k2 or k3.")

    # --- sampling ---
    max_new_tokens: int = opt(32, "Longest response in tokens.")
    temperature: float = opt(1.0, "Sampling temperature; also applied to training log-probs.")
    top_k: int | None = opt(None, "Keep only the k most likely tokens (None/0: off).")
    top_p: float | None = opt(None, "Nucleus sampling mass (None/1.0: off).")
    num_generations: int = opt(1, "Samples per prompt.")
    stop_strings: list = opt([], "Extra strings that end a response (the EOS always does).")
    missing_eos_penalty: float | None = opt(None, "Subtracted from the score of responses that never ended.")

    # --- models ---
    value_head: str = opt("separate", "'separate': its own critic model; 'shared': a value head on the policy.")
    precision: str = opt("auto", "auto: bf16 autocast where the hardware is fast at it (AVX512-BF16/AMX CPUs, bf16 GPUs), else fp32; or fp32, bf16.")
    fp32_matmul: str = opt("auto", "CPU kernel of fp32 linear layers: auto (times both on the model's layer shapes at start and takes oneDNN if >= 25% faster, as on AMD CPUs with AVX-512 where MKL runs only AVX2 kernels), mkl, onednn. Same fp32 arithmetic; results differ by float rounding only.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    rollout_logprobs: bool = opt(True, "Take pi_old's log-probs from the sampling pass, not a second policy forward (same maths; differs only by float rounding).")
    lean_decode: bool = opt(True, "Sample Qwen3/Qwen2/Llama policies with a decode step of our own instead of the model's forward (same maths, float rounding apart; W3 sampling ~30% faster on CPU). Other models, and adapters, always use their forward.")
    host_mmap_threshold_mib: float | None = opt(None, "CPU runs: host allocations of at least this many MiB go straight to mmap, so freed activations return to the OS. W2 at 1.0: peak RSS -19%, time +55% (page faults). None: malloc's own policy. Process-wide, glibc only.")

    # --- LoRA (peft) ---
    lora_r: int = opt(0, "LoRA rank of the policy's adapter (0: full fine-tuning).")
    lora_alpha: int = opt(16, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = opt(0.0, "Dropout inside the adapter (kept 0 in rollout/update by design).")
    lora_target_modules: list = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names that get adapters ('all-linear' works too).")
    lora_critic: bool = opt(False, "Give the separate critic its own LoRA adapter instead of full weights.")
    save_merged: bool = opt(False, "With LoRA, also write output_dir/final-merged: the adapter merged into the base.")
    optimizer: str = opt("adamw", "adamw, or adamw_8bit (bitsandbytes, CUDA only).")

    # --- output ---
    output_dir: str = opt("ppo_output", "Where metrics, checkpoints and the final model go.")
    save_steps: int = opt(0, "Checkpoint every N steps (0: only the final model).")
    save_total_limit: int | None = opt(None, "Keep at most this many step_N checkpoints.")
    logging_steps: int = opt(1, "Write a metrics line every N steps.")
    progress_bar: bool = opt(True, "Show a progress bar during train().")
    resume_from_checkpoint: str | None = opt(None, "A step_N directory or 'latest' in output_dir.")
    overwrite: bool = opt(False, "Replace an output_dir that holds another run (otherwise refuse).")
    report_to: list = opt([], "Extra metric backends: tensorboard, wandb (metrics.jsonl is always written).")
    skip_bad_rows: bool = opt(False, "Log and skip malformed dataset rows instead of stopping.")
    torch_dtype: str = opt("float32", "dtype the models are loaded in: float32, bfloat16, float16 or auto.")

    # --- scaling out (under torchrun; ignored in one process) ---
    strategy: str = opt("ddp", "Data parallelism under torchrun: ddp (replicated models) or fsdp (FSDP2: sharded policy, critic, reference).")
    dist_timeout_s: float = opt(1800.0, "Seconds a collective waits for the other ranks before the run fails (a crashed or hung rank).")

    def __post_init__(self) -> None:
        _check_range(self, "batch_size", self.batch_size, 1)
        _check_range(self, "ppo_epochs", self.ppo_epochs, 1)
        _check_range(self, "gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_range(self, "num_generations", self.num_generations, 1)
        _check_range(self, "max_new_tokens", self.max_new_tokens, 1)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        _check_choice("value_head", self.value_head, ("separate", "shared"))
        _check_choice("precision", self.precision, ("fp32", "bf16", "auto"))
        _check_choice("fp32_matmul", self.fp32_matmul, ("auto", "mkl", "onednn"))
        if self.host_mmap_threshold_mib is not None and self.host_mmap_threshold_mib <= 0:
            raise ConfigError(f"host_mmap_threshold_mib must be > 0 (or None), got {self.host_mmap_threshold_mib}")
        _check_choice("kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _check_choice("optimizer", self.optimizer, ("adamw", "adamw_8bit"))
        _check_choice("strategy", self.strategy, ("ddp", "fsdp"))
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty must be positive (it is subtracted), got {self.missing_eos_penalty}")


def _check_range(cfg: Any, name: str, value: int, low: int) -> None:
    if value is None or value < low:
        raise ConfigError(f"{type(cfg).__name__}.{name} must be >= {low}, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class BatchPlan:
    """Sizes derived from a PPOConfig and the number of ranks; never written back to the config.

    rollout_size   = batch_size * num_generations samples per iteration (global)
    mini_batch     = samples per optimizer step (global)
    micro_batch    = samples per forward/backward on one rank
    """

    rollout_size: int
    mini_batch: int
    micro_batch: int
    steps_per_epoch: int
    world_size: int

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return self.steps_per_epoch


def plan_batches(config: PPOConfig, n_prompts: int | None = None, world_size: int = 1) -> BatchPlan:
    """Derive the batch arithmetic. `n_prompts` overrides batch_size (for `step()` on any list)."""
    prompts = config.batch_size if n_prompts is None else n_prompts
    rollout = prompts * config.num_generations
    mini = min(config.mini_batch_size or rollout, rollout)
    if mini % world_size:
        raise ConfigError(f"mini_batch_size {mini} must divide evenly over {world_size} ranks")
    per_rank = mini // world_size
    micro = max(1, math.ceil(per_rank / config.gradient_accumulation_steps))
    return BatchPlan(rollout, mini, micro, math.ceil(rollout / mini), world_size)


# ----------------------------------------------------------------------------------------------
# Loading: YAML file + dotted key=value overrides -> dataclass, strictly.
# ----------------------------------------------------------------------------------------------


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build `cls` from an optional YAML file and `key=value` overrides (values parsed as YAML).

    Unknown keys raise ConfigError naming the file, the key, a close match and the valid keys.
    """
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text: {err}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(loaded).__name__}")
        values.update(_flatten(loaded))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        values[key.strip().lstrip("-").replace("-", "_")] = yaml.safe_load(raw) if raw != "" else None
    return build_config(cls, values, source)


def build_config(cls: type[C], values: dict[str, Any], source: str = "arguments") -> C:
    """Instantiate `cls` from a flat dict, checking every key and coercing simple types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(cls, key, source, list(fields)))
        kwargs[key] = _coerce(hints[key], value, key, source)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    # Sections in YAML are only for readability (`sampling: {temperature: 0.7}`): keys are flat.
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not key.endswith("_kwargs"):
            flat.update(_flatten(value, prefix))
        else:
            flat[prefix + str(key)] = value
    return flat


def _unknown_key_message(cls: type, key: str, source: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{source}: unknown key {key!r} for {cls.__name__}.{hint} Valid keys: {', '.join(sorted(valid))}"


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    if value is None:
        return None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    options = [o for o in options if o is not type(None)]
    for target in options:
        base = typing.get_origin(target) or target
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):
            # YAML 1.1 reads `1e-5` (no dot) as a string; users mean the number.
            try:
                return float(value)
            except ValueError:
                pass
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if base is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if base is dict and isinstance(value, dict):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{source}: key {key!r} expects {wanted}, got {value!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the effective config as YAML next to a run's outputs (what actually ran)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def config_help(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) rows for docs and `--help`."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, json.dumps(default), f.metadata.get("help", "")))
    return rows


# ---- stage configs: SFT and reward model ----
# The two recipes before PPO (`ppo-rlhf sft`, `ppo-rlhf reward`). Same rules as PPOConfig: one help
# string per field, strict loading, the effective config written as output_dir/config.yaml.

_SCHEDULERS = ("constant", "linear", "cosine")


def _check_stage_common(cfg: Any) -> None:
    """Checks shared by SFTConfig and RewardConfig (both have these fields)."""
    for name in ("batch_size", "num_epochs", "gradient_accumulation_steps", "logging_steps"):
        _check_range(cfg, name, getattr(cfg, name), 1)
    _check_range(cfg, "max_length", cfg.max_length, 2)
    _check_choice("lr_scheduler", cfg.lr_scheduler, _SCHEDULERS)
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"{type(cfg).__name__}.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ConfigError(f"{type(cfg).__name__}.warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"{type(cfg).__name__}.learning_rate must be > 0, got {cfg.learning_rate}")


@dataclass
class SFTConfig:
    """Supervised fine-tuning on prompt/completion pairs: the loss is on completion tokens only."""

    # --- model and data ---
    model_name_or_path: str | None = opt(None, "Causal LM to fine-tune: a Hugging Face model directory or hub name.")
    data: str | None = opt(None, "Training data: a JSONL/JSON/CSV/Parquet file or a `datasets` directory.")
    prompt_column: str = opt("prompt", "Column holding the prompt (a string or chat messages).")
    completion_column: str = opt("completion", "Column holding the target completion.")
    messages_column: str = opt("messages", "Column holding a whole conversation; the last assistant turn is the completion.")
    skip_bad_rows: bool = opt(False, "Drop malformed rows with a warning instead of stopping at the first one.")
    max_length: int = opt(512, "Cap on prompt + completion tokens; the prompt is cut from the left first.")

    # --- optimisation ---
    learning_rate: float = opt(2e-5, "AdamW peak learning rate (the tiny demo model needs ~1e-3).")
    batch_size: int = opt(8, "Examples per forward/backward pass.")
    gradient_accumulation_steps: int = opt(1, "Passes per optimizer step (effective batch = batch_size * this).")
    num_epochs: int = opt(1, "Passes over the training rows.")
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only (not biases or norms).")
    warmup_ratio: float = opt(0.0, "Share of optimizer steps spent warming the learning rate up from 0.")
    lr_scheduler: str = opt("linear", "Learning-rate schedule after warmup: constant, linear or cosine.")
    max_grad_norm: float | None = opt(1.0, "Gradient-norm clip; None disables.")
    seed: int = opt(0, "Seeds shuffling, the eval split and initialisation.")
    eval_fraction: float = opt(0.0, "Share of rows held out to report an eval loss (0: none).")

    # --- output ---
    output_dir: str = opt("sft_output", "Where config.yaml, metrics.jsonl and final/ go.")
    logging_steps: int = opt(10, "Write a metrics.jsonl line every N optimizer steps.")
    progress_bar: bool = opt(True, "Show a progress bar.")
    save_final: bool = opt(True, "Save the fine-tuned model and tokenizer to output_dir/final.")
    overwrite: bool = opt(False, "Replace the outputs of a different run already in output_dir.")
    dist_timeout_s: float = opt(1800.0, "Under torchrun: seconds a collective waits for the other ranks before the run fails.")

    def __post_init__(self) -> None:
        _check_stage_common(self)


@dataclass
class RewardConfig:
    """Reward-model training on preference pairs with the Bradley–Terry loss
    `-logsigmoid(r_chosen - r_rejected - margin)`."""

    # --- model and data ---
    model_name_or_path: str | None = opt(None, "A sequence classifier with one label, or a causal LM with init_from_policy.")
    init_from_policy: bool = opt(False, "Start from a causal-LM checkpoint: same backbone, fresh scalar head.")
    data: str | None = opt(None, "Preference data: a JSONL/JSON/CSV/Parquet file or a `datasets` directory.")
    prompt_column: str = opt("prompt", "Column holding the prompt (may be empty when chosen/rejected are whole texts).")
    chosen_column: str = opt("chosen", "Column holding the preferred completion.")
    rejected_column: str = opt("rejected", "Column holding the dispreferred completion.")
    skip_bad_rows: bool = opt(False, "Drop malformed rows with a warning instead of stopping at the first one.")
    max_length: int = opt(512, "Cap on prompt + completion tokens; the prompt is cut from the left first.")

    # --- loss ---
    margin: float = opt(0.0, "Bradley–Terry margin: the chosen score must beat the rejected one by this much.")
    group_by_prompt: bool = opt(True, "Shuffle whole prompts, not pairs, so a prompt's pairs share a step and each distinct response is scored once (same loss, less compute when prompts have several pairs).")
    center_rewards_coefficient: float = opt(0.0, "Weight of the auxiliary loss (r_chosen + r_rejected)^2 that keeps scores near 0 (TRL suggests 0.01).")

    # --- optimisation ---
    learning_rate: float = opt(1e-5, "AdamW peak learning rate (the tiny demo model needs ~1e-3).")
    batch_size: int = opt(8, "Preference pairs per forward/backward pass (2x sequences).")
    gradient_accumulation_steps: int = opt(1, "Passes per optimizer step (effective batch = batch_size * this).")
    num_epochs: int = opt(1, "Passes over the training pairs.")
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only (not biases or norms).")
    warmup_ratio: float = opt(0.0, "Share of optimizer steps spent warming the learning rate up from 0.")
    lr_scheduler: str = opt("linear", "Learning-rate schedule after warmup: constant, linear or cosine.")
    max_grad_norm: float | None = opt(1.0, "Gradient-norm clip; None disables.")
    seed: int = opt(0, "Seeds shuffling, the eval split and the fresh score head.")
    eval_fraction: float = opt(0.1, "Share of pairs held out for pairwise accuracy before and after training.")

    # --- output ---
    output_dir: str = opt("reward_output", "Where config.yaml, metrics.jsonl and final/ go.")
    logging_steps: int = opt(10, "Write a metrics.jsonl line every N optimizer steps.")
    progress_bar: bool = opt(True, "Show a progress bar.")
    save_final: bool = opt(True, "Save the reward model and tokenizer to output_dir/final.")
    overwrite: bool = opt(False, "Replace the outputs of a different run already in output_dir.")
    dist_timeout_s: float = opt(1800.0, "Under torchrun: seconds a collective waits for the other ranks before the run fails.")

    def __post_init__(self) -> None:
        _check_stage_common(self)


# ---- stage configs: evaluation and demo ----
# `ppo-rlhf eval` scores any policy; `ppo-rlhf demo` runs every stage on the built-in task. Same
# rules as above: one help string per field, strict loading, config.yaml written next to outputs.


@dataclass
class EvalConfig:
    """Scores a policy on held-out prompts (reward, KL, accuracy) and/or a text set (perplexity)."""

    # --- models and reward sources ---
    model_name_or_path: str | None = opt(None, "Policy to evaluate: a Hugging Face model directory or hub name.")
    ref_model_path: str | None = opt(None, "Reference policy for the KL (e.g. the SFT model); None: no KL.")
    reward_model_path: str | None = opt(None, "Reward model directory (AutoModelForSequenceClassification, num_labels=1).")
    reward_funcs: list = opt([], "Reward functions: built-in names or `module:function` / `file.py:function`.")
    reward_weights: list | None = opt(None, "One weight per reward source (the reward model first) for the combined reward.")

    # --- data ---
    prompts_file: str | None = opt(None, "Prompts: a text file (one per line) or a JSONL/JSON/CSV/Parquet file.")
    dataset_name: str | None = opt(None, "A `datasets` name or local path, instead of prompts_file.")
    prompt_column: str = opt("prompt", "Column holding the prompt (a string or chat messages).")
    answer_column: str = opt("answer", "Column holding the reference answer for exact-match accuracy (skipped if absent).")
    text_file: str | None = opt(None, "Texts for perplexity, one per line; None: no perplexity.")
    num_samples: int | None = opt(None, "Evaluate only the first N prompts (None: all).")

    # --- sampling ---
    batch_size: int = opt(64, "Prompts per generation batch (best_of_n multiplies the rows).")
    max_new_tokens: int = opt(32, "Longest response in tokens.")
    temperature: float = opt(1.0, "Sampling temperature; the KL is measured at the same temperature.")
    top_k: int | None = opt(None, "Keep only the k most likely tokens (None/0: off).")
    top_p: float | None = opt(None, "Nucleus sampling mass (None/1.0: off).")
    best_of_n: int = opt(1, "Sample N responses per prompt and keep the best by the reward sources (1: plain sampling).")
    seed: int = opt(0, "Seeds sampling.")

    # --- output ---
    output_dir: str = opt("eval_output", "Where eval.json and config.yaml go.")
    overwrite: bool = opt(False, "Replace the outputs of a different run already in output_dir.")

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "best_of_n"):
            _check_range(self, name, getattr(self, name), 1)
        if self.num_samples is not None:
            _check_range(self, "num_samples", self.num_samples, 1)
        if self.temperature <= 0:
            raise ConfigError(f"EvalConfig.temperature must be > 0, got {self.temperature}")


@dataclass
class DemoConfig:
    """`ppo-rlhf demo`: SFT -> reward model -> PPO -> evaluation on the built-in digit-filter task."""

    # --- run ---
    output_dir: str = opt("demo_output", "Where every stage's model, the report and summary.json go.")
    seed: int = opt(0, "Seeds the task data, the models and every stage: the same seed gives the same run on CPU.")
    overwrite: bool = opt(False, "Replace the outputs of a different run already in output_dir.")
    quick: bool = opt(False, "A fast smoke run (tiny data, few steps) that checks the stages chain; not tuned to learn.")
    threads: int = opt(2, "CPU threads for torch; 1 and 2 give bit-identical results on these model sizes.")
    progress_bar: bool = opt(True, "Show a progress bar per stage.")

    # --- model (a from-scratch Qwen3) ---
    hidden_size: int = opt(128, "Hidden size of the tiny Qwen3 (heads = hidden_size / 32).")
    num_layers: int = opt(6, "Transformer layers (the reward model reaches 91.6% held-out accuracy with 6, 86% with 4).")
    intermediate_multiple: int = opt(2, "MLP width as a multiple of hidden_size.")

    # --- data (prompts are disjoint across splits) ---
    n_sft: int = opt(4000, "Noisy demonstrations for SFT.")
    n_pref: int = opt(3000, "Preference prompts, each with an oracle-labelled pair (a share held out for the RM accuracy).")
    n_ppo: int = opt(2000, "PPO training prompts.")
    n_eval: int = opt(256, "Held-out evaluation prompts.")

    # --- SFT ---
    sft_learning_rate: float = opt(3e-3, "AdamW learning rate of SFT.")
    sft_epochs: int = opt(6, "Passes over the demonstrations.")
    sft_batch_size: int = opt(64, "Demonstrations per optimizer step.")

    # --- reward model ---
    reward_learning_rate: float = opt(1e-3, "AdamW learning rate of the reward model.")
    reward_epochs: int = opt(3, "Passes over the preference pairs.")
    reward_batch_size: int = opt(64, "Pairs per optimizer step.")
    reward_eval_fraction: float = opt(0.1, "Share of preference prompts held out (with their pairs) for the RM's pairwise accuracy.")
    policy_pairs_per_prompt: int = opt(6, "Extra oracle-labelled pairs per preference prompt from the SFT policy's own samples (0: none).")
    pair_samples: int = opt(4, "SFT samples drawn per prompt to build those pairs from.")
    pair_temperature: float = opt(1.0, "Sampling temperature of those samples (higher: more of the mistakes a drifting policy makes).")
    drift_edits: bool = opt(True, "Add to each pool a copy of every sample with one drift mistake: a digit not in the list, a repeat, or one digit short.")

    refresh_at: float = opt(0.0, "Share of PPO steps after which the labeller also compares the PPO policy's samples and the reward model trains on them (0: never).")
    refresh_prompts: int = opt(1500, "Training preference prompts whose PPO-policy samples make the refresh pairs.")
    refresh_epochs: int = opt(2, "Passes of the refresh over its pairs (plus as many replayed earlier pairs).")

    # --- PPO ---
    ppo_steps: int = opt(100, "PPO iterations.")
    ppo_batch_size: int = opt(64, "Prompts per PPO iteration.")
    ppo_mini_batch_size: int | None = opt(32, "Samples per optimizer step (None: the whole rollout).")
    ppo_epochs: int = opt(4, "Update passes over each rollout.")
    ppo_learning_rate: float = opt(3e-4, "AdamW learning rate of the policy.")
    value_learning_rate: float | None = opt(None, "AdamW learning rate of the critic (None: ppo_learning_rate).")
    num_generations: int = opt(1, "Samples per prompt in each rollout.")
    kl_coef: float = opt(0.2, "KL penalty coefficient (the initial one when adaptive).")
    adap_kl_ctrl: bool = opt(False, "Adapt kl_coef towards target_kl.")
    target_kl: float = opt(1.0, "Target of the adaptive KL controller (summed KL per response).")
    temperature: float = opt(1.0, "Sampling temperature of PPO and of every evaluated policy.")
    max_new_tokens: int = opt(8, "Longest response in tokens (the longest ideal answer is 6 words + EOS).")
    whiten_rewards: bool = opt(False, "Normalise per-token rewards before GAE.")
    missing_eos_penalty: float | None = opt(1.0, "Subtracted from the score of responses that never ended.")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    value_head: str = opt("separate", "'separate': critic copied from the reward model; 'shared': a head on the policy.")
    precision: str = opt("fp32", "PPO's precision. fp32: these tiny models are bound by per-op overhead, not matmuls, so bf16 buys no time (with bf16 autocast one run reached +23 gold, not +26); bf16 or auto as in PPOConfig.")

    # --- evaluation and report ---
    best_of_n: int = opt(4, "Samples per prompt of the best-of-n baseline (picked by the reward model).")
    report_samples: int = opt(6, "Sample generations shown before/after in report.md.")

    def __post_init__(self) -> None:
        for name in ("threads", "hidden_size", "num_layers", "intermediate_multiple", "n_sft", "n_pref", "n_ppo", "n_eval", "sft_epochs",
                     "sft_batch_size", "reward_epochs", "reward_batch_size", "ppo_steps", "ppo_batch_size",
                     "ppo_epochs", "num_generations", "max_new_tokens", "best_of_n"):
            _check_range(self, name, getattr(self, name), 1)
        if self.temperature <= 0:
            raise ConfigError(f"DemoConfig.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.refresh_at < 1:
            raise ConfigError(f"DemoConfig.refresh_at must be in [0, 1), got {self.refresh_at}")
        _check_choice("value_head", self.value_head, ("separate", "shared"))
        _check_choice("precision", self.precision, ("fp32", "bf16", "auto"))
