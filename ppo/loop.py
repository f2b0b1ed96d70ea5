"""The training loop around `PPOTrainer.step`: epochs over shuffled prompts, metrics, progress,
periodic checkpoints, exact resume, the final model and the timing table.

Under torchrun every rank runs this loop over the same batches (the order is a pure function of the
seed) and passes its contiguous share of each batch to `step`; rank 0 alone logs, prints and shows
the progress bar. Checkpoints are collective: see `save_training_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ppo import checkpoint as ckpt
from ppo import distributed as dist
from ppo.metrics import main_logger


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


def batch_bounds(n_rows: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch of an epoch; a last short batch is kept, cut to a multiple of
    the number of ranks (each rank needs an equal share; one process keeps every row)."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} (global) must be a multiple of the {world_size} ranks")
    bounds = [(start, min(start + batch_size, n_rows)) for start in range(0, n_rows, batch_size)]
    start, stop = bounds[-1]
    bounds[-1] = (start, stop - (stop - start) % world_size)
    if bounds[-1][1] < stop and dist.is_main():
        print(f"ppo-rlhf: the last batch of each epoch drops {stop - bounds[-1][1]} prompt(s) to split evenly over {world_size} ranks")
    return [b for b in bounds if b[1] > b[0]]


def trainer_state(trainer, epoch: int, next_batch: int, with_optimizers: bool = True) -> dict[str, Any]:
    state = {
        "global_step": trainer.global_step,
        "epoch": epoch,
        "next_batch": next_batch,
        "kl_controller": trainer.kl_controller.state_dict(),
        "rng": ckpt.rng_state(),
        "shuffle_generator": trainer.shuffle_generator.get_state(),
    }
    if with_optimizers:  # sharded checkpoints keep the optimizers in DCP instead
        state["optimizers"] = {k: opt.state_dict() for k, opt in trainer.optimizers.items()}
    return state


def _sharded_parts(trainer):
    """(models, optimizers) of a DCP checkpoint: each optimizer with the model that names its
    parameters (the plain critic module, whose names do not depend on the wrapper)."""
    models = {"policy": trainer.policy, **({"critic": trainer.critic.module} if trainer.critic else {})}
    return models, {name: (models[name], trainer.optimizers[name]) for name in models}


def save_training_checkpoint(trainer, out: Path, epoch: int, next_batch: int) -> Path:
    """step_N: collective. Sharded (FSDP2) models through DCP by every rank, replicated ones
    (one process, DDP) as Hugging Face directories by rank 0."""
    cfg, name = trainer.config, f"step_{trainer.global_step}"
    if dist.is_sharded(trainer.policy):
        models, optimizers = _sharded_parts(trainer)
        state = trainer_state(trainer, epoch, next_batch, with_optimizers=False)
        return ckpt.save_sharded_checkpoint(out, name, models, optimizers, trainer.policy, trainer.tokenizer, state, cfg.save_total_limit)
    state = trainer_state(trainer, epoch, next_batch)
    critic = trainer.critic.module if trainer.critic else None  # a critic-free estimator has none to save
    return ckpt.save_checkpoint(out, name, trainer.policy, trainer.tokenizer, critic, state, cfg.save_total_limit)


def restore(trainer, path: Path) -> tuple[int, int]:
    """Load a checkpoint into the trainer; return (epoch, next batch) to continue from. A sharded
    (DCP) checkpoint loads on any number of ranks; a Hugging Face one into replicated models."""
    state = ckpt.load_trainer_state(path)
    if ckpt.is_sharded_checkpoint(path):
        ckpt.load_sharded_checkpoint(path, *_sharded_parts(trainer))
    elif dist.is_sharded(trainer.policy):
        raise ValueError(f"{path} was written without strategy=fsdp; resume it with strategy=ddp (or in one process)")
    else:
        _load_model_dirs(trainer, path)
        for name, opt in trainer.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    ckpt.restore_rng_state(state["rng"])
    trainer.shuffle_generator.set_state(state["shuffle_generator"])
    trainer.global_step = state["global_step"]
    return state["epoch"], state["next_batch"]


def _load_model_dirs(trainer, path: Path) -> None:
    """Policy (or its LoRA adapter) and critic weights from a Hugging Face-layout checkpoint."""
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
    if trainer.critic is not None:
        ckpt.load_critic_weights(path / "critic", trainer.critic.module)


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metric lines of steps the resumed run will redo (logged after the checkpoint)."""
    if path.exists():
        import json

        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


