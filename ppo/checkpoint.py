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

What `trainer_state` holds besides the weights, and putting it back on resume, is in `ppo.resume`.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ppo import distributed as dist
from ppo import durable
from ppo.models import quiet_transformers_bars
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
    with quiet_transformers_bars():
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


def publish_dir(final: Path, write) -> None:
    """`write(tmp)` fills `final`'s sibling `.tmp-<name>`, which is sealed (manifest) and renamed
    into place: an existing `final` is replaced only by a complete one, and a write that fails
    leaves it as it was. Every rank calls (`write` may gather FSDP2 weights); rank 0 publishes."""
    final = Path(final)
    tmp = final.parent / f"{durable.TMP_PREFIX}{final.name}"
    if dist.is_main():
        tmp = durable.fresh_tmp(final.parent, final.name)
    dist.barrier()
    try:
        write(tmp)
        if dist.is_main():
            durable.seal(tmp)
            durable.publish(tmp, final)
    except BaseException:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        with quiet_transformers_bars():
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
