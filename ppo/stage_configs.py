"""The configs of the stages around PPO: SFT, reward model, evaluation and the built-in demo.

Same rules as PPOConfig (`ppo.config`): one help string per field, strict loading, the effective
config written as output_dir/config.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass

from ppo.config_io import (
    FINITE,
    TEXT,
    ConfigError,
    check_choice,
    check_list_items,
    opt,
    validate,
)
from ppo.config_rules import DEMO_RULES, EVAL_RULES, REWARD_RULES, SFT_RULES, STAGE_RULES


@dataclass
class StageConfig:
    """The fields SFT and reward-model training share; each stage redefines those whose default or
    meaning differs (a redefined field keeps its place in the help and the option tables)."""

    # --- model and data ---
    model_name_or_path: str | None = opt(None, "The model to train: a Hugging Face model directory or hub name.")
    data: str | None = opt(None, "Training data: a JSONL/JSON/CSV/Parquet file or a `datasets` directory.")
    prompt_column: str = opt("prompt", "Column holding the prompt (a string or chat messages).")
    skip_bad_rows: bool = opt(False, "Drop malformed rows with a warning instead of stopping at the first one.")
    max_length: int = opt(512, "Cap on prompt + completion tokens; the prompt is cut from the left first.")

    # --- optimisation ---
    learning_rate: float = opt(1e-5, "AdamW peak learning rate (the tiny demo model needs ~1e-3).")
    batch_size: int = opt(8, "Examples per forward/backward pass.")
    gradient_accumulation_steps: int = opt(1, "Passes per optimizer step (effective batch = batch_size * this).")
    num_epochs: int = opt(1, "Passes over the training rows.")
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only (not biases or norms).")
    warmup_ratio: float = opt(
        0.0, "Share of optimizer steps spent warming the learning rate up linearly (the warm-up of PPO's warmup_steps)."
    )
    lr_scheduler: str = opt("linear", "Learning-rate schedule after warmup: constant, linear or cosine.")
    max_grad_norm: float | None = opt(1.0, "Gradient-norm clip; None disables.")
    seed: int = opt(0, "Seeds shuffling, the eval split and initialisation.")
    eval_fraction: float = opt(0.0, "Share of rows held out to report an eval loss (0: none).")
    precision: str = opt(
        "auto",
        "auto: bf16 autocast where the hardware is fast at it (AVX512-BF16/AMX CPUs, bf16 GPUs), else fp32; or "
        "fp32, bf16. Weights and AdamW states stay fp32; losses, scores and accuracies are computed in fp32 "
        "(docs/precision.md).",
    )
    fused_mlp: bool = opt(
        True,
        "The model's MLPs keep their gate and up projections for backward and recompute silu(gate) * up there "
        "(the same bits, less activation memory; Qwen3/Qwen2/Llama, one process). See PPOConfig.fused_mlp.",
    )
    fused_norm: bool = opt(
        True,
        "The model's RMS norms keep their input and 1/rms for backward and recompute the rest there (the same "
        "values to float rounding, less activation memory; Qwen3/Qwen2/Llama, one process). See PPOConfig.fused_norm.",
    )

    # --- output ---
    output_dir: str = opt("stage_output", "Where config.yaml, metrics.jsonl, run.json and final/ go.")
    logging_steps: int = opt(10, "Write a metrics.jsonl line every N optimizer steps.")
    progress_bar: bool = opt(True, "Show a progress bar.")
    save_final: bool = opt(True, "Save the trained model and tokenizer to output_dir/final.")
    overwrite: bool = opt(
        False,
        "Replace the outputs of another run or a finished one in output_dir (otherwise refused), once the new "
        "run has loaded; other files there stay.",
    )
    dist_timeout_s: float = opt(
        1800.0, "Under torchrun: seconds a collective waits for the other ranks before the run fails."
    )

    def __post_init__(self) -> None:
        validate(self, STAGE_RULES)


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning on prompt/completion pairs: the loss is on completion tokens only."""

    model_name_or_path: str | None = opt(None, "Causal LM to fine-tune: a Hugging Face model directory or hub name.")
    learning_rate: float = opt(2e-5, "AdamW peak learning rate (the tiny demo model needs ~1e-3).")
    output_dir: str = opt("sft_output", "Where config.yaml, metrics.jsonl, run.json and final/ go.")
    save_final: bool = opt(True, "Save the fine-tuned model and tokenizer to output_dir/final.")
    # --- data (SFT's own columns) ---
    completion_column: str = opt("completion", "Column holding the target completion.")
    messages_column: str = opt(
        "messages", "Column holding a whole conversation; the last assistant turn is the completion."
    )
    # --- speed and memory ---
    fused_lm_head: bool = opt(
        True,
        "Only the completion tokens' states go through the LM head (and the last layer's MLP), a chunk of rows at "
        "a time: no [B, T, V] logits over prompt and padding, nor their gradient. Same maths, float rounding apart; "
        "Qwen3/Qwen2/Llama with a plain linear head, one process (elsewhere the model's own logits).",
    )

    def __post_init__(self) -> None:
        validate(self, SFT_RULES)


