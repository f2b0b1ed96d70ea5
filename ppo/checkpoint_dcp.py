"""Sharded checkpoints (FSDP2): every rank writes its shards through `torch.distributed.checkpoint`.

    output_dir/step_N/dcp/               policy, critic and both optimizers, sharded (DCP format)
    output_dir/step_N/config.json, tokenizer files, trainer_state.json/.safetensors (no optimizers)

DCP reshards on load, so such a checkpoint resumes on any number of ranks (one process included),
and `export_hf(step_N, out)` turns it into a plain Hugging Face directory. The directory is sealed
and published like any checkpoint (ppo.checkpoint.publish_checkpoint).

DCP itself reads its `.metadata` with `pickle.load` and its non-tensor entries with
`torch.load(weights_only=False)`: either would run code planted in a checkpoint from someone else.
We read both through `SafeReader` / `SafePlanner`, which accept only DCP's own metadata classes and
plain data.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from ppo import distributed as dist
from ppo import durable
from ppo.checkpoint import (
    SHARDED_DIR,
    check_finite_tensors,
    fresh_tmp,
    publish_checkpoint,
    save_model_dir,
)
from ppo.state_file import UnsafeCheckpointError, write_state

# What DCP's metadata pickles name besides its own classes (torch 2.4-2.13).
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
} | {("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (
            (module, name) in _ALLOWED
            or module == "torch.distributed.checkpoint.metadata"
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise UnsafeCheckpointError(
                f"{self.path}: refusing to load {module}.{name}: DCP metadata never needs it, and loading it "
                "could run code"
            )
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file reader, reading `.metadata` through an allow-list instead of plain pickle."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            unpickler = _MetadataUnpickler(stream)
            unpickler.path = path
            metadata = unpickler.load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with the non-tensor entries read by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import (
                set_element,  # as DefaultLoadPlanner does
            )

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _safe_load(state: dict[str, Any], directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    reader = SafeReader(directory)
    reader.read_metadata()  # raises here: inside dcp.load a refusal would only trigger its fallback
    dcp.load(state, storage_reader=reader, planner=SafePlanner())


def _sharded_state(
    models: dict[str, torch.nn.Module], optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {name: get_model_state_dict(module) for name, module in models.items()}
    state.update(
        {f"optimizer/{name}": get_optimizer_state_dict(module, opt) for name, (module, opt) in optimizers.items()}
    )
    return state


def save_sharded_checkpoint(
    output_dir: str | Path,
    name: str,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
    config_model,
    tokenizer,
    trainer_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Every rank writes its shards of `models` and `optimizers` ({name: (model, optimizer)})
    through DCP; rank 0 adds the model config, tokenizer and trainer_state, then publishes."""
    import torch.distributed.checkpoint as dcp

    output_dir = Path(output_dir)
    bad = [f"{owner}: {err}" for owner, module in models.items() for err in _nonfinite(owner, module)]
    if dist.all_reduce_sum([len(bad)])[0]:  # every rank refuses together
        raise FloatingPointError(
            f"weights hold NaN/inf ({'; '.join(bad) or 'on another rank'}); not writing a checkpoint"
        )
    tmp = output_dir / f"{durable.TMP_PREFIX}{name}"
    if dist.is_main():
        tmp = fresh_tmp(output_dir, name)
    dist.barrier()
    dcp.save(_sharded_state(models, optimizers), checkpoint_id=tmp / SHARDED_DIR)
    dist.barrier()  # every rank's shards are on disk before rank 0 seals the directory
    if dist.is_main():

        def write(tmp: Path) -> None:
            config_model.config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_state(tmp, trainer_state)

        publish_checkpoint(output_dir, name, write, total_limit, tmp=tmp)
    dist.barrier()
    return output_dir / name


def _nonfinite(owner: str, module: torch.nn.Module) -> list[str]:
    try:
        check_finite_tensors(owner, module.state_dict())
    except FloatingPointError as err:
        return [str(err)]
    return []


def load_sharded_checkpoint(
    path: Path, models: dict[str, torch.nn.Module], optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]
) -> None:
    """Load a DCP checkpoint into sharded or plain models on any number of ranks (DCP reshards)."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _sharded_state(models, optimizers)
    _safe_load(state, Path(path) / SHARDED_DIR)
    for name, module in models.items():
        set_model_state_dict(module, state[name])
    for name, (module, opt) in optimizers.items():
        set_optimizer_state_dict(module, opt, state[f"optimizer/{name}"])


def export_hf(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """A sharded (DCP) step_N checkpoint as a plain Hugging Face policy directory, in one process:
    `python -c "from ppo.checkpoint import export_hf; export_hf('out/step_8', 'out/step_8-hf')"`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(checkpoint)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    state = {"policy": model.state_dict()}
    _safe_load(state, checkpoint / SHARDED_DIR)  # loads in place, no process group needed
    save_model_dir(Path(output_dir), model, AutoTokenizer.from_pretrained(checkpoint))
    return Path(output_dir)
