"""Reward-model training: a scalar score that prefers `chosen` to `rejected` (`train_reward_model`).

It lives outside its recipe (`ppo.train_reward`, the command line) because the demo trains with it
too, and no module imports a recipe. The stage, top to bottom (`train_reward_model`):
    1. refuse to overwrite a different run in output_dir (before anything is loaded or written)
    2. load the reward model (a sequence classifier with one label, or a causal LM given a fresh
       scalar head with `init_from_policy`), the tokenizer and the pairs; hold out `eval_fraction`
    3. tokenize prompt + chosen and prompt + rejected exactly as PPO will score a policy sample:
       the prompt's ids, then the completion's ids ending in EOS
    4. AdamW + the learning-rate schedule every stage uses (`ppo.optim`)
    5. pairwise accuracy before training; epochs of the Bradley–Terry loss
       `-logsigmoid(r_chosen - r_rejected - margin)` (+ the optional centering term)
    6. accuracy after training, then output_dir/final (AutoModelForSequenceClassification,
       num_labels=1), config.yaml, metrics.jsonl

Scores are read with `ppo.forward.sequence_scores` (the last real token, whatever the padding side),
the very function PPO scores with, so training and use read the same position.

Under torchrun the stage is data-parallel (DDP), as SFT is: each rank takes its share of every
optimizer step's pairs, gradients are all-reduced, rank 0 logs and saves.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch

from ppo import distributed as dist
from ppo.config import RewardConfig
from ppo.forward import sequence_scores
from ppo.optim import build_optimizer, check_loss
from ppo.preference import Pair, encode_pairs, evaluate_pairs, pair_scores, pairwise_loss
from ppo.roles import keep_fewer_activations
from ppo.run_inputs import load_reward_model
from ppo.stage import (
    check_output_dir,
    finish_outputs,
    given_or_loaded_rows,
    rank_micro_batches,
    run_steps,
    split_rows,
    stage_precision,
    start_outputs,
    step_groups,
)

# ----------------------------------------------------------------------------------------------
# Steps and gradients
# ----------------------------------------------------------------------------------------------


def prompt_grouped_steps(prompts: list[str], per_step: int, num_epochs: int, seed: int):
    """`step_groups` whose shuffle moves whole prompts: the pairs of one prompt stay next to each
    other (and so mostly in one step), where `pair_scores` scores their shared responses once."""
    units: dict[object, list[int]] = {}
    for i, prompt in enumerate(prompts):
        units.setdefault(prompt or ("no prompt", i), []).append(i)  # whole-text pairs share nothing
    return step_groups(len(prompts), per_step, num_epochs, seed, list(units.values()))


def accumulate_reward_gradients(
    model,
    pairs: list[Pair],
    config: RewardConfig,
    pad_id: int,
    step: int,
    epoch: int,
    scorer=None,
    autocast=contextlib.nullcontext,
) -> tuple[float, float]:
    """Backward over one optimizer step's pairs - this rank's share, in micro-batches - and return
    the step's mean loss and accuracy. `scorer`: the model's score call wrapped for DDP;
    `autocast()`: a fresh context for each forward (`ppo.stage.stage_precision`)."""
    step_loss, correct = 0.0, 0.0
    micros = rank_micro_batches(pairs, config.batch_size)
    for i, (part, weight) in enumerate(micros):
        with dist.gradient_sync([scorer] if scorer is not None else [], enabled=i == len(micros) - 1):
            with autocast():  # the scores come out fp32 (`ppo.forward.read_head`)
                chosen, rejected = pair_scores(model, part, pad_id, scorer)
            loss_sum = pairwise_loss(chosen, rejected, config.margin, config.center_rewards_coefficient).sum()
            check_loss(loss_sum, "reward loss", step, epoch)
            # Divide by the whole step's pairs (every pair weighs the same); world_size undoes DDP's mean.
            (loss_sum / len(pairs) * (weight * dist.world_size())).backward()
        step_loss += weight * loss_sum.item() / len(pairs)
        correct += weight * int((chosen > rejected).sum())
    step_loss, correct = dist.all_reduce_sum([step_loss, correct])
    return step_loss, correct / len(pairs)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def train_reward_model(config: RewardConfig, model=None, tokenizer=None, rows=None) -> dict[str, Any]:
    """Train a reward model on preference pairs; `rows` is a list of {"prompt", "chosen",
    "rejected"} (or anything `ppo.formats.load_preference_rows` reads), else the file `config.data`.

    Returns the metrics: `train_loss` / `train_accuracy` (one value per optimizer step),
    `final_loss`, held-out `accuracy_before` / `accuracy` and `eval_loss_before` / `eval_loss`
    (None without an eval set), `steps`, `train_rows`, `eval_rows`, `precision` (the one
    `config.precision` resolved to), `output_dir`.
    """
    # 1. refuse to clobber another run before anything is loaded or written
    dist.init_from_env(config.dist_timeout_s)  # a no-op unless launched by torchrun
    out = check_output_dir(config)
    torch.manual_seed(config.seed)  # the fresh score head of init_from_policy
    # 2. model, tokenizer, pairs and the held-out split
    model, tokenizer = load_reward_model(config, model, tokenizer)
    keep_fewer_activations(model, config)
    precision, autocast = stage_precision(config, model)
    # The score is read from the backbone and head directly, not model.forward: wrap that call.
    scorer = dist.wrap(dist.ForwardAs(model, lambda ids, mask: sequence_scores(model, ids, mask)), "ddp")
    rows = preference_rows(config, tokenizer, rows)
    train_rows, eval_rows = split_rows(rows, config.eval_fraction, config.seed)
    # 3. token ids, once
    pairs = encode_pairs(tokenizer, train_rows, config.max_length)
    # 4. optimizer and schedule
    per_step = config.batch_size * config.gradient_accumulation_steps
    total_steps = config.num_epochs * math.ceil(len(pairs) / per_step)
    optimizer, scheduler = build_optimizer(model, config, total_steps)
    # 5. accuracy before, then train
    logger = start_outputs(out, config, model, precision)
    before = held_out(model, tokenizer, eval_rows, config, autocast)
    if config.group_by_prompt:
        steps = prompt_grouped_steps([r["prompt"] for r in train_rows], per_step, config.num_epochs, config.seed)
    else:
        steps = step_groups(len(pairs), per_step, config.num_epochs, config.seed)

    def accumulate(group: list[int], step: int, epoch: int) -> dict[str, float]:
        part = [pairs[i] for i in group]
        loss, accuracy = accumulate_reward_gradients(
            model, part, config, tokenizer.pad_token_id, step, epoch, scorer, autocast
        )
        return {"loss": loss, "accuracy": accuracy}

    def shown(numbers: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{numbers['loss']:.4f}", "acc": f"{numbers['accuracy']:.2f}"}

    records = run_steps(config, model, optimizer, scheduler, logger, steps, total_steps, accumulate, "reward", shown)
    losses, accuracies = [r["loss"] for r in records], [r["accuracy"] for r in records]
    # 6. accuracy after, and the final model
    after = held_out(model, tokenizer, eval_rows, config, autocast)
    metrics = {
        "train_loss": losses,
        "train_accuracy": accuracies,
        "final_loss": losses[-1] if losses else None,
        "accuracy_before": before.get("accuracy"),
        "accuracy": after.get("accuracy"),
        "eval_loss_before": before.get("loss"),
        "eval_loss": after.get("loss"),
        "score_gap": after.get("score_gap"),
        "steps": len(losses),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "precision": precision,
        "output_dir": str(out),
    }
    finish_outputs(out, config, model, tokenizer, logger, metrics)
    return metrics


def held_out(model, tokenizer, eval_rows: list[dict], config: RewardConfig, autocast) -> dict[str, float]:
    """`evaluate_pairs` on the held-out rows, in the stage's precision; empty when there are none."""
    if not eval_rows:
        return {}
    return evaluate_pairs(model, tokenizer, eval_rows, config.batch_size, config.max_length, config.margin, autocast)


