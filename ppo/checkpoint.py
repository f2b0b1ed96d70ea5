"""[6] Checkpoints: a plain Hugging Face policy directory plus what an exact resume needs.

    output_dir/step_N/            policy (AutoModelForCausalLM) + tokenizer
    output_dir/step_N/critic/     the critic (a Hugging Face model, or value_head.safetensors)
    output_dir/step_N/trainer_state.pt   optimizers, KL controller, RNG states, data position
    output_dir/latest             the name of the newest complete checkpoint

Each checkpoint is written to a temporary directory and renamed into place, so a crash never
leaves a half-written step_N/. Weights are checked for NaN/inf before anything is written.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

STATE_FILE = "trainer_state.pt"


def check_finite(modules: dict[str, torch.nn.Module]) -> None:
    """Refuse to save weights that hold NaN or inf, naming the first bad parameter."""
    for owner, module in modules.items():
        for name, param in module.state_dict().items():
            if param.is_floating_point() and not torch.isfinite(param).all():
                raise FloatingPointError(f"{owner} parameter {name!r} holds NaN/inf; not writing a checkpoint")


def save_model_dir(directory: Path, model, tokenizer) -> None:
    """`model` as a Hugging Face directory loadable without importing ppo."""
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


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
    """Write output_dir/name atomically; return its path. Prunes old step_N beyond total_limit."""
    check_finite({"policy": policy, "critic": critic_module})
    output_dir = Path(output_dir)
    final = output_dir / name
    tmp = output_dir / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_dir(tmp, policy, tokenizer)
    save_critic(tmp / "critic", critic_module)
    torch.save(trainer_state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (output_dir / "latest.tmp").write_text(name)
    (output_dir / "latest.tmp").rename(output_dir / "latest")
    if total_limit:
        prune_checkpoints(output_dir, total_limit)
    return final


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
