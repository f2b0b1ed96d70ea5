"""[6] Checkpoints: a plain Hugging Face policy directory plus what an exact resume needs.

    output_dir/step_N/            policy (AutoModelForCausalLM) + tokenizer
    output_dir/step_N/critic/     the critic (a Hugging Face model, or critic.safetensors)
    output_dir/step_N/trainer_state.json + .safetensors   optimizers, KL controller, RNG states,
                                  data position and plan (ppo.state_file: loads without running code)
    output_dir/step_N/manifest.json   every file's size and sha256, written last
    output_dir/latest             the name of the newest published checkpoint

A checkpoint is written to `.tmp-step_N`, every file fsynced, the manifest written last, then the
directory is renamed into place (ppo.durable): a kill at any moment leaves the previous checkpoints
complete, and a step_N whose files do not match its manifest is never resumed from - `latest`
falls back to the previous one with a warning naming the file. A failed write (a full disk)
raises CheckpointWriteError naming the path and keeps the previous checkpoint. Weights are checked
for NaN/inf before anything is written.

Under torchrun: with replicated models (one process, DDP) rank 0 writes the layout above and the
other ranks wait. With FSDP2 every rank writes its shards through `torch.distributed.checkpoint`
(ppo.checkpoint_dcp), resumable on any number of ranks.

The second half of this module is the resume state: what `trainer_state` saves besides the weights,
`restore` puts back, and the checks that refuse a resume that would not continue the same run.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ppo import distributed as dist
from ppo import durable
from ppo.state_file import LEGACY_STATE, STATE_JSON, read_state, write_state

STATE_FILE = STATE_JSON
SHARDED_DIR = "dcp"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: incomplete, damaged, or from another run's plan."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a file-size limit, an I/O error)."""


def check_finite(modules: dict[str, torch.nn.Module]) -> None:
    """Refuse to save weights that hold NaN or inf, naming the first bad parameter."""
    for owner, module in modules.items():
        check_finite_tensors(owner, module.state_dict())