@dataclass
class RewardConfig(StageConfig):
    """Reward-model training on preference pairs with the Bradley–Terry loss
    `-logsigmoid(r_chosen - r_rejected - margin)`."""

    model_name_or_path: str | None = opt(
        None, "A sequence classifier with one label, or a causal LM with init_from_policy."
    )
    data: str | None = opt(None, "Preference data: a JSONL/JSON/CSV/Parquet file or a `datasets` directory.")
    prompt_column: str = opt("prompt", "Column holding the prompt (may be empty when chosen/rejected are whole texts).")
    batch_size: int = opt(8, "Preference pairs per forward/backward pass (2x sequences).")
    num_epochs: int = opt(1, "Passes over the training pairs.")
    seed: int = opt(0, "Seeds shuffling, the eval split and the fresh score head.")
    eval_fraction: float = opt(0.1, "Share of pairs held out for pairwise accuracy before and after training.")
    output_dir: str = opt("reward_output", "Where config.yaml, metrics.jsonl, run.json and final/ go.")
    save_final: bool = opt(True, "Save the reward model and tokenizer to output_dir/final.")
    # --- model and data (the reward model's own) ---
    init_from_policy: bool = opt(False, "Start from a causal-LM checkpoint: same backbone, fresh scalar head.")
    chosen_column: str = opt("chosen", "Column holding the preferred completion.")
    rejected_column: str = opt("rejected", "Column holding the dispreferred completion.")

    # --- loss ---
    margin: float = opt(0.0, "Bradley–Terry margin: the chosen score must beat the rejected one by this much.")
    group_by_prompt: bool = opt(
        True,
        "Shuffle whole prompts, not pairs, so a prompt's pairs share a step and each distinct response is scored "
        "once (same loss, less compute when prompts have several pairs).",
    )
    center_rewards_coefficient: float = opt(
        0.0, "Weight of the auxiliary loss (r_chosen + r_rejected)^2 that keeps scores near 0 (TRL suggests 0.01)."
    )

    def __post_init__(self) -> None:
        validate(self, REWARD_RULES)


# ---- stage configs: evaluation and demo ----
# `ppo-rlhf eval` scores any policy; `ppo-rlhf demo` runs every stage on the built-in task. Same
# rules as above: one help string per field, strict loading, config.yaml written next to outputs.