def preference_rows(config: RewardConfig, tokenizer, rows) -> list[dict[str, str]]:
    """{"prompt", "chosen", "rejected"} rows: `rows` as given when already in that form, else read
    with `ppo.formats.load_preference_rows` (from `rows` or from the file `config.data`)."""

    def load(source):
        from ppo.formats import (
            load_preference_rows,  # formats pulls in `datasets`; only needed for files
        )

        return load_preference_rows(
            source,
            tokenizer,
            prompt_column=config.prompt_column,
            chosen_column=config.chosen_column,
            rejected_column=config.rejected_column,
            skip_bad_rows=config.skip_bad_rows,
        )

    return without_same_pairs(
        given_or_loaded_rows(rows, config.data, ("prompt", "chosen", "rejected"), load, "preference data")
    )


def without_same_pairs(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """`rows` less those whose chosen equals rejected (a warning lists them; the loaders of
    `ppo.formats` do the same for files); all of them such: refused, the columns are likely mixed up."""
    same = [i for i, r in enumerate(rows, start=1) if r["chosen"].strip() == r["rejected"].strip()]
    if not same:
        return rows
    shown = ", ".join(map(str, same[:10])) + (", ..." if len(same) > 10 else "")
    if len(same) == len(rows):
        raise ValueError(
            f"preference rows: chosen equals rejected in all {len(rows)} rows (rows {shown}): such pairs teach nothing"
        )
    warnings.warn(
        f"dropped {len(same)} of {len(rows)} preference rows whose chosen equals rejected (rows {shown}): they "
        "teach nothing",
        stacklevel=2,
    )
    dropped = set(same)
    return [r for i, r in enumerate(rows, start=1) if i not in dropped]
