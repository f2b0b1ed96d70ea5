"""PPOTrainer: wires the roles together; `step()` is the PPO recipe, `train()` the loop around it.

    step(prompts):
      1. collate the prompts                                  (data)
      2. sample responses                                     (rollout engine)
      3. score: policy/reference log-probs, values, rewards   (forward, rewards) - no grad
      4. per-token rewards, GAE, whitening                    (functional)
      5. the PPO update                                       (update)
      6. adapt the KL coefficient, return the statistics

Under torchrun each rank passes its share of the global batch (`row_offset`: where its rows start):
it samples and scores its own rows, then the scored rows are gathered so that every rank holds the
global batch - the rewards, GAE, whitening and KL statistics are those of the whole batch, the same
on every rank and the same as in one process - and `ppo_update` takes each rank's share of every
mini-batch. The policy and critic train through DDP / FSDP2 wrappers (`ppo.distributed`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ppo import distributed as dist
from ppo import functional as F
from ppo.batch import PromptBatch, Rollout, ScoredBatch
from ppo.config import PPOConfig, plan_batches
from ppo.data import collate_prompts, ensure_pad_token
from ppo.forward import by_rows, policy_logprobs
from ppo.last_layer import pruning
from ppo.lr_schedule import lr_factor, set_learning_rates
from ppo.host_memory import memory_releaser
from ppo.onednn_linear import resolve_fp32_matmul
from ppo.rewards import RewardSources
from ppo.roles import (
    apply_lora,
    autocast_context,
    build_critic,
    default_reference,
    freeze,
    is_peft_model,
    reference_context,
    resolve_precision,
)
from ppo.rollout import HFRolloutEngine, RolloutEngine, SamplingParams
from ppo.update import ppo_update
from ppo.metrics import PhaseTimer
from ppo.models import end_of_turn_ids


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
        self.rewards = RewardSources(reward_model, reward_funcs, reward_weights or config.reward_weights, reward_tokenizer)
        torch.manual_seed(config.seed)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(config.precision, self.device)
        self.fp32_kernel = resolve_fp32_matmul(config.fp32_matmul, self.device, getattr(getattr(model, "config", None), "hidden_size", 512))
        self.release_memory = memory_releaser(config.host_release_memory, self.device)
        use_lora = peft_config is not None or config.lora_r > 0 or is_peft_model(model)
        lora_source = peft_config if peft_config is not None else config
        # The critic copies the policy's plain weights, so it is built before adapters go in.
        critic_lora = lora_source if use_lora and config.lora_critic else None
        self.critic = build_critic(config.value_head, model, reward_model, value_model, reward_tokenizer, critic_lora)
        if use_lora:
            model = apply_lora(model, lora_source)
        self.policy = model
        # With LoRA and no explicit reference, the reference is the policy with adapters disabled.
        self.ref_model = default_reference(model, ref_model)
        for module in (self.policy, self.critic.module):
            disable_dropout(module)
            if config.gradient_checkpointing:
                enable = getattr(module, "activation_checkpointing_enable", None) or getattr(module, "gradient_checkpointing_enable", None)
                if enable is None:
                    raise ValueError(f"gradient_checkpointing: {type(module).__name__} does not support it")
                enable()
                module.train()  # HF checkpoints only in train mode; dropout is already off
        self._distribute(config.strategy)  # before the optimizers: FSDP2 replaces the parameters
        self.optimizers = {
            "policy": self._adamw(self.policy, config.learning_rate),
            "critic": self._adamw(self.critic.module, config.value_learning_rate or config.learning_rate),
        }
        if config.adap_kl_ctrl:
            self.kl_controller = F.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        else:
            self.kl_controller = F.FixedKLController(config.kl_coef)
        self.engine = rollout_engine or HFRolloutEngine(model, tokenizer, self.autocast, lean_decode=config.lean_decode)
        # Every end-of-turn token ends a response (chat models list several in generation_config).
        stop_ids = end_of_turn_ids(tokenizer, model)
        self.sampling = SamplingParams(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
            top_p=config.top_p, stop_token_ids=stop_ids, stop_strings=tuple(config.stop_strings),
        )
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)  # mini-batch order
        self.timer = PhaseTimer()
        self.global_step = 0
        self.planned_steps: int | None = None  # set by train(): the length of an lr schedule
        self.max_prompt_tokens: int | None = self._prompt_budget(config.max_length)

    def _distribute(self, strategy: str) -> None:
        """The update trains through DDP / FSDP2 wrappers (the modules themselves in one process);
        sampling and saving use self.policy (under FSDP2 the same module, sharded in place)."""
        if is_peft_model(self.policy) and strategy == "fsdp" and dist.world_size() > 1:
            raise ValueError("strategy=fsdp does not support LoRA yet; use strategy=ddp (adapters are small)")
        self.update_policy = dist.wrap(self.policy, strategy)
        self.update_critic = CriticCall(self.critic, strategy)
        if self.ref_model is not None:
            self.ref_model = dist.wrap_frozen(self.ref_model, strategy)

    def _adamw(self, module: torch.nn.Module, lr: float) -> torch.optim.AdamW:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(module).__name__} has no trainable parameters")
        if self.config.optimizer == "adamw_8bit":
            if not torch.cuda.is_available():
                raise ValueError("optimizer=adamw_8bit needs a CUDA GPU (bitsandbytes); use optimizer=adamw on CPU")
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ImportError("optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes") from None
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=self.config.weight_decay)
        # fused: one kernel over all parameters (CPU and CUDA, fp32/bf16 params); the per-tensor
        # foreach path was ~4x slower per step on CPU and issued ~10k small ops per PPO iteration.
        fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.config.weight_decay, fused=fused or None)

    def autocast(self):
        """A fresh mixed-precision context for one forward pass (a no-op in fp32)."""
        return autocast_context(self.precision, self.device, self.fp32_kernel)

    def _prompt_budget(self, max_length: int | None) -> int | None:
        """Longest prompt in tokens: what max_length and the model's context leave for the prompt."""
        limits = [max_length, getattr(self.policy.config, "max_position_embeddings", None)]
        limits = [n - self.config.max_new_tokens for n in limits if n is not None]
        if any(n < 1 for n in limits):
            raise ValueError(f"max_length / the model's context must exceed max_new_tokens={self.config.max_new_tokens}")
        return min(limits) if limits else None

    # ------------------------------------------------------------------------------------------
    def sample_seeds(self, n: int, row_offset: int = 0) -> list[int]:
        """One sampling seed per prompt, a pure function of (seed, step, row in the global batch)."""
        base = (self.config.seed * 1_000_003 + self.global_step) * 1_000_003
        return [base + row_offset + i for i in range(n)]

    def step(self, prompts: Sequence[Any], extras: dict[str, list[Any]] | None = None, row_offset: int = 0) -> dict[str, Any]:
        """One PPO iteration on `prompts` (one batch, whatever their number). `extras` are dataset
        columns for the reward functions; `row_offset` is the index of prompts[0] in the global
        batch (for sampling seeds when ranks share a batch). Returns the statistics."""
        cfg = self.config
        shares = dist.all_gather_objects(len(prompts))  # prompts on each rank
        if len(shares) == 1 and not prompts:
            raise ValueError("no prompts given: the prompt list is empty")
        if min(shares) == 0 or len(set(shares)) > 1:
            raise ValueError(f"every rank must pass the same, non-zero number of prompts to step(); got {shares} "
                             "(make batch_size a multiple of the number of ranks)")
        plan = plan_batches(cfg, n_prompts=sum(shares), world_size=len(shares))
        # Before sampling, so that a schedule without a length fails before any work is done.
        factor = lr_factor(self.global_step, cfg.lr_schedule_steps or self.planned_steps, cfg.lr_scheduler, cfg.warmup_steps)
        learning_rate = set_learning_rates(self.optimizers.values(), factor)
        with self.timer.phase("generate"):
            self.release_memory()  # what building the models, or the last iteration, left behind
            prompt_batch = collate_prompts(self.tokenizer, prompts, extras, self.max_prompt_tokens, self.device)
            prompt_batch.seeds = self.sample_seeds(len(prompts), row_offset)
            prompt_batch = prompt_batch.repeat(cfg.num_generations)
            with dist.full_weights(self.policy):  # FSDP2: sampling loops must not all-gather
                rollout = self.engine.generate(prompt_batch, self.sampling)
            self.release_memory()
        with self.timer.phase("score"), pruning(cfg.prune_last_layer):
            completions = self.tokenizer.batch_decode(rollout.completion_ids(), skip_special_tokens=True)
            batch, score_stats = self.score(rollout, prompt_batch, completions)
            completions = [text for share in dist.all_gather_objects(completions) for text in share]
            self.release_memory()
        with self.timer.phase("update"), pruning(cfg.prune_last_layer):
            update_stats = ppo_update(batch, self.update_policy, self.update_critic, self.optimizers, plan, cfg,
                                      self.shuffle_generator, self.autocast, self.release_memory)
            self.engine.update_weights(())  # the HF engine shares the policy: nothing to copy
        kl_coef_used = self.kl_controller.value
        self.kl_controller.update(score_stats["kl"], len(batch))
        self.global_step += 1
        n_tokens = int(rollout.attention_mask.sum())
        timing = self.timer.finish_step({"generate": int(rollout.response_mask.sum()), "score": n_tokens, "update": n_tokens * cfg.ppo_epochs})
        return {
            "generated_texts": completions,
            "rewards": batch.scores.tolist(),
            "mean_reward": batch.scores.mean().item(),
            "kl_coef": float(kl_coef_used),
            "learning_rate": learning_rate,
            **score_stats,
            **update_stats,
            **timing,
        }

    def reuses_rollout_logprobs(self, rollout: Rollout) -> bool:
        """pi_old from the sampling pass instead of a second policy forward: when configured, when the
        engine gave them, and when no shared value head needs the policy's hidden states anyway."""
        return (self.config.rollout_logprobs and rollout.logprobs is not None and rollout.entropy is not None
                and not self.critic.uses_policy_hidden)

    def rows_per_scoring_forward(self, rows_on_rank: int) -> int:
        """`forward_batch_size`, or by default the update's micro-batch: a no-grad forward of as
        many rows as a forward that also keeps activations for backward cannot need more memory."""
        cfg = self.config
        if cfg.forward_batch_size is not None:
            return cfg.forward_batch_size
        world = dist.world_size()
        return plan_batches(cfg, n_prompts=max(1, rows_on_rank * world // cfg.num_generations), world_size=world).micro_batch

    def score(self, rollout: Rollout, prompts: PromptBatch, completions: list[str]) -> tuple[ScoredBatch, dict[str, float]]:
        """Steps 3-4: one no-grad pass of every model over this rank's rollout, then - over the
        global batch gathered from all ranks - rewards, GAE and whitening."""
        cfg = self.config
        ids, mask, width = rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1]
        rows = self.rows_per_scoring_forward(len(ids))
        with torch.inference_mode(), self.autocast():
            if self.reuses_rollout_logprobs(rollout):
                logprobs, entropy, hidden = rollout.logprobs, rollout.entropy, None
            else:
                logprobs, entropy, hidden = by_rows(lambda i, m: policy_logprobs(
                    self.policy, i, m, width, cfg.temperature,
                    with_entropy=True, output_hidden=self.critic.uses_policy_hidden,
                ), rows, ids, mask)
            ref_model, ref_context = reference_context(self.policy, self.ref_model)
            with ref_context:
                ref_logprobs, _, _ = by_rows(lambda i, m: policy_logprobs(ref_model, i, m, width, cfg.temperature), rows, ids, mask)
            values = by_rows(lambda i, m, h: self.update_critic.values(i, m, width, h), rows, ids, mask, hidden)
            scores, source_means = self.rewards.score(ids, mask, prompts.texts, completions, rollout.completion_ids(), prompts.extras, rows)
        # Inference tensors cannot be saved for backward: clone what enters the losses.
        logprobs, ref_logprobs, values, scores, entropy = (t.clone().float() for t in (logprobs, ref_logprobs, values, scores, entropy))
        # The global batch on every rank (rank order is row order; padding widened to the widest rank).
        rollout, source_means = gather_rollout(rollout, self.tokenizer.pad_token_id), dist.all_reduce_mean(source_means)
        logprobs, ref_logprobs, values, entropy, scores = (dist.all_gather_rows(t) for t in (logprobs, ref_logprobs, values, entropy, scores))
        ids, mask = rollout.input_ids, rollout.attention_mask
        response_mask = rollout.response_mask.float()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~rollout.ended).float()
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        kl = F.kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * response_mask
        rewards = F.token_level_rewards(scores, kl, response_mask, self.kl_controller.value)
        if cfg.whiten_rewards:
            rewards = F.masked_whiten(rewards, response_mask, shift_mean=False) * response_mask
        advantages, returns = F.compute_gae(rewards, values, response_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = F.masked_whiten(advantages, response_mask) * response_mask
        batch = ScoredBatch(ids, mask, response_mask, logprobs, ref_logprobs, values, scores, rewards, advantages, returns)
        lengths = response_mask.sum(dim=1)
        stats = {
            "kl": kl.sum(dim=1).mean().item(),
            "entropy": F.masked_mean(entropy, response_mask).item(),
            "response_length": lengths.mean().item(),
            "eos_fraction": rollout.ended.float().mean().item(),
            "advantages/mean": F.masked_mean(advantages, response_mask).item(),
            "advantages/std": F.masked_var(advantages, response_mask).sqrt().item() if response_mask.sum() > 1 else 0.0,
            "returns/mean": F.masked_mean(returns, response_mask).item(),
            "values/mean": F.masked_mean(values, response_mask).item(),
            "explained_variance": float(F.explained_variance(values, returns, response_mask)),
            "non_score_reward": (rewards.sum(dim=1) - scores).mean().item(),
            **source_means,
        }
        return batch, stats

    # ------------------------------------------------------------------------------------------
    def train(self, prompts, num_epochs: int = 1, max_length: int | None = None) -> list[dict[str, Any]]:
        """The PPO loop over a prompt list or a `datasets.Dataset`; see ppo.loop.train_loop."""
        from ppo.loop import train_loop  # the loop lives in its own file (checkpointing, logging)

        return train_loop(self, prompts, num_epochs=num_epochs, max_length=max_length)

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


def gather_rollout(rollout: Rollout, pad_id: int) -> Rollout:
    """Every rank's rollout rows, in rank order: prompts left-padded and responses right-padded to
    the widest rank, exactly the layout one process gives the same global batch."""
    return Rollout(
        prompt_ids=dist.all_gather_rows(rollout.prompt_ids, pad_id, left=True),
        prompt_mask=dist.all_gather_rows(rollout.prompt_mask, 0, left=True),
        response_ids=dist.all_gather_rows(rollout.response_ids, pad_id),
        response_mask=dist.all_gather_rows(rollout.response_mask, 0),
        ended=dist.all_gather_rows(rollout.ended),
    )
