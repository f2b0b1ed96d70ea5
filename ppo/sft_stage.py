"""Supervised fine-tuning: teach a causal LM to answer prompts before PPO (`train_sft`).

It lives outside its recipe (`ppo.sft`, the command line) because the demo trains with it too,
and no module imports a recipe. The stage, top to bottom (`train_sft`):
    1. refuse to overwrite a different run in output_dir (before anything is loaded or written)
    2. load the model, the tokenizer and the rows; hold out `eval_fraction` of them
    3. tokenize: prompt and completion separately, EOS appended, labels -100 on the prompt
    4. AdamW + the learning-rate schedule every stage uses (`ppo.optim`)
    5. epochs of shuffled batches; loss = cross-entropy over completion tokens only
    6. eval loss, then output_dir/final (a plain Hugging Face directory), config.yaml, metrics.jsonl

Why tokenize prompt and completion separately: PPO generates after the prompt's own token ids, so
the boundary the policy learns here is exactly the one it samples from later (tokenizing the joined
text can merge the last prompt token with the first completion token). Why append EOS: a policy
that never saw EOS after a completion does not learn to stop, and PPO then penalises or truncates.

The plumbing shared with the other stages lives in `ppo.stage` (output-dir check, eval split,
batches, CLI parsing), `ppo.optim` (optimizer, schedule) and `ppo.collate` (tokens), so each stage
reads as its steps only.

Under torchrun the stage is data-parallel (DDP): an optimizer step's rows (batch_size x
gradient_accumulation_steps, global) are split over the ranks, gradients are all-reduced, and the
result equals one process's; rank 0 logs and saves.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ppo import distributed as dist
from ppo.collate import IGNORE_INDEX, collate, encode_prompt_completion, sft_labels
from ppo.config import SFTConfig
from ppo.forward import completion_loss_sum
from ppo.optim import build_optimizer, check_loss
from ppo.roles import keep_fewer_activations
from ppo.stage import (
    check_output_dir,
    finish_outputs,
    given_or_loaded_rows,
    load_causal_lm,
    rank_micro_batches,
    run_steps,
    split_rows,
    stage_precision,
    start_outputs,
    step_groups,
)


def accumulate_sft_gradients(
    model,
    examples: list[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    step: int,
    epoch: int,
    loss_sum=completion_loss_sum,
) -> float:
    """Backward over one optimizer step's (ids, labels) examples - this rank's share, in
    micro-batches of `batch_size` - and return the step's mean loss per completion token.
    `model` may be DDP-wrapped: its averaging over ranks is undone by the factor world_size.
    `loss_sum(model, batch)`: summed loss and token count of a micro-batch (`train_sft` passes
    `completion_loss_sum` in the stage's precision and with its fused head)."""
    n_tokens = sum(sum(t != IGNORE_INDEX for t in labels) for _, labels in examples)  # the whole step's
    step_loss = 0.0
    micros = rank_micro_batches(examples, batch_size)
    for i, (part, weight) in enumerate(micros):
        with dist.gradient_sync([model], enabled=i == len(micros) - 1):
            loss, _ = loss_sum(model, collate([ids for ids, _ in part], pad_id, [labels for _, labels in part]))
            check_loss(loss, "SFT loss", step, epoch)
            (loss / n_tokens * (weight * dist.world_size())).backward()
        step_loss += weight * loss.item() / n_tokens
    return dist.all_reduce_sum([step_loss])[0]


@torch.no_grad()
def evaluate_sft_loss(
    model,
    tokenizer,
    rows: list[dict],
    batch_size: int = 8,
    max_length: int = 512,
    loss_sum=completion_loss_sum,
) -> float:
    """Mean cross-entropy per completion token of `rows` ({"prompt", "completion"} dicts), each
    batch's by `loss_sum` (as in `accumulate_sft_gradients`). Under torchrun each rank scores its
    share of the rows (a collective: every rank calls)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = rows[dist.shard_slice(len(rows))]
    for start in range(0, len(rows), batch_size):
        examples = [
            encode_prompt_completion(tokenizer, r["prompt"], r["completion"], max_length)
            for r in rows[start : start + batch_size]
        ]
        batch = collate(
            [ids for ids, _ in examples], tokenizer.pad_token_id, [sft_labels(ids, n) for ids, n in examples]
        )
        loss, n = loss_sum(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    total, count = dist.all_reduce_sum([total, count])
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def train_sft(config: SFTConfig, model=None, tokenizer=None, rows=None) -> dict[str, Any]:
    """Fine-tune `model` (or `config.model_name_or_path`) on `rows` (or the file `config.data`).

    `rows` is a list of {"prompt": str, "completion": str}, or anything `ppo.formats.load_sft_rows`
    reads (a datasets.Dataset, rows of chat messages). Returns the metrics: `train_loss` (one value
    per optimizer step), `final_loss`, `eval_loss_before` / `eval_loss` (None without an eval set),
    `steps`, `train_rows`, `eval_rows`, `precision` (the one `config.precision` resolved to),
    `output_dir`. Writes output_dir/config.yaml, metrics.jsonl
    and, with `save_final`, output_dir/final.
    """
    # 1. refuse to clobber another run before anything is loaded or written
    dist.init_from_env(config.dist_timeout_s)  # a no-op unless launched by torchrun
    out = check_output_dir(config)
    torch.manual_seed(config.seed)
    # 2. model, tokenizer, rows and the held-out split
    model, tokenizer = load_causal_lm(config, model, tokenizer)
    keep_fewer_activations(model, config)
    precision, autocast = stage_precision(config, model)

    def loss_sum(module, batch):  # in the stage's precision, through the fused head where it may
        with autocast():
            return completion_loss_sum(module, batch, config.fused_lm_head)

    trained = dist.wrap(model, "ddp")  # under torchrun: gradients all-reduced; else the model
    rows = sft_rows(config, tokenizer, rows)
    train_rows, eval_rows = split_rows(rows, config.eval_fraction, config.seed)
    # 3. token ids and labels, once
    encoded = [encode_prompt_completion(tokenizer, r["prompt"], r["completion"], config.max_length) for r in train_rows]
    examples = [(ids, sft_labels(ids, n)) for ids, n in encoded]
    # 4. optimizer and schedule
    per_step = config.batch_size * config.gradient_accumulation_steps
    total_steps = config.num_epochs * math.ceil(len(examples) / per_step)
    optimizer, scheduler = build_optimizer(model, config, total_steps)
    # 5. train
    logger = start_outputs(out, config, model, precision)
    eval_before = (
        evaluate_sft_loss(model, tokenizer, eval_rows, config.batch_size, config.max_length, loss_sum)
        if eval_rows
        else None
    )

    steps = step_groups(len(examples), per_step, config.num_epochs, config.seed)

    def accumulate(group: list[int], step: int, epoch: int) -> dict[str, float]:
        part = [examples[i] for i in group]
        return {
            "loss": accumulate_sft_gradients(
                trained, part, config.batch_size, tokenizer.pad_token_id, step, epoch, loss_sum
            )
        }

    def shown(numbers: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{numbers['loss']:.4f}"}

    records = run_steps(config, model, optimizer, scheduler, logger, steps, total_steps, accumulate, "sft", shown)
    curve = [r["loss"] for r in records]
    # 6. eval loss and the final model
    eval_after = (
        evaluate_sft_loss(model, tokenizer, eval_rows, config.batch_size, config.max_length, loss_sum)
        if eval_rows
        else None
    )
    metrics = {
        "train_loss": curve,
        "final_loss": curve[-1] if curve else None,
        "eval_loss_before": eval_before,
        "eval_loss": eval_after,
        "steps": len(curve),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "precision": precision,
        "output_dir": str(out),
    }
    finish_outputs(out, config, model, tokenizer, logger, metrics)
    return metrics


def sft_rows(config: SFTConfig, tokenizer, rows) -> list[dict[str, str]]:
    """{"prompt", "completion"} rows: `rows` as given when already in that form, else read with
    `ppo.formats.load_sft_rows` (from `rows` or from the file `config.data`)."""

    def load(source):
        from ppo.formats import load_sft_rows  # formats pulls in `datasets`; only needed for files

        return load_sft_rows(
            source,
            tokenizer,
            prompt_column=config.prompt_column,
            completion_column=config.completion_column,
            messages_column=config.messages_column,
            skip_bad_rows=config.skip_bad_rows,
        )

    return given_or_loaded_rows(rows, config.data, ("prompt", "completion"), load, "SFT data")