def check_finite_tensors(owner: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, param in tensors.items():
        param = param.to_local() if hasattr(param, "to_local") else param  # this rank's shard
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise FloatingPointError(f"{owner} parameter {name!r} holds NaN/inf; not writing a checkpoint")


def save_model_dir(directory: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """`model` as a Hugging Face directory loadable without importing ppo (`state_dict`: its full
    weights when the model itself holds shards)."""
    model.save_pretrained(directory, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_model_dir_main(directory: Path, model, tokenizer) -> None:
    """`save_model_dir` under torchrun: every rank calls (an FSDP2 model's full weights are
    gathered to rank 0's CPU first), rank 0 checks and writes, the others wait."""
    full = dist.full_state_dict(model)
    if dist.is_main():
        if full is None:
            check_finite({"policy": model})
        else:
            check_finite_tensors("policy", full)
            _share_tied(full, model)
        save_model_dir(directory, model, tokenizer, full)
    dist.barrier()


def _share_tied(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Gathered copies of tied weights (embeddings and LM head) become one tensor again, so that
    save_pretrained recognises the tie and writes the weight once, as for an unsharded model."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(param), name)]


CRITIC_WEIGHTS = "critic.safetensors"


def save_critic(directory: Path, critic_module: torch.nn.Module) -> None:
    """A plain critic as a loadable Hugging Face directory; a value head or a LoRA-wrapped critic
    as its full state (what resuming needs)."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(critic_module, "save_pretrained") and not hasattr(critic_module, "peft_config"):
        critic_module.save_pretrained(directory)
    else:
        save_model(critic_module, str(directory / CRITIC_WEIGHTS))


def load_critic_weights(directory: Path, critic_module: torch.nn.Module) -> None:
    if (directory / CRITIC_WEIGHTS).exists():
        load_model(critic_module, str(directory / CRITIC_WEIGHTS))
        return
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=next(critic_module.parameters()).dtype, use_safetensors=True
    )
    critic_module.load_state_dict(loaded.state_dict())


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


def save_checkpoint(
    output_dir: str | Path,
    name: str,
    policy,
    tokenizer,
    critic_module,
    trainer_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Write output_dir/name atomically; return its path. Prunes old step_N beyond total_limit.
    Under torchrun rank 0 writes (the models are replicated) while the other ranks wait.
    `critic_module` None (a critic-free estimator): no critic/ directory."""
    output_dir = Path(output_dir)
    if dist.is_main():
        check_finite({"policy": policy, **({"critic": critic_module} if critic_module is not None else {})})

        def write(tmp: Path) -> None:
            save_model_dir(tmp, policy, tokenizer)
            if critic_module is not None:
                save_critic(tmp / "critic", critic_module)
            write_state(tmp, trainer_state)

        publish_checkpoint(output_dir, name, write, total_limit)
    dist.barrier()
    return output_dir / name


def publish_checkpoint(output_dir: Path, name: str, write, total_limit: int | None, tmp: Path | None = None) -> None:
    """`write(tmp)`, seal (fsync, manifest last), rename to output_dir/name, point `latest` at it,
    prune. A failure (a full disk, a file-size limit) leaves the previous checkpoints as they were
    and raises CheckpointWriteError naming the path and the error."""
    previous, final, published = last_published(output_dir), output_dir / name, False
    try:
        tmp = tmp or fresh_tmp(output_dir, name)
        write(tmp)
        durable.seal(tmp)
        durable.publish(tmp, final)
        published = True
        durable.write_text(output_dir / LATEST, name)
        if total_limit:
            prune_checkpoints(output_dir, total_limit, newest=name)
    except Exception as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if published:
            kept = f"{final} itself is complete"
        else:
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {final}: {type(err).__name__}: {err}; {kept}") from err


def fresh_tmp(output_dir: Path, name: str) -> Path:
    """output_dir/.tmp-name, empty, after removing what earlier crashed saves left behind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    durable.clean_leftovers(output_dir)
    return durable.fresh_tmp(output_dir, name)


# ---- sharded checkpoints (FSDP2): torch.distributed.checkpoint, in ppo.checkpoint_dcp ----


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED_DIR).is_dir()


def export_hf(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """A sharded (DCP) step_N checkpoint as a plain Hugging Face policy directory (see
    ppo.checkpoint_dcp.export_hf)."""
    from ppo.checkpoint_dcp import export_hf as export

    return export(checkpoint, output_dir)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """step_N directories, oldest first."""
    found = [p for p in Path(output_dir).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune_checkpoints(output_dir: Path, keep: int, newest: str | None = None) -> None:
    """Remove all but the `keep` newest step_N up to `newest` (checkpoints numbered after it
    belong to an abandoned continuation, which the resumed run replaces as it goes)."""
    found = list_checkpoints(output_dir)
    if newest is not None and newest[5:].isdigit():
        found = [p for p in found if int(p.name[5:]) <= int(newest[5:])]
    for old in found[:-keep]:
        durable.remove(old)


def last_published(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, else the newest step_N; not verified (for messages)."""
    candidates = _latest_candidates(Path(output_dir))
    return candidates[0] if candidates else None


def _latest_candidates(output_dir: Path) -> list[Path]:
    """Where 'latest' may resume from, best first: the checkpoint the `latest` file names, then
    the older step_N. Later-numbered ones are left out: after resuming from step_2 of a run that
    went further, step_4 of the abandoned continuation is not the newest state."""
    found = list_checkpoints(output_dir)[::-1]
    marker = output_dir / LATEST
    name = marker.read_text(encoding="utf-8").strip() if marker.is_file() else ""
    if name[5:].isdigit() and name.startswith("step_"):
        return [p for p in found if int(p.name[5:]) <= int(name[5:])]
    return ([output_dir / name] if name and (output_dir / name).is_dir() else []) + found


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (a missing or damaged file, named), or None."""
    if path.is_dir() and not (path / durable.MANIFEST).exists() and (path / LEGACY_STATE).exists():
        warnings.warn(
            f"{path} was written by an older ppo-rlhf: it has no {durable.MANIFEST} to check its files against",
            stacklevel=3,
        )
        return None
    return durable.problem(path)


def resolve_checkpoint(output_dir: str | Path, spec: str) -> Path:
    """'latest' (the newest complete checkpoint in output_dir, falling back with a warning past
    incomplete or damaged ones) or a path to a checkpoint directory, which must be complete."""
    if spec != "latest":
        path = Path(spec)
        why = checkpoint_problem(path)
        if why is not None:
            raise CheckpointError(f"cannot resume from {path}: {why}")
        return path
    candidates = _latest_candidates(Path(output_dir))
    if not candidates:
        raise FileNotFoundError(f"resume_from_checkpoint='latest' but {output_dir} has no step_N checkpoint")
    problems = []
    for path in candidates:
        why = checkpoint_problem(path)
        if why is None:
            return path
        problems.append(f"{path.name}: {why}")
        warnings.warn(f"resume: skipping {path}: {why}; trying the previous checkpoint", stacklevel=2)
    raise CheckpointError(
        f"resume_from_checkpoint='latest': no usable checkpoint in {output_dir} ({'; '.join(problems)})"
    )


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, read without running code from it (see ppo.state_file)."""
    return read_state(path)


# ---- resume state: what a checkpoint holds besides the weights, and putting it back ----

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
