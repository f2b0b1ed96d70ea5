"""The learning-rate schedule of every stage (PPO, SFT, reward model): a factor of the step number,
nothing stored.

Why stateless: the factor at step s depends only on s, the schedule's length and its kind, so a
resumed run sets exactly the learning rates the uninterrupted run would have (the step number is in
every checkpoint), and a rank can never drift from another.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total_steps: int | None, kind: str = "constant", warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate for the update of step `step` (0-based).

    A linear warm-up from 1/(warmup_steps+1) over the first `warmup_steps` steps, then `constant` (1),
    `linear` (to 0 at `total_steps`) or `cosine` (half a cosine to 0 at `total_steps`). Steps past
    the end keep the last factor of the decay (0 is never reached: the last step still learns).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    if not total_steps:
        raise ValueError(f"lr_scheduler={kind!r} needs the schedule's length: set lr_schedule_steps, or use train()")
    span = max(total_steps - warmup_steps, 1)
    progress = min(step - warmup_steps, span - 1) / span  # in [0, 1): the last step's factor is > 0
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rates(optimizers, factor: float) -> float:
    """Every param group's lr = its initial lr x `factor`; returns the first group's new lr."""
    first = None
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor
            first = group["lr"] if first is None else first
    return first
