"""[6] The resume state: what a training checkpoint holds besides the weights (optimizers, KL
controller, every RNG, the data position and plan), writing it with them, putting it back, and the
checks that refuse a resume that would not continue the same run.

The files themselves - their layout, the atomic publish, finding the newest complete checkpoint -
are `ppo.checkpoint`'s; this module is what the training loop calls (`save_training_checkpoint`,
`resume`).
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import torch

from ppo import distributed as dist
from ppo import durable
from ppo.checkpoint import (
    CheckpointError,
    is_sharded_checkpoint,
    load_critic_weights,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What the saved data position means: resuming with other values would continue elsewhere.
PLAN_KEYS = ("batch_size", "prompts", "seed")


def trainer_state(
    trainer, epoch: int, next_batch: int, with_optimizers: bool = True, plan: dict | None = None
) -> dict[str, Any]:
    """Everything but the weights that an exact resume needs; `plan`: the data plan of train()."""
    state = {
        "global_step": trainer.global_step,
        "epoch": epoch,
        "next_batch": next_batch,
        "kl_controller": trainer.kl_controller.state_dict(),
        "rng": rng_state(),
        "shuffle_generator": trainer.shuffle_generator.get_state(),
        "plan": plan,
    }
    if with_optimizers:  # sharded checkpoints keep the optimizers in DCP instead
        state["optimizers"] = {k: opt.state_dict() for k, opt in trainer.optimizers.items()}
    return state


def _sharded_parts(trainer):
    """(models, optimizers) of a DCP checkpoint: each optimizer with the model that names its
    parameters (the plain critic module, whose names do not depend on the wrapper)."""
    models = {"policy": trainer.policy, **({"critic": trainer.critic.module} if trainer.critic else {})}
    return models, {name: (models[name], trainer.optimizers[name]) for name in models}


def save_training_checkpoint(trainer, out: Path, epoch: int, next_batch: int, plan: dict | None = None) -> Path:
    """step_N: collective. Sharded (FSDP2) models through DCP by every rank, replicated ones
    (one process, DDP) as Hugging Face directories by rank 0."""
    cfg, name = trainer.config, f"step_{trainer.global_step}"
    metrics = Path(out) / "metrics.jsonl"
    if dist.is_main() and metrics.exists():
        durable.fsync_file(metrics)  # the metrics of the steps a checkpoint holds are on disk with it
    if dist.is_sharded(trainer.policy):
        from ppo.checkpoint_dcp import save_sharded_checkpoint

        models, optimizers = _sharded_parts(trainer)
        state = trainer_state(trainer, epoch, next_batch, with_optimizers=False, plan=plan)
        return save_sharded_checkpoint(
            out, name, models, optimizers, trainer.policy, trainer.tokenizer, state, cfg.save_total_limit
        )
    state = trainer_state(trainer, epoch, next_batch, plan=plan)
    critic = trainer.critic.module if trainer.critic else None  # a critic-free estimator has none to save
    return save_checkpoint(out, name, trainer.policy, trainer.tokenizer, critic, state, cfg.save_total_limit)


def check_resumable(state: dict[str, Any], path: Path, plan: dict | None, out: Path) -> None:
    """Refuse, before anything is loaded or changed, a resume whose data plan differs from the
    checkpoint's (its data position would mean other prompts) or that has nothing left to train
    while output_dir/final holds a finished policy (resuming would replace it with older weights)."""
    saved = state.get("plan")
    if plan is None or saved is None:  # step() users, and checkpoints of older versions
        return
    changed = [f"{k} {saved[k]!r} -> {plan[k]!r}" for k in PLAN_KEYS if saved.get(k) != plan.get(k)]
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: the batch plan changed since it was written ({', '.join(changed)}), so its "
            "data position would point at other prompts; resume with the values it was written with, or start a new run"
        )
    left = (plan["num_epochs"] - state["epoch"]) * plan["batches_per_epoch"] - state["next_batch"]
    if plan.get("max_steps") is not None:
        left = min(left, plan["max_steps"] - state["global_step"])
    if left <= 0 and (Path(out) / "final").exists():
        raise CheckpointError(
            f"nothing to train: {path} is already at the end of this run (epoch {state['epoch']} of num_epochs="
            f"{plan['num_epochs']}) and {Path(out) / 'final'} holds its finished policy; raise num_epochs to "
            "train further"
        )


def restore(trainer, path: Path, plan: dict | None = None, out: Path | None = None) -> tuple[int, int]:
    """Load a checkpoint into the trainer; return (epoch, next batch) to continue from. A sharded
    (DCP) checkpoint loads on any number of ranks; a Hugging Face one into replicated models."""
    state = load_trainer_state(path)
    check_resumable(state, path, plan, Path(out or trainer.config.output_dir))
    if is_sharded_checkpoint(path):
        from ppo.checkpoint_dcp import load_sharded_checkpoint

        load_sharded_checkpoint(path, *_sharded_parts(trainer))
    elif dist.is_sharded(trainer.policy):
        raise ValueError(f"{path} was written without strategy=fsdp; resume it with strategy=ddp (or in one process)")
    else:
        _load_model_dirs(trainer, path)
        for name, opt in trainer.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    restore_rng_state(state["rng"])
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
            raise ValueError(
                f"checkpoint {path} does not match the policy (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    if trainer.critic is not None:
        load_critic_weights(path / "critic", trainer.critic.module)


def resume(trainer, out: Path, spec: str, plan: dict | None) -> tuple[int, int]:
    """resume_from_checkpoint in train(): find the checkpoint (falling back past damaged ones),
    check and load it, then bring metrics.jsonl back to its step; returns (epoch, next batch)."""
    position = restore(trainer, resolve_checkpoint(out, spec), plan, out)
    if dist.is_main():
        repair_metrics(Path(out) / "metrics.jsonl", trainer.global_step)
    return position


def repair_metrics(path: Path, through_step: int) -> None:
    """Keep the metric lines of steps up to `through_step` (the resumed run logs the later ones
    again). A torn last line - a crash while it was written - is dropped with a warning; a broken
    line elsewhere is an error naming it."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    kept, later = [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError as err:
            if number < len(lines):
                raise CheckpointError(
                    f"{path} line {number} is not valid JSON ({err}); fix or remove that line, then resume"
                ) from None
            warnings.warn(
                f"{path}: the last line ({number}) was cut off mid-write, probably by a crash; dropping it",
                stacklevel=2,
            )
            continue
        (kept if row.get("step", 0) <= through_step else later).append(line)
    if later:
        warnings.warn(
            f"{path}: dropping {len(later)} line(s) of steps after {through_step}, which the resumed run trains again",
            stacklevel=2,
        )
    if len(kept) != len(lines) or not text.endswith("\n"):
        durable.write_text(path, "".join(line + "\n" for line in kept))
