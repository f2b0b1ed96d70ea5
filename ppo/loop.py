"""The training loop around `PPOTrainer.step`: epochs over shuffled prompts, metrics, progress,
periodic checkpoints, exact resume, the final model and the timing table. What a checkpoint holds
and how a resume puts it back live in ppo.resume (its files in ppo.checkpoint); SIGINT / SIGTERM
stop the loop between two steps (ppo.interrupt), after a checkpoint.

Under torchrun every rank runs this loop over the same batches (the order is a pure function of the
seed) and passes its contiguous share of each batch to `step`; rank 0 alone logs, prints and shows
the progress bar. Checkpoints are collective: see `ppo.resume.save_training_checkpoint`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ppo import checkpoint as ckpt
from ppo import distributed as dist
from ppo import resume
from ppo.interrupt import StopOnSignal, TrainingInterrupted
from ppo.metrics import main_logger
from ppo.run_record import complete_start, ppo_run, record_start


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


def fresh_output_dir(out: Path, overwrite: bool) -> None:
    """A run starting from step 0 must not mix its checkpoints and final model with an earlier
    run's (the CLIs check this before loading; `PPOTrainer.train()` from Python reaches here
    directly): refused unless `overwrite`, which removes the earlier run's outputs first."""
    from ppo.stage import PPO_OUTPUTS, OutputDirError, remove_outputs

    earlier = [p.name for p in (out / "final", out / "latest") if p.exists()] + sorted(
        p.name for p in out.glob("step_*")
    )
    if not earlier:
        return
    if not overwrite:
        raise OutputDirError(
            f"output_dir {str(out)!r} already holds a run's outputs ({', '.join(earlier)}); pass "
            "resume_from_checkpoint='latest' to continue it, overwrite=True to replace it, or another output_dir"
        )
    if dist.is_main():
        remove_outputs(out, PPO_OUTPUTS)
    dist.barrier()


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
        print(
            f"ppo-rlhf: the last batch of each epoch drops {stop - bounds[-1][1]} prompt(s) to split evenly over "
            f"{world_size} ranks"
        )
    return [b for b in bounds if b[1] > b[0]]


# What `on_step` is called with after each step: the step's statistics and the rows of the global
# batch (dicts with the prompt column and any other columns; under torchrun every rank gets all of
# them, in the order of the gathered `generated_texts`). What it returns joins the statistics.
StepCallback = Callable[[dict[str, Any], list[dict[str, Any]]], "dict[str, Any] | None"]


def train_loop(
    trainer,
    prompts,
    num_epochs: int = 1,
    max_length: int | None = None,
    on_step: StepCallback | None = None,
    max_steps: int | None = None,
) -> list[dict[str, Any]]:
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
    bounds = batch_bounds(len(rows), cfg.batch_size, dist.world_size())
    # What a checkpoint's data position refers to; resuming under another plan is refused.
    plan = {
        "batch_size": cfg.batch_size,
        "prompts": len(rows),
        "seed": cfg.seed,
        "num_epochs": num_epochs,
        "batches_per_epoch": len(bounds),
        "max_steps": max_steps,
    }
    start_epoch, start_batch = 0, 0
    if cfg.resume_from_checkpoint:
        start_epoch, start_batch = resume.resume(trainer, out, cfg.resume_from_checkpoint, plan)
    else:
        fresh_output_dir(out, getattr(cfg, "overwrite", False))
    for hook in getattr(
        trainer, "on_train_start", ()
    ):  # e.g. the CLI's config.yaml: written once a resume has succeeded
        hook()
    record_start(out, ppo_run(trainer))  # run.json: what this start ran on, and what `auto` resolved to
    planned = num_epochs * len(bounds) if max_steps is None else min(num_epochs * len(bounds), max_steps)
    trainer.planned_steps = planned  # what an lr schedule spans, unless configured
    logger = main_logger(out, getattr(cfg, "report_to", None))
    bar = tqdm(
        total=planned,
        initial=trainer.global_step,
        desc="ppo",
        disable=not (cfg.progress_bar and dist.is_main()),
        dynamic_ncols=True,
    )
    history, saved = [], None
    try:
        with dist.report_failures("ppo training"), StopOnSignal() as stop:
            for epoch in range(start_epoch, num_epochs):
                order = epoch_order(len(rows), cfg.seed, epoch)
                first = start_batch if epoch == start_epoch else 0
                for b in range(first, len(bounds)):
                    batch = order[bounds[b][0] : bounds[b][1]]
                    mine = dist.shard_slice(len(batch))  # this rank's rows of the global batch
                    chunk = [rows[i] for i in batch[mine]]
                    extras = {k: [r[k] for r in chunk] for k in chunk[0] if k != cfg.prompt_column}
                    stats = trainer.step([r[cfg.prompt_column] for r in chunk], extras, row_offset=mine.start)
                    if not history:  # this start's first step: every fast path has now been decided
                        complete_start(out)
                    stats["epoch"] = epoch + (b + 1) / len(bounds)
                    if on_step is not None:
                        stats.update(on_step(stats, [rows[i] for i in batch]) or {})
                    history.append({k: v for k, v in stats.items() if k != "generated_texts"})
                    if trainer.global_step % cfg.logging_steps == 0:
                        logger.log(trainer.global_step, stats)
                    bar.update(1)
                    bar.set_postfix(reward=f"{stats['mean_reward']:.3f}", kl=f"{stats['kl']:.3f}")
                    saved = None
                    if cfg.save_steps and trainer.global_step % cfg.save_steps == 0:
                        saved = resume.save_training_checkpoint(trainer, out, epoch, b + 1, plan)
                    if (signum := stop.requested()) is not None:  # SIGINT/SIGTERM: stop after this step
                        if saved is None and cfg.save_on_interrupt:
                            saved = resume.save_training_checkpoint(trainer, out, epoch, b + 1, plan)
                        raise TrainingInterrupted(signum)
                    if max_steps is not None and trainer.global_step >= max_steps:
                        break
                if max_steps is not None and trainer.global_step >= max_steps:
                    break
            save_final(trainer, out / "final")
    except TrainingInterrupted as err:
        raise err.describe(interrupted_message(err, trainer.global_step, saved, out)) from None
    finally:
        bar.close()
        logger.close()
    if dist.is_main():
        print(f"\nppo-rlhf: {trainer.global_step} steps, final policy in {out / 'final'}\n{trainer.timer.table()}")
    return history


def interrupted_message(err: TrainingInterrupted, step: int, saved: Path | None, out: Path) -> str:
    """One line: which signal, after which step, where the checkpoint is and how to go on."""
    name = signal.Signals(err.signum).name
    how = "resume with the same command plus resume_from_checkpoint=latest"
    if err.abandoned:
        last = ckpt.last_published(out)
        where = (
            f"the last checkpoint is {last}; {how}"
            if last
            else "no checkpoint was written; a new run starts from the beginning"
        )
        return f"stopped by a second {name}, abandoning the step in progress (nothing saved for it); {where}"
    if saved is not None:
        return f"stopped by {name} after step {step}; checkpoint {saved}; {how}"
    last = ckpt.last_published(out)
    where = f"the last checkpoint is {last}; {how}" if last else "no checkpoint was written"
    return f"stopped by {name} after step {step} without a checkpoint of it (save_on_interrupt=false); {where}"


def save_final(trainer, final: Path) -> None:
    """output_dir/final, written aside and renamed into place (`checkpoint.publish_dir`)."""
    ckpt.publish_dir(final, lambda tmp: trainer.save_pretrained(str(tmp)))
