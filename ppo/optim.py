"""The one optimizer builder and training-step helpers of every stage (PPO, SFT, reward model).

AdamW, with weight decay on weight matrices only: biases and norm weights (1-d parameters) are
exempt, as is usual for transformers. The learning rate follows `ppo.lr_schedule.lr_factor`, a pure
function of the step, so a resumed run sets exactly the rates the uninterrupted one would have.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ppo import distributed as dist
from ppo.lr_schedule import lr_factor, set_learning_rates


def build_adamw(
    module: torch.nn.Module, lr: float, weight_decay: float = 0.0, kind: str = "adamw"
) -> torch.optim.Optimizer:
    """AdamW over `module`'s trainable parameters (`kind="adamw_8bit"`: bitsandbytes', CUDA only)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    # Without decay one group is the same maths (and keeps checkpoints of one group loadable).
    groups: list[dict] = [{"params": params}]
    if weight_decay:
        groups = [
            g
            for g in (
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            )
            if g["params"]
        ]
    if kind == "adamw_8bit":
        if not torch.cuda.is_available():
            raise ValueError("optimizer=adamw_8bit needs a CUDA GPU (bitsandbytes); use optimizer=adamw on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)
    # fused: one kernel over all parameters (CPU and CUDA, fp32/bf16 params); the per-tensor
    # foreach path was ~4x slower per step on CPU and issued ~10k small ops per PPO iteration.
    fused = all(
        p.dtype in (torch.float32, torch.bfloat16, torch.float16) and p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def build_optimizer(model, config, total_steps: int) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    """A stage's AdamW and its schedule: `schedule(step)` is the learning-rate factor of optimizer
    step `step` (0-based) over `total_steps`, after `config.warmup_ratio` of them warming up."""
    optimizer = build_adamw(model, config.learning_rate, config.weight_decay)
    warmup = min(math.ceil(config.warmup_ratio * total_steps), total_steps)
    schedule = functools.partial(
        lr_factor, total_steps=max(total_steps, 1), kind=config.lr_scheduler, warmup_steps=warmup
    )
    return optimizer, schedule


def check_loss(loss: Tensor, what: str, step: int, epoch: int) -> None:
    """Stop at the first NaN/inf loss, before it reaches the weights (nothing is saved)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{what} is {loss.item()} at optimizer step {step} (epoch {epoch + 1}); stopping without writing a model. "
            "Lower learning_rate, check the data, or check the starting weights for NaN."
        )


def optimizer_step(
    model, optimizer, schedule: Callable[[int], float], max_grad_norm: float | None, step: int, epoch: int
) -> dict[str, float]:
    """Clip, set the learning rate of (1-based) optimizer step `step`, step, zero; returns the
    pre-clip gradient norm and the learning rate used."""
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = dist.clip_grad_norm(params, max_grad_norm if max_grad_norm is not None else float("inf"))
    check_loss(grad_norm, "gradient norm", step, epoch)
    lr = set_learning_rates([optimizer], schedule(step - 1))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm.item(), "learning_rate": lr}
