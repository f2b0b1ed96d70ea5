"""The trainer state of a checkpoint in files that load without running code.

    trainer_state.safetensors   every tensor (optimizer moments, RNG states), by its path in the state
    trainer_state.json          everything else (steps, data position, KL controller, Python's RNG,
                                optimizer hyper-parameters), tensors as {"__tensor__": path}

Why not `torch.save`: a pickle runs whatever code its author put in it when it is loaded, so a
checkpoint from someone else could take over the machine on resume. JSON and safetensors hold
data only. Tuples and dicts with non-string keys (an optimizer's parameter ids) are spelt out so
that they come back exactly as they were saved.

Checkpoints of older versions hold `trainer_state.pt` (a pickle): it is read with
`torch.load(weights_only=True)`, which refuses anything but plain containers and tensors, and a
file that needs more is refused with a message saying why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that could only be loaded by running code from it."""


def write_state(directory: Path, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    plain = _encode(state, tensors, "")
    seen = set()
    for key, tensor in tensors.items():  # safetensors refuses two names for one memory
        ptr = tensor.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            tensors[key] = tensor.clone()
        seen.add(ptr)
    save_file(tensors, str(Path(directory) / STATE_TENSORS))
    (Path(directory) / STATE_JSON).write_text(json.dumps(plain), encoding="utf-8")


def read_state(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not (directory / STATE_JSON).exists() and (directory / LEGACY_STATE).exists():
        return read_legacy_state(directory / LEGACY_STATE)
    tensors = load_file(str(directory / STATE_TENSORS))
    return _decode(json.loads((directory / STATE_JSON).read_text(encoding="utf-8")), tensors)


def read_legacy_state(path: Path) -> dict[str, Any]:
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - whatever the reason, the file is not loaded
        lines = str(err).strip().splitlines()
        why = f"{type(err).__name__}: {lines[0] if lines else ''}"
        what = (
            "is a pickle that would run code when loaded"
            if isinstance(err, pickle.UnpicklingError)
            else "cannot be read as plain data"
        )
        raise UnsafeCheckpointError(
            f"{path} {what} ({why}); refusing to load it. "
            "Checkpoints written by this version hold trainer_state.json + trainer_state.safetensors "
            "instead; resume from one of those, or start the run again."
        ) from None


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"trainer state at {path or '/'}: dict keys must be str or int, got {list(obj)[:3]}")
        return {"__items__": [[k, _encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state at {path or '/'}: cannot store a {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}
