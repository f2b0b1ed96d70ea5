"""PPOTrainer: wires the roles together; `step()` is the PPO recipe, `train()` the loop around it.

    step(prompts):
      1. sample: collate the prompts, sample responses             (data, rollout engine)
      2. score: policy/reference log-probs, values, rewards         (scoring) - no grad
      3. rewards and advantages: KL penalty, GAE, whitening         (advantages -> functional)
      4. the PPO update                                             (update)
      5. bookkeeping: adapt the KL coefficient, return the statistics

Under torchrun each rank passes its share of the global batch (`row_offset`: where its rows start):
it samples and scores its own rows, then the scored rows are gathered so that every rank holds the
global batch - the rewards, GAE, whitening and KL statistics are those of the whole batch, the same
on every rank and the same as in one process - and `ppo_update` takes each rank's share of every
mini-batch. The policy and critic train through DDP / FSDP2 wrappers (`ppo.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ppo import advantages
from ppo import distributed as dist
from ppo import functional as F
from ppo.batch import PromptBatch, Rollout, ScoredBatch
from ppo.config import BatchPlan, PPOConfig, plan_batches
from ppo.data import collate_prompts, ensure_pad_token
from ppo.fastpath.compat import enable_activation_checkpointing
from ppo.fastpath.compiled_layers import compile_decoder_layers, worth_compiling
from ppo.fastpath.fused_head import fusing
from ppo.fastpath.host_memory import memory_releaser
from ppo.fastpath.last_layer import pruning
from ppo.fastpath.onednn_linear import resolve_fp32_matmul
from ppo.lr_schedule import lr_factor, set_learning_rates
from ppo.metrics import PhaseTimer
from ppo.models import end_of_turn_ids
from ppo.optim import build_adamw
from ppo.precision import autocast_context, resolve_precision
from ppo.rewards import RewardSources
from ppo.roles import (
    apply_lora,
    attend_in_fp32,
    build_critic,
    default_reference,
    freeze,
    frozen_bf16_allowed,
    hold_frozen_in_bf16,
    is_peft_model,
    keep_fewer_activations,
)
from ppo.rollout import HFRolloutEngine, RolloutEngine, SamplingParams
from ppo.scoring import Scorer
from ppo.update import ppo_update


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout makes the rollout's log-probs disagree with the update's: turn it off everywhere,
    including the attention dropout that models apply functionally in train mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class CriticCall:
    """The critic as the update sees it: `values` goes through one module call (`ForwardAs`), so a
    DDP / FSDP2 wrapper around it synchronises the critic's gradients whichever critic it is."""

    def __init__(self, critic, strategy: str):
        self.uses_policy_hidden = critic.uses_policy_hidden
        self.module = dist.wrap(dist.ForwardAs(critic.module, critic.values), strategy)

    def values(self, input_ids, attention_mask, response_width, policy_hidden):
        return self.module(input_ids, attention_mask, response_width, policy_hidden)