@dataclass
class EvalConfig:
    """Scores a policy on held-out prompts (reward, KL, accuracy) and/or a text set (perplexity)."""

    # --- models and reward sources ---
    model_name_or_path: str | None = opt(None, "Policy to evaluate: a Hugging Face model directory or hub name.")
    ref_model_path: str | None = opt(None, "Reference policy for the KL (e.g. the SFT model); None: no KL.")
    reward_model_path: str | None = opt(
        None, "Reward model directory (AutoModelForSequenceClassification, num_labels=1)."
    )
    reward_funcs: list = opt([], "Reward functions: built-in names or `module:function` / `file.py:function`.")
    reward_weights: list | None = opt(
        None, "One weight per reward source (the reward model first) for the combined reward."
    )

    # --- data ---
    prompts_file: str | None = opt(None, "Prompts: a text file (one per line) or a JSONL/JSON/CSV/Parquet file.")
    dataset_name: str | None = opt(None, "A `datasets` name or local path, instead of prompts_file.")
    prompt_column: str = opt("prompt", "Column holding the prompt (a string or chat messages).")
    answer_column: str = opt(
        "answer", "Column holding the reference answer for exact-match accuracy (skipped if absent)."
    )
    text_file: str | None = opt(None, "Texts for perplexity, one per line; None: no perplexity.")
    num_samples: int | None = opt(None, "Evaluate only the first N prompts (None: all).")

    # --- sampling ---
    batch_size: int = opt(64, "Prompts per generation batch (best_of_n multiplies the rows).")
    max_new_tokens: int = opt(32, "Longest response in tokens.")
    temperature: float = opt(
        1.0,
        "Sampling temperature; the KL is measured at the same temperature. 0: greedy decoding (the KL is then "
        "measured at temperature 1).",
    )
    top_k: int | None = opt(None, "Keep only the k most likely tokens (None/0: off).")
    top_p: float | None = opt(None, "Nucleus sampling mass (None/1.0: off).")
    best_of_n: int = opt(
        1, "Sample N responses per prompt and keep the best by the reward sources (1: plain sampling)."
    )
    seed: int = opt(0, "Seeds sampling.")
    reward_timeout_s: float | None = opt(
        300.0,
        "Seconds one call of a reward function may take before the run stops with an error naming it (0 or None: "
        "no limit; the worker thread cannot be killed).",
    )
    reward_max_abs: float | None = opt(
        1e4, "Largest |value| a reward function may return; a larger one is refused as a bug (None: no bound)."
    )

    # --- output ---
    output_dir: str = opt("eval_output", "Where eval.json, config.yaml and run.json go.")
    overwrite: bool = opt(
        False,
        "Replace the outputs of another run in output_dir (otherwise refused; the same config may run again); "
        "other files there stay.",
    )

    def __post_init__(self) -> None:
        validate(self, EVAL_RULES)
        check_list_items(
            self,
            "reward_funcs",
            lambda f: callable(f) or TEXT.allows(f),
            "a built-in name, `module:function` or `file.py:function`",
        )
        check_list_items(self, "reward_weights", lambda w: FINITE.allows(w), "a finite number")
        if self.best_of_n > 1 and self.temperature == 0:
            raise ConfigError(
                f"EvalConfig.best_of_n={self.best_of_n} needs temperature > 0: greedy decoding (temperature 0) "
                "gives every sample the same answer",
                key="best_of_n",
            )


