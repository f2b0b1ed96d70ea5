"""The training loop around `PPOTrainer.step`: epochs over shuffled prompts, metrics, progress,
periodic checkpoints, exact resume, the final model and the timing table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ppo import checkpoint as ckpt
from ppo.metrics import MetricsLogger


def prompt_rows(prompts, prompt_column: str = "prompt") -> list[dict[str, Any]]:
    """A list of {prompt, extra columns...} from a list of prompts or a datasets.Dataset."""
    if hasattr(prompts, "column_names"):  # datasets.Dataset: every other column rides along
        if prompt_column not in prompts.column_names:
            raise ValueError(f"dataset has no {prompt_column!r} column (columns: {', '.join(prompts.column_names)})")
        return [dict(row) for row in prompts]
    rows = []
    for i, p in enumerate(prompts):
        rows.append(dict(p) if isinstance(p, dict) else {prompt_column: p})
        if prompt_column not in rows[-1]:
            raise ValueError(f"prompt {i} has no {prompt_column!r} field")
    return rows


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch, a pure function of (seed, epoch): resuming needs no saved order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def trainer_state(trainer, epoch: int, next_batch: int) -> dict[str, Any]:
    return {
        "global_step": trainer.global_step,
        "epoch": epoch,
        "next_batch": next_batch,
        "optimizers": {k: opt.state_dict() for k, opt in trainer.optimizers.items()},
        "kl_controller": trainer.kl_controller.state_dict(),
        "rng": ckpt.rng_state(),
        "shuffle_generator": trainer.shuffle_generator.get_state(),
    }


def restore(trainer, path: Path) -> tuple[int, int]:
    """Load a checkpoint into the trainer; return (epoch, next batch) to continue from."""
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.policy, load_file(path / "adapter_model.safetensors"))
    else:
        policy_weights = {}
        for shard in sorted(path.glob("model*.safetensors")):
            policy_weights.update(load_file(shard))
        missing, unexpected = trainer.policy.load_state_dict(policy_weights, strict=False)
        # Tied embeddings are saved once; anything else missing means a different model.
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise ValueError(f"checkpoint {path} does not match the policy (missing {missing[:3]}, unexpected {unexpected[:3]})")
    ckpt.load_critic_weights(path / "critic", trainer.critic.module)
    state = ckpt.load_trainer_state(path)
    for name, opt in trainer.optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    ckpt.restore_rng_state(state["rng"])
    trainer.shuffle_generator.set_state(state["shuffle_generator"])
    trainer.global_step = state["global_step"]
    return state["epoch"], state["next_batch"]


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metric lines of steps the resumed run will redo (logged after the checkpoint)."""
    if path.exists():
        import json

        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def train_loop(trainer, prompts, num_epochs: int = 1, max_length: int | None = None) -> list[dict[str, Any]]:
    cfg = trainer.config
    rows = prompt_rows(prompts, cfg.prompt_column)
    if not rows:
        raise ValueError("no prompts given: the prompt list is empty")
    if max_length is not None:
        trainer.max_prompt_tokens = trainer._prompt_budget(max_length)
    out = Path(cfg.output_dir)
    start_epoch, start_batch = 0, 0
    if cfg.resume_from_checkpoint:
        start_epoch, start_batch = restore(trainer, ckpt.resolve_checkpoint(out, cfg.resume_from_checkpoint))
        drop_metrics_after(out / "metrics.jsonl", trainer.global_step)
    logger = MetricsLogger(out, getattr(cfg, "report_to", None))
    batches_per_epoch = math.ceil(len(rows) / cfg.batch_size)  # a last short batch is kept
    total = num_epochs * batches_per_epoch
    bar = tqdm(total=total, initial=trainer.global_step, desc="ppo", disable=not cfg.progress_bar, dynamic_ncols=True)
    history = []
    try:
        for epoch in range(start_epoch, num_epochs):
            order = epoch_order(len(rows), cfg.seed, epoch)
            first = start_batch if epoch == start_epoch else 0
            for b in range(first, batches_per_epoch):
                chunk = [rows[i] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
                extras = {k: [r[k] for r in chunk] for k in chunk[0] if k != cfg.prompt_column}
                stats = trainer.step([r[cfg.prompt_column] for r in chunk], extras)
                stats["epoch"] = epoch + (b + 1) / batches_per_epoch
                history.append({k: v for k, v in stats.items() if k != "generated_texts"})
                if trainer.global_step % cfg.logging_steps == 0:
                    logger.log(trainer.global_step, stats)
                bar.update(1)
                bar.set_postfix(reward=f"{stats['mean_reward']:.3f}", kl=f"{stats['kl']:.3f}")
                if cfg.save_steps and trainer.global_step % cfg.save_steps == 0:
                    state = trainer_state(trainer, epoch, b + 1)
                    ckpt.save_checkpoint(out, f"step_{trainer.global_step}", trainer.policy, trainer.tokenizer, trainer.critic.module, state, cfg.save_total_limit)
    finally:
        bar.close()
        logger.close()
    trainer.save_pretrained(str(out / "final"))
    print(f"\nppo-rlhf: {trainer.global_step} steps, final policy in {out / 'final'}\n{trainer.timer.table()}")
    return history
