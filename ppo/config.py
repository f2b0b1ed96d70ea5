"""Typed configuration: dataclasses with one help string per field, loaded from YAML plus
`key=value` overrides.

Why this shape: a misspelt key must fail at load time (naming the file, the key and the closest
valid key) instead of silently falling back to a default, and the sizes we derive from the user's
numbers (mini-batch counts, per-rank batches) live in `BatchPlan`, never written back into the
config the user gave us.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The loading machinery, the rule tables and the stage configs live beside this module; their names
# stay importable from here (`from ppo.config import SFTConfig, load_config`).
from ppo.config_io import (  # noqa: F401
    FINITE,
    TEXT,
    ConfigError,
    above,
    at_least,
    between,
    build_config,
    check_choice,
    check_list_items,
    check_range,
    config_help,
    config_to_dict,
    load_config,
    one_of,
    opt,
    save_config,
    validate,
)
from ppo.config_rules import PPO_RULES, check_ppo_relations
from ppo.stage_configs import DemoConfig, EvalConfig, RewardConfig, SFTConfig  # noqa: F401


@dataclass
class PPOConfig:
    """Everything one PPO run needs. `PPOConfig()` works; names follow TRL's where they exist."""

    # --- models and data (used by the CLI recipes; the Python API takes model objects) ---
    model_name_or_path: str | None = opt(None, "Policy: a Hugging Face model directory or hub name.")
    reward_model_path: str | None = opt(
        None, "Reward model directory (AutoModelForSequenceClassification, num_labels=1)."
    )
    value_model_path: str | None = opt(None, "Critic to start from; default: the reward model, else the policy.")
    ref_model_path: str | None = opt(None, "Frozen reference; default: a copy of the starting policy.")
    prompts_file: str | None = opt(None, "Prompts: a text file (one per line) or a JSONL/JSON/CSV/Parquet file.")
    dataset_name: str | None = opt(None, "A `datasets` name or local path, instead of prompts_file.")
    prompt_column: str = opt("prompt", "Dataset column holding the prompt (a string or chat messages).")
    reward_funcs: list = opt([], "Reward functions: built-in names or `module:function` / `file.py:function`.")
    reward_weights: list | None = opt(None, "One weight per reward source: the reward model first, then each function.")
    reward_timeout_s: float | None = opt(
        300.0,
        "Seconds one call of a reward function may take before the run stops with an error naming it (0 or None: "
        "no limit). The call runs in a worker thread, which Python cannot kill: a function that never returns "
        "keeps that thread until the process ends.",
    )
    reward_max_abs: float | None = opt(
        1e4,
        "Largest |value| a reward function may return; a larger one is refused as a bug, naming the function and "
        "the sample (None: no bound).",
    )
    num_epochs: int = opt(1, "Passes over the prompt set.")
    max_steps: int | None = opt(
        None, "Stop after this many PPO steps, wherever the epochs are (None: num_epochs whole passes)."
    )
    max_length: int | None = opt(None, "Cap on prompt + response tokens; longer prompts are cut from the left.")

    # --- optimisation ---
    learning_rate: float = opt(1e-5, "AdamW learning rate of the policy.")
    value_learning_rate: float | None = opt(None, "AdamW learning rate of the critic; None: learning_rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only (not biases or norms).")
    batch_size: int = opt(4, "Prompts per PPO iteration (global, across all ranks).")
    mini_batch_size: int | None = opt(None, "Samples per optimizer step; None: the whole rollout (one step per epoch).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches each mini-batch is split into (memory, not maths).")
    forward_batch_size: int | None = opt(
        None,
        "Sequences per no-grad forward when scoring a rollout (policy, reference, critic, reward model); None: "
        "the update's micro-batch size. Memory, not maths.",
    )
    ppo_epochs: int = opt(4, "Passes of the update over each rollout.")
    lr_scheduler: str = opt(
        "constant",
        "Learning-rate schedule of policy and critic over the PPO steps: constant, linear or cosine (decaying "
        "towards 0).",
    )
    lr_schedule_steps: int | None = opt(
        None, "Steps the schedule spans; None: the steps train() runs (set it when you call step() yourself)."
    )
    warmup_steps: int = opt(
        0, "Steps of linear learning-rate warm-up at the start (from 1/(warmup_steps+1) of the rate)."
    )
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
    approx_kl_stop: float | None = opt(
        None,
        "Skip a rollout's remaining update epochs when an epoch's mean approx-KL (over its mini-batches, all "
        "ranks) exceeds this.",
    )
    advantage_estimator: str = opt(
        "gae",
        "gae (PPO with a critic), grpo (group-normalised outcome reward), rloo (leave-one-out baseline) or "
        "reinforce_pp (REINFORCE++: batch-normalised discounted returns); the last three train no critic. See "
        "docs/estimators.md.",
    )
    grpo_scale_rewards: bool = opt(
        True, "grpo: divide each group's centred rewards by the group's std (False: Dr. GRPO)."
    )
    critic_warmup_steps: int = opt(
        0,
        "gae: the first N iterations train only the critic on their rollouts (the policy and the KL coefficient "
        "stay put).",
    )

    # --- KL to the reference ---
    kl_coef: float = opt(0.1, "Initial KL penalty coefficient.")
    adap_kl_ctrl: bool = opt(True, "Adapt kl_coef towards target_kl (Ziegler et al., 2019).")
    target_kl: float = opt(0.01, "Target of the adaptive controller (summed KL per response).")
    kl_horizon: int = opt(10000, "Horizon of the adaptive controller.")
    kl_estimator: str = opt("k1", "Per-token KL estimator in the reward: k1, k2 or k3.")
    kl_in_loss: bool = opt(
        False,
        "Put the KL to the reference in the policy loss (coefficient: the KL controller's value) instead of the "
        "reward, as the GRPO family does.",
    )
    kl_loss_estimator: str = opt("k3", "KL estimator of kl_in_loss: k1, k2 or k3 (k1's gradient is 0 in expectation).")

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
    precision: str = opt(
        "auto",
        "auto: bf16 autocast where the hardware is fast at it (AVX512-BF16/AMX CPUs, bf16 GPUs), else fp32; or "
        "fp32, bf16.",
    )
    fp32_matmul: str = opt(
        "auto",
        "CPU kernel of fp32 linear layers: auto (times both on the model's layer shapes at start and takes "
        "oneDNN if >= 25% faster, as on AMD CPUs with AVX-512 where MKL runs only AVX2 kernels), mkl, onednn. "
        "Same fp32 arithmetic; results differ by float rounding only.",
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    rollout_logprobs: bool | str = opt(
        "auto",
        "Where pi_old's log-probs come from. true: the sampling pass (no second policy forward; same maths, "
        "float rounding apart); false: a scoring forward, the computation the update repeats, so the first PPO "
        "ratio is 1 to rounding; auto: the sampling pass in fp32, a scoring forward under bf16 (there the "
        "KV-cache decode rounds differently; docs/precision.md) or with tis_cap.",
    )
    tis_cap: float | None = opt(
        None,
        "Truncated importance sampling (Yao et al., 2025): weight each token's policy loss by min(pi_old / "
        "pi_rollout, tis_cap), pi_old from the scoring forward, pi_rollout from the sampling pass, correcting "
        "for their mismatch. Needs rollout_logprobs false or auto. None: off.",
    )
    prune_last_layer: bool = opt(
        True,
        "Run the models' last decoder layer only at the positions that are read (the states before response "
        "tokens; a reward model's last token): keys and values everywhere, queries and MLP there only. Same "
        "maths, float rounding apart; Qwen3/Qwen2/Llama without gradient checkpointing.",
    )
    fused_lm_head: bool | str = opt(
        "auto",
        "Log-probs and entropy from the last hidden states through the LM head's weight, a chunk of rows at a "
        "time, never holding the [B, R, V] logits or their gradient (backward recomputes each chunk: one more "
        "head product, ~8% of a 135M model's forward and backward). auto: where a pass's logits would exceed "
        "512 MiB in fp32 (long responses, large vocabularies); true, false. Same maths, float rounding apart; "
        "Qwen3/Qwen2/Llama with a plain linear head, one process.",
    )
    fused_mlp: bool = opt(
        True,
        "The trained models' MLPs keep their gate and up projections for backward and recompute silu(gate) * up "
        "there, instead of keeping four [tokens, intermediate] tensors per layer: the same bits, ~25% less "
        "activation memory on SmolLM2. Qwen3/Qwen2/Llama; not with a LoRA adapter on down_proj, not under torchrun.",
    )
    fused_norm: bool = opt(
        True,
        "The trained models' RMS norms keep their input and 1/rms for backward and recompute the normalised "
        "activations there, instead of also keeping them: the same values to float rounding, 13% less activation "
        "memory on SmolLM2. Qwen3/Qwen2/Llama; not under torchrun.",
    )
    fp32_attention: bool | str = opt(
        "auto",
        "Under bf16 autocast on a CPU, attention (not the matmuls around it) runs torch's fp32 kernel on the bf16 "
        "query, keys and values, and the sampling KV cache is held in fp32: on CPUs without AMX torch's bf16 "
        "attention kernels are the slower ones (a decode step ~5x). auto: both kernels timed once at the policy's "
        "head shapes (~0.1 s), the bf16 one kept where it is >= 25% faster, separately for sampling and for the "
        "forwards; true: fp32 always; false: the bf16 kernels. At least as exact as the bf16 kernel; off on GPUs "
        "and in fp32, where it changes nothing. Models on transformers' sdpa attention.",
    )
    lean_decode: bool = opt(
        True,
        "Sample Qwen3/Qwen2/Llama policies with a decode step of our own instead of the model's forward (same "
        "maths, float rounding apart; faster sampling on CPU, see docs/performance.md). Other models, and "
        "adapters, always use their forward.",
    )
    compile_layers: bool | str = opt(
        "auto",
        "torch.compile each decoder layer of every model for scoring and the update (one graph per layer "
        "class, dynamic shapes): fuses the norms, rotary, activations and casts around the matmuls. Same "
        "maths, float rounding apart; compiling takes 20-60 s on a 2-core CPU, in the first step. auto: on "
        "under bf16 on a CPU with AMX for decoder layers of >= 10M parameters trained whole, where it made "
        "iterations up to 1.5x shorter; off in fp32, without AMX, for tiny models, with LoRA and on GPUs, where "
        "it was not measured to pay (docs/performance.md). Sampling is not compiled; not with "
        "gradient_checkpointing.",
    )
    bf16_frozen_weights: bool = opt(
        True,
        "Under bf16 precision, hold the linear weights of the frozen models (reference, reward model) in bf16: "
        "autocast would cast them again at every forward. Bit-identical results, half their memory; "
        "embeddings, norms and score heads keep fp32. The models passed in are changed in place. While "
        "sampling, a LoRA policy's frozen base runs on bf16 copies too (autocast would cast it at every "
        "decode step); its fp32 weights are left as they are. Not under strategy=fsdp.",
    )
    host_release_memory: bool = opt(
        False,
        "CPU runs: hand freed memory back to the OS: blocks of 1 MiB or more get their own mappings (glibc "
        "mallopt, process-wide) and malloc_trim runs before and after sampling, after scoring and after each "
        "model's pass of the update. W4: peak RSS -14%, 13-40% more time (docs/performance.md). glibc only.",
    )

    # --- LoRA (peft) ---
    lora_r: int = opt(0, "LoRA rank of the policy's adapter (0: full fine-tuning).")
    lora_alpha: int = opt(16, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = opt(0.0, "Dropout inside the adapter (kept 0 in rollout/update by design).")
    lora_target_modules: list = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "Module names that get adapters ('all-linear' works too)."
    )
    lora_critic: bool = opt(False, "Give the separate critic its own LoRA adapter instead of full weights.")
    save_merged: bool = opt(
        False,
        "With LoRA, also write merged/ inside each saved model directory (output_dir/final/merged): the adapter "
        "merged into the base.",
    )
    optimizer: str = opt("adamw", "adamw, or adamw_8bit (bitsandbytes, CUDA only).")

    # --- output ---
    output_dir: str = opt("ppo_output", "Where metrics, checkpoints and the final model go.")
    save_steps: int = opt(0, "Checkpoint every N steps (0: only the final model).")
    save_total_limit: int | None = opt(None, "Keep at most this many step_N checkpoints.")
    save_on_interrupt: bool = opt(
        True, "On SIGINT/SIGTERM, finish the step in progress and save a checkpoint before stopping."
    )
    logging_steps: int = opt(1, "Write a metrics line every N steps.")
    progress_bar: bool = opt(True, "Show a progress bar during train().")
    resume_from_checkpoint: str | None = opt(None, "A step_N directory or 'latest' in output_dir.")
    overwrite: bool = opt(
        False,
        "Start again in an output_dir that holds another run or a finished one (otherwise refused): its outputs "
        "(config.yaml, metrics.jsonl, run.json, step_N/, latest, final/) are removed once the new run has loaded; "
        "other files there stay.",
    )
    report_to: list = opt([], "Extra metric backends: tensorboard, wandb (metrics.jsonl is always written).")
    skip_bad_rows: bool = opt(False, "Log and skip malformed dataset rows instead of stopping.")
    torch_dtype: str = opt("float32", "dtype the models are loaded in: float32, bfloat16, float16 or auto.")

    # --- scaling out (under torchrun; ignored in one process) ---
    strategy: str = opt(
        "ddp",
        "Data parallelism under torchrun: ddp (replicated models) or fsdp (FSDP2: sharded policy, critic, reference).",
    )
    dist_timeout_s: float = opt(
        1800.0, "Seconds a collective waits for the other ranks before the run fails (a crashed or hung rank)."
    )

    def __post_init__(self) -> None:
        validate(self, PPO_RULES)  # every field's type, then each key's rule (the table below)
        check_ppo_relations(self)
        self._check_estimator()

    @property
    def uses_critic(self) -> bool:
        """Only GAE learns a value function; the other estimators' baselines come from the rewards."""
        return self.advantage_estimator == "gae"

    def _check_estimator(self) -> None:
        check_choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_choice("kl_loss_estimator", self.kl_loss_estimator, ("k1", "k2", "k3"))
        check_range(self, "critic_warmup_steps", self.critic_warmup_steps, 0)
        name = self.advantage_estimator
        if name in GROUP_ESTIMATORS and self.num_generations < 2:
            raise ConfigError(
                f"advantage_estimator={name} compares the samples of each prompt: it needs num_generations >= 2, "
                f"got num_generations={self.num_generations}"
            )
        if name in GROUP_ESTIMATORS and self.whiten_rewards:
            raise ConfigError(
                f"whiten_rewards would mix the groups of advantage_estimator={name}; it applies to gae and "
                "reinforce_pp only"
            )
        if not self.uses_critic and self.critic_warmup_steps:
            raise ConfigError(
                f"critic_warmup_steps={self.critic_warmup_steps}: advantage_estimator={name} trains no critic"
            )
        if not self.uses_critic and self.value_model_path:
            raise ConfigError(
                f"value_model_path={self.value_model_path!r}: advantage_estimator={name} trains no critic"
            )


ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "rloo")  # a baseline from the other samples of the same prompt


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