class PPOTrainer:
    """PPO for a Hugging Face causal LM against a reward model and/or reward functions."""

    def __init__(
        self,
        config: PPOConfig | None = None,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        ref_model: torch.nn.Module | None = None,
        reward_model: torch.nn.Module | None = None,
        reward_funcs: Callable | Sequence[Callable] | None = None,
        reward_weights: Sequence[float] | None = None,
        value_model: torch.nn.Module | None = None,
        reward_tokenizer=None,
        rollout_engine: RolloutEngine | None = None,
        peft_config=None,
    ):
        self.config = config = config if config is not None else PPOConfig()
        if model is None or tokenizer is None:
            raise ValueError("PPOTrainer needs model= (a causal LM) and tokenizer=")
        dist.init_from_env(config.dist_timeout_s)  # a no-op unless launched by torchrun
        ensure_pad_token(tokenizer)
        if reward_model is not None:
            freeze(reward_model)
        self.rewards = RewardSources(
            reward_model,
            reward_funcs,
            reward_weights or config.reward_weights,
            reward_tokenizer,
            config.reward_timeout_s,
            config.reward_max_abs,
        )
        torch.manual_seed(config.seed)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(config.precision, self.device)
        # Under gradient checkpointing the recomputation in backward runs outside the kernel's context:
        # it must be torch's own kernel, or the recomputed activations differ from the saved ones.
        # Compiled layers trace torch's own linear; the oneDNN kernel is a private op the compiler
        # would have to trace through.
        self.fp32_kernel = resolve_fp32_matmul(
            "mkl" if config.gradient_checkpointing or config.compile_layers is True else config.fp32_matmul,
            self.device,
            getattr(getattr(model, "config", None), "hidden_size", 512),
        )
        self.release_memory = memory_releaser(config.host_release_memory, self.device)
        use_lora = peft_config is not None or config.lora_r > 0 or is_peft_model(model)
        lora_source = peft_config if peft_config is not None else config
        # The critic copies the policy's plain weights, so it is built before adapters go in.
        critic_lora = lora_source if use_lora and config.lora_critic else None
        if value_model is not None and not config.uses_critic:
            raise ValueError(
                f"value_model= was passed but advantage_estimator={config.advantage_estimator} trains no critic"
            )
        # A critic-free estimator holds no critic at all: not built, trained, checkpointed or in memory.
        self.critic = (
            build_critic(config.value_head, model, reward_model, value_model, reward_tokenizer, critic_lora)
            if config.uses_critic
            else None
        )
        if use_lora:
            model = apply_lora(model, lora_source)
        self.policy = model
        # With LoRA and no explicit reference, the reference is the policy with adapters disabled.
        self.ref_model = default_reference(model, ref_model)
        for module in [self.policy] + ([self.critic.module] if self.critic else []):
            disable_dropout(module)
            if config.gradient_checkpointing:
                enable_activation_checkpointing(module)
                module.train()  # HF checkpoints only in train mode; dropout is already off
        for module in (self.policy, self.critic.module if self.critic else None):  # kept for backward
            keep_fewer_activations(module, config)
        if config.bf16_frozen_weights:  # after the critic copied the reward model's fp32 weights
            hold_frozen_in_bf16((self.ref_model, reward_model), self.precision, config.strategy, dist.world_size())
        every_model = (self.policy, self.ref_model, self.critic.module if self.critic else None, reward_model)
        if config.fp32_attention:  # a shared backbone (critic, reward model) switches with its owner
            attend_in_fp32(every_model, self.precision, self.device, config.fp32_attention)
        # auto compiles only under bf16, where the fp32 kernel is not used, and never recomputes layers.
        compile_mode = False if config.gradient_checkpointing else config.compile_layers
        self.compiles_layers = worth_compiling(compile_mode, self.policy, self.precision, self.device, use_lora)
        if self.compiles_layers:
            for module in every_model:
                if module is not None:
                    compile_decoder_layers(module)  # idempotent: a shared backbone is compiled once
        self._distribute(config.strategy)  # before the optimizers: FSDP2 replaces the parameters
        self.optimizers = {
            "policy": build_adamw(self.policy, config.learning_rate, config.weight_decay, config.optimizer),
        }
        if self.critic is not None:  # critic-free estimators train the policy only
            self.optimizers["critic"] = build_adamw(
                self.critic.module,
                config.value_learning_rate or config.learning_rate,
                config.weight_decay,
                config.optimizer,
            )
        if config.adap_kl_ctrl:
            self.kl_controller = F.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        else:
            self.kl_controller = F.FixedKLController(config.kl_coef)
        self.engine = rollout_engine or HFRolloutEngine(
            model,
            tokenizer,
            self.autocast,
            lean_decode=config.lean_decode,
            bf16_frozen_weights=config.bf16_frozen_weights
            and frozen_bf16_allowed(self.precision, config.strategy, dist.world_size()),
        )
        # Every end-of-turn token ends a response (chat models list several in generation_config).
        stop_ids = end_of_turn_ids(tokenizer, model)
        self.sampling = SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            stop_token_ids=stop_ids,
            stop_strings=tuple(config.stop_strings),
        )
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)  # mini-batch order
        self.timer = PhaseTimer()
        self.global_step = 0
        self.planned_steps: int | None = None  # set by train(): the length of an lr schedule
        self.max_prompt_tokens: int | None = self.prompt_budget(config.max_length)
        self.scorer = Scorer(
            self.policy,
            self.ref_model,
            self.update_critic,
            self.rewards,
            config,
            self.autocast,
            tokenizer.pad_token_id,
            self.precision,
        )

    def _distribute(self, strategy: str) -> None:
        """The update trains through DDP / FSDP2 wrappers (the modules themselves in one process);
        sampling and saving use self.policy (under FSDP2 the same module, sharded in place)."""
        if is_peft_model(self.policy) and strategy == "fsdp" and dist.world_size() > 1:
            raise ValueError("strategy=fsdp does not support LoRA yet; use strategy=ddp (adapters are small)")
        self.update_policy = dist.wrap(self.policy, strategy)
        self.update_critic = CriticCall(self.critic, strategy) if self.critic is not None else None
        if self.ref_model is not None:
            self.ref_model = dist.wrap_frozen(self.ref_model, strategy)

    def autocast(self):
        """A fresh mixed-precision context for one forward pass (a no-op in fp32)."""
        return autocast_context(self.precision, self.device, self.fp32_kernel)

    def prompt_budget(self, max_length: int | None) -> int | None:
        """Longest prompt in tokens: what max_length and the model's context leave for the prompt."""
        limits = [max_length, getattr(self.policy.config, "max_position_embeddings", None)]
        limits = [n - self.config.max_new_tokens for n in limits if n is not None]
        if any(n < 1 for n in limits):
            raise ValueError(
                f"max_length / the model's context must exceed max_new_tokens={self.config.max_new_tokens}"
            )
        return min(limits) if limits else None

    # ------------------------------------------------------------------------------------------
    def sample_seeds(self, n: int, row_offset: int = 0) -> list[int]:
        """One sampling seed per prompt, a pure function of (seed, step, row in the global batch)."""
        base = (self.config.seed * 1_000_003 + self.global_step) * 1_000_003
        return [base + row_offset + i for i in range(n)]

    def step(
        self, prompts: Sequence[Any], extras: dict[str, list[Any]] | None = None, row_offset: int = 0
    ) -> dict[str, Any]:
        """One PPO iteration on `prompts` (one batch, whatever their number). `extras` are dataset
        columns for the reward functions; `row_offset` is the index of prompts[0] in the global
        batch (for sampling seeds when ranks share a batch). Returns the statistics."""
        cfg = self.config
        plan = self.plan_step(len(prompts))
        # Before sampling, so that a schedule without a length fails before any work is done.
        factor = lr_factor(
            self.global_step, cfg.lr_schedule_steps or self.planned_steps, cfg.lr_scheduler, cfg.warmup_steps
        )
        learning_rate = set_learning_rates(self.optimizers.values(), factor)
        # 1. sample: collate the prompts, then num_generations responses per prompt
        with self.timer.phase("generate"):
            prompt_batch, rollout = self.sample(prompts, extras, row_offset)
        with self.timer.phase("score"), pruning(cfg.prune_last_layer), fusing(cfg.fused_lm_head):
            # 2. score: log-probs, values and rewards, no grad; then the global batch on every rank
            completions = self.tokenizer.batch_decode(rollout.completion_ids(), skip_special_tokens=True)
            scored = self.scorer(rollout, prompt_batch, completions)
            # 3. rewards and advantages
            batch, score_stats = advantages.estimate(scored, cfg, self.kl_controller.value)
            self.release_memory()
        # 4. the update: epochs x mini-batches of clipped policy and value losses (during the
        #    critic warm-up the critic's only: the policy, and so the KL, do not move)
        warming_up = self.global_step < cfg.critic_warmup_steps
        with self.timer.phase("update"), pruning(cfg.prune_last_layer), fusing(cfg.fused_lm_head):
            update_stats = ppo_update(
                batch,
                self.update_policy,
                self.update_critic,
                self.optimizers,
                plan,
                cfg,
                self.shuffle_generator,
                self.autocast,
                self.release_memory,
                kl_coef=self.kl_controller.value,
                train_policy=not warming_up,
            )
            self.engine.update_weights(())  # the HF engine shares the policy: nothing to copy
        # 5. bookkeeping: the KL coefficient adapts to this step's KL; the statistics
        kl_coef_used = self.kl_controller.value
        if not warming_up:
            self.kl_controller.update(score_stats["kl"], len(batch))
        self.global_step += 1
        n_tokens = int(rollout.attention_mask.sum())
        timing = self.timer.finish_step(
            {"generate": int(rollout.response_mask.sum()), "score": n_tokens, "update": n_tokens * cfg.ppo_epochs}
        )
        return {
            "generated_texts": scored.completions,
            "rewards": batch.scores.tolist(),
            "mean_reward": batch.scores.mean().item(),
            "kl_coef": float(kl_coef_used),
            "learning_rate": learning_rate,
            **score_stats,
            **update_stats,
            **timing,
        }

    def wants_rollout_logprobs(self) -> bool:
        """Whether pi_old comes from the sampling pass (`rollout_logprobs`, auto resolved)."""
        return self.scorer.wants_rollout_logprobs()

    def plan_step(self, n_prompts: int) -> BatchPlan:
        """The batch sizes of a step on `n_prompts` prompts per rank (every rank must pass as many)."""
        shares = dist.all_gather_objects(n_prompts)  # prompts on each rank
        if len(shares) == 1 and not n_prompts:
            raise ValueError("no prompts given: the prompt list is empty")
        if min(shares) == 0 or len(set(shares)) > 1:
            raise ValueError(
                f"every rank must pass the same, non-zero number of prompts to step(); got {shares} "
                "(make batch_size a multiple of the number of ranks)"
            )
        return plan_batches(self.config, n_prompts=sum(shares), world_size=len(shares))

    def sample(
        self, prompts: Sequence[Any], extras: dict[str, list[Any]] | None, row_offset: int
    ) -> tuple[PromptBatch, Rollout]:
        """Step 1: the prompts collated (each repeated num_generations times) and their responses."""
        self.release_memory()  # what building the models, or the last iteration, left behind
        prompt_batch = collate_prompts(self.tokenizer, prompts, extras, self.max_prompt_tokens, self.device)
        prompt_batch.seeds = self.sample_seeds(len(prompts), row_offset)
        prompt_batch = prompt_batch.repeat(self.config.num_generations)
        with dist.full_weights(self.policy):  # FSDP2: sampling loops must not all-gather
            rollout = self.engine.generate(prompt_batch, self.sampling)
        self.release_memory()
        return prompt_batch, rollout

    def score(
        self, rollout: Rollout, prompts: PromptBatch, completions: list[str]
    ) -> tuple[ScoredBatch, dict[str, float]]:
        """Steps 2-3 on a rollout of this rank: scored, gathered, rewards and advantages."""
        return advantages.estimate(self.scorer(rollout, prompts, completions), self.config, self.kl_controller.value)

    # ------------------------------------------------------------------------------------------
    def train(
        self,
        prompts,
        num_epochs: int | None = None,
        max_length: int | None = None,
        on_step=None,
        max_steps: int | None = None,
    ) -> list[dict[str, Any]]:
        """The PPO loop over a prompt list or a `datasets.Dataset`; see ppo.loop.train_loop (also for
        the per-step callback `on_step`). `num_epochs=None` / `max_steps=None`: the config's (an
        explicit argument wins); `max_length=None`: the config's, already applied in __init__."""
        from ppo.loop import train_loop  # the loop lives in its own file (checkpointing, logging)

        epochs = self.config.num_epochs if num_epochs is None else num_epochs
        steps = self.config.max_steps if max_steps is None else max_steps
        return train_loop(self, prompts, num_epochs=epochs, max_length=max_length, on_step=on_step, max_steps=steps)

    def save_pretrained(self, output_dir: str) -> None:
        """The policy and tokenizer as a plain Hugging Face directory. With LoRA: the adapter (peft
        format), and with `save_merged` also `output_dir/merged`, the adapter merged into the base."""
        import copy
        from pathlib import Path

        from ppo.checkpoint import save_model_dir, save_model_dir_main

        # Every rank calls (FSDP2 gathers the full weights); rank 0 writes.
        save_model_dir_main(Path(output_dir), self.policy, self.tokenizer)
        if is_peft_model(self.policy) and self.config.save_merged:
            if dist.is_main():
                merged = copy.deepcopy(self.policy).merge_and_unload()
                save_model_dir(Path(output_dir) / "merged", merged, self.tokenizer)
            dist.barrier()