# What `on_step` is called with after each step: the step's statistics and the rows of the global
# batch (dicts with the prompt column and any other columns; under torchrun every rank gets all of
# them, in the order of the gathered `generated_texts`). What it returns joins the statistics.
StepCallback = Callable[[dict[str, Any], list[dict[str, Any]]], "dict[str, Any] | None"]


def train_loop(trainer, prompts, num_epochs: int = 1, max_length: int | None = None,
               on_step: StepCallback | None = None, max_steps: int | None = None) -> list[dict[str, Any]]:
    """`num_epochs` passes over `prompts` (stopping early once `trainer.global_step` reaches
    `max_steps`); returns every step's statistics without the generated texts. `on_step(stats,
    rows)` runs after each step, before logging: the metrics it returns are logged with the step's."""
    cfg = trainer.config
    rows = prompt_rows(prompts, cfg.prompt_column)
    if not rows:
        raise ValueError("no prompts given: the prompt list is empty")
    if max_length is not None:
        trainer.max_prompt_tokens = trainer.prompt_budget(max_length)
    out = Path(cfg.output_dir)
    start_epoch, start_batch = 0, 0
    if cfg.resume_from_checkpoint:
        start_epoch, start_batch = restore(trainer, ckpt.resolve_checkpoint(out, cfg.resume_from_checkpoint))
        if dist.is_main():
            drop_metrics_after(out / "metrics.jsonl", trainer.global_step)
    for hook in getattr(trainer, "on_train_start", ()):  # e.g. the CLI's config.yaml: written once a resume has succeeded
        hook()
    bounds = batch_bounds(len(rows), cfg.batch_size, dist.world_size())
    planned = num_epochs * len(bounds) if max_steps is None else min(num_epochs * len(bounds), max_steps)
    trainer.planned_steps = planned  # what an lr schedule spans, unless configured
    logger = main_logger(out, getattr(cfg, "report_to", None))
    bar = tqdm(total=planned, initial=trainer.global_step, desc="ppo",
               disable=not (cfg.progress_bar and dist.is_main()), dynamic_ncols=True)
    history = []
    try:
        with dist.report_failures("ppo training"):
            for epoch in range(start_epoch, num_epochs):
                order = epoch_order(len(rows), cfg.seed, epoch)
                first = start_batch if epoch == start_epoch else 0
                for b in range(first, len(bounds)):
                    batch = order[bounds[b][0] : bounds[b][1]]
                    mine = dist.shard_slice(len(batch))  # this rank's rows of the global batch
                    chunk = [rows[i] for i in batch[mine]]
                    extras = {k: [r[k] for r in chunk] for k in chunk[0] if k != cfg.prompt_column}
                    stats = trainer.step([r[cfg.prompt_column] for r in chunk], extras, row_offset=mine.start)
                    stats["epoch"] = epoch + (b + 1) / len(bounds)
                    if on_step is not None:
                        stats.update(on_step(stats, [rows[i] for i in batch]) or {})
                    history.append({k: v for k, v in stats.items() if k != "generated_texts"})
                    if trainer.global_step % cfg.logging_steps == 0:
                        logger.log(trainer.global_step, stats)
                    bar.update(1)
                    bar.set_postfix(reward=f"{stats['mean_reward']:.3f}", kl=f"{stats['kl']:.3f}")
                    if cfg.save_steps and trainer.global_step % cfg.save_steps == 0:
                        save_training_checkpoint(trainer, out, epoch, b + 1)
                    if max_steps is not None and trainer.global_step >= max_steps:
                        break
                if max_steps is not None and trainer.global_step >= max_steps:
                    break
            trainer.save_pretrained(str(out / "final"))
    finally:
        bar.close()
        logger.close()
    if dist.is_main():
        print(f"\nppo-rlhf: {trainer.global_step} steps, final policy in {out / 'final'}\n{trainer.timer.table()}")
    return history
