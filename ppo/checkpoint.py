"""[6] Checkpoints: a plain Hugging Face policy directory plus what an exact resume needs.

    output_dir/step_N/            policy (AutoModelForCausalLM) + tokenizer
    output_dir/step_N/critic/     the critic (a Hugging Face model, or value_head.safetensors)
    output_dir/step_N/trainer_state.pt   optimizers, KL controller, RNG states, data position
    output_dir/latest             the name of the newest complete checkpoint

Each checkpoint is written to a temporary directory and renamed into place, so a crash never
leaves a half-written step_N/. Weights are checked for NaN/inf before anything is written.

Under torchrun: with replicated models (one process, DDP) rank 0 writes the layout above and the
other ranks wait. With FSDP2 every rank writes its shards through `torch.distributed.checkpoint`:

    output_dir/step_N/dcp/               policy, critic and both optimizers, sharded (DCP format)
    output_dir/step_N/config.json, tokenizer files, trainer_state.pt (no optimizers)

DCP reshards on load, so such a checkpoint resumes on any number of ranks (one process included),
and `export_hf(step_N, out)` turns it into a plain Hugging Face directory.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ppo import distributed as dist

STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "dcp"


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

    loaded = AutoModelForSequenceClassification.from_pretrained(directory, dtype=next(critic_module.parameters()).dtype)
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


def save_checkpoint(output_dir: str | Path, name: str, policy, tokenizer, critic_module, trainer_state: dict[str, Any], total_limit: int | None = None) -> Path:
    """Write output_dir/name atomically; return its path. Prunes old step_N beyond total_limit.
    Under torchrun rank 0 writes (the models are replicated) while the other ranks wait.
    `critic_module` None (a critic-free estimator): no critic/ directory."""
    output_dir = Path(output_dir)
    if dist.is_main():
        check_finite({"policy": policy, **({"critic": critic_module} if critic_module is not None else {})})
        tmp = _fresh_tmp(output_dir, name)
        save_model_dir(tmp, policy, tokenizer)
        if critic_module is not None:
            save_critic(tmp / "critic", critic_module)
        torch.save(trainer_state, tmp / STATE_FILE)
        _publish(tmp, output_dir, name, total_limit)
    dist.barrier()
    return output_dir / name


def _fresh_tmp(output_dir: Path, name: str) -> Path:
    tmp = output_dir / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, output_dir: Path, name: str, total_limit: int | None) -> None:
    """Rename a complete tmp dir into place, point `latest` at it, prune old checkpoints."""
    final = output_dir / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (output_dir / "latest.tmp").write_text(name)
    (output_dir / "latest.tmp").rename(output_dir / "latest")
    if total_limit:
        prune_checkpoints(output_dir, total_limit)


# ---- sharded checkpoints (FSDP2): torch.distributed.checkpoint ----


def _sharded_state(models: dict[str, torch.nn.Module], optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {name: get_model_state_dict(module) for name, module in models.items()}
    state.update({f"optimizer/{name}": get_optimizer_state_dict(module, opt) for name, (module, opt) in optimizers.items()})
    return state


def save_sharded_checkpoint(output_dir: str | Path, name: str, models: dict[str, torch.nn.Module], optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
                            config_model, tokenizer, trainer_state: dict[str, Any], total_limit: int | None = None) -> Path:
    """Every rank writes its shards of `models` and `optimizers` ({name: (model, optimizer)})
    through DCP; rank 0 adds the model config, tokenizer and trainer_state, then publishes."""
    import torch.distributed.checkpoint as dcp

    output_dir = Path(output_dir)
    bad = [f"{owner}: {err}" for owner, module in models.items() for err in _nonfinite(owner, module)]
    if dist.all_reduce_sum([len(bad)])[0]:  # every rank refuses together
        raise FloatingPointError(f"weights hold NaN/inf ({'; '.join(bad) or 'on another rank'}); not writing a checkpoint")
    tmp = output_dir / f".tmp-{name}"
    if dist.is_main():
        tmp = _fresh_tmp(output_dir, name)
    dist.barrier()
    dcp.save(_sharded_state(models, optimizers), checkpoint_id=tmp / SHARDED_DIR)
    if dist.is_main():
        config_model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        _publish(tmp, output_dir, name, total_limit)
    dist.barrier()
    return output_dir / name


def _nonfinite(owner: str, module: torch.nn.Module) -> list[str]:
    try:
        check_finite_tensors(owner, module.state_dict())
    except FloatingPointError as err:
        return [str(err)]
    return []


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED_DIR).is_dir()


def load_sharded_checkpoint(path: Path, models: dict[str, torch.nn.Module], optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> None:
    """Load a DCP checkpoint into sharded or plain models on any number of ranks (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(models, optimizers)
    dcp.load(state, checkpoint_id=Path(path) / SHARDED_DIR)
    for name, module in models.items():
        set_model_state_dict(module, state[name])
    for name, (module, opt) in optimizers.items():
        set_optimizer_state_dict(module, opt, state[f"optimizer/{name}"])


def export_hf(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """A sharded (DCP) step_N checkpoint as a plain Hugging Face policy directory, in one process:
    `python -c "from ppo.checkpoint import export_hf; export_hf('out/step_8', 'out/step_8-hf')"`."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(checkpoint)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    state = {"policy": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint / SHARDED_DIR)  # loads in place, no process group needed
    save_model_dir(Path(output_dir), model, AutoTokenizer.from_pretrained(checkpoint))
    return Path(output_dir)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """step_N directories, oldest first."""
    found = [p for p in Path(output_dir).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def resolve_checkpoint(output_dir: str | Path, spec: str) -> Path:
    """'latest' (the newest step_N in output_dir) or a path to a checkpoint directory."""
    if spec == "latest":
        marker = Path(output_dir) / "latest"
        if marker.exists() and (Path(output_dir) / marker.read_text().strip()).is_dir():
            return Path(output_dir) / marker.read_text().strip()
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint='latest' but {output_dir} has no step_N checkpoint")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{spec} is not a checkpoint directory (no {STATE_FILE})")
    return path


def load_trainer_state(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG tuples and optimizer dicts that we wrote ourselves.
    return torch.load(path / STATE_FILE, weights_only=False)