@dataclass
class DemoConfig:
    """`ppo-rlhf demo`: SFT -> reward model -> PPO -> evaluation on the built-in digit-filter task."""

    # --- run ---
    output_dir: str = opt("demo_output", "Where every stage's model, the report and summary.json go.")
    seed: int = opt(0, "Seeds the task data, the models and every stage: the same seed gives the same run on CPU.")
    overwrite: bool = opt(
        False,
        "Replace the outputs of another run or a finished one in output_dir (otherwise refused), once the new "
        "run has loaded; other files there stay.",
    )
    quick: bool = opt(
        False, "A fast smoke run (tiny data, few steps) that checks the stages chain; not tuned to learn."
    )
    threads: int = opt(2, "CPU threads for torch; 1 and 2 give bit-identical results on these model sizes.")
    progress_bar: bool = opt(True, "Show a progress bar per stage.")

    # --- model (a from-scratch Qwen3) ---
    hidden_size: int = opt(128, "Hidden size of the tiny Qwen3 (heads = hidden_size / 32).")
    num_layers: int = opt(6, "Transformer layers (fewer layers give a less accurate reward model; see docs/demo.md).")
    intermediate_multiple: int = opt(2, "MLP width as a multiple of hidden_size.")

    # --- data (prompts are disjoint across splits) ---
    n_sft: int = opt(4000, "Noisy demonstrations for SFT.")
    n_pref: int = opt(
        3000, "Preference prompts, each with an oracle-labelled pair (a share held out for the RM accuracy)."
    )
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
    reward_eval_fraction: float = opt(
        0.1, "Share of preference prompts held out (with their pairs) for the RM's pairwise accuracy."
    )
    policy_pairs_per_prompt: int = opt(
        6, "Extra oracle-labelled pairs per preference prompt from the SFT policy's own samples (0: none)."
    )
    pair_samples: int = opt(4, "SFT samples drawn per prompt to build those pairs from.")
    pair_temperature: float = opt(
        1.0, "Sampling temperature of those samples (higher: more of the mistakes a drifting policy makes)."
    )
    drift_edits: bool = opt(
        True,
        "Add to each pool a copy of every sample with one drift mistake: a digit not in the list, a repeat, or "
        "one digit short.",
    )

    refresh_at: float = opt(
        0.0,
        "Share of PPO steps after which the labeller also compares the PPO policy's samples and the reward model "
        "trains on them (0: never).",
    )
    refresh_prompts: int = opt(1500, "Training preference prompts whose PPO-policy samples make the refresh pairs.")
    refresh_epochs: int = opt(2, "Passes of the refresh over its pairs (plus as many replayed earlier pairs).")

    # --- PPO ---
    ppo_steps: int = opt(100, "PPO iterations.")
    ppo_batch_size: int = opt(64, "Prompts per PPO iteration.")
    ppo_mini_batch_size: int | None = opt(32, "Samples per optimizer step (None: the whole rollout).")
    ppo_epochs: int = opt(4, "Update passes over each rollout.")
    ppo_learning_rate: float = opt(3e-4, "AdamW learning rate of the policy.")
    value_learning_rate: float | None = opt(None, "AdamW learning rate of the critic (None: ppo_learning_rate).")
    ppo_lr_scheduler: str = opt("cosine", "PPO learning-rate schedule over ppo_steps: constant, linear or cosine.")
    num_generations: int = opt(1, "Samples per prompt in each rollout.")
    kl_coef: float = opt(0.2, "KL penalty coefficient (the initial one when adaptive).")
    adap_kl_ctrl: bool = opt(False, "Adapt kl_coef towards target_kl.")
    target_kl: float = opt(1.0, "Target of the adaptive KL controller (summed KL per response).")
    temperature: float = opt(1.0, "Sampling temperature of PPO and of every evaluated policy.")
    max_new_tokens: int = opt(8, "Longest response in tokens (the longest ideal answer is 6 words + EOS).")
    whiten_rewards: bool = opt(False, "Normalise per-token rewards before GAE.")
    missing_eos_penalty: float | None = opt(1.0, "Subtracted from the score of responses that never ended.")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    value_head: str = opt(
        "separate", "'separate': critic copied from the reward model; 'shared': a head on the policy."
    )
    advantage_estimator: str = opt(
        "gae",
        "gae (PPO with a critic), grpo, rloo (both need num_generations >= 2) or reinforce_pp; see docs/estimators.md.",
    )
    kl_in_loss: bool = opt(
        False, "Put the KL to the reference in the policy loss instead of the reward (as the GRPO family does)."
    )
    precision: str = opt(
        "fp32",
        "The precision of every stage (SFT, reward model, PPO). fp32: these tiny models are bound by per-op "
        "overhead, not matmuls, so bf16 buys no time (see docs/demo.md); bf16 or auto as in PPOConfig.",
    )

    # --- evaluation and report ---
    best_of_n: int = opt(4, "Samples per prompt of the best-of-n baseline (picked by the reward model).")
    report_samples: int = opt(6, "Sample generations shown before/after in report.md.")

    def __post_init__(self) -> None:
        validate(self, DEMO_RULES)
        check_choice("advantage_estimator", self.advantage_estimator, ("gae", "grpo", "rloo", "reinforce_pp"))
        rollout = self.ppo_batch_size * self.num_generations
        if self.ppo_mini_batch_size is not None and self.ppo_mini_batch_size > rollout:
            raise ConfigError(
                f"DemoConfig.ppo_mini_batch_size must be <= the {rollout} samples of one rollout (ppo_batch_size "
                f"x num_generations), got {self.ppo_mini_batch_size}",
                key="ppo_mini_batch_size",
            )
        if self.policy_pairs_per_prompt and self.pair_samples < 2:
            raise ConfigError(
                f"DemoConfig.pair_samples must be >= 2 to make pairs (policy_pairs_per_prompt is "
                f"{self.policy_pairs_per_prompt}), got {self.pair_samples}",
                key="pair_samples",
            )
        if self.advantage_estimator in ("grpo", "rloo") and self.num_generations < 2:
            raise ConfigError(
                f"DemoConfig: advantage_estimator={self.advantage_estimator} needs num_generations >= 2, "
                f"got {self.num_generations}",
                key="num_generations",
            )
