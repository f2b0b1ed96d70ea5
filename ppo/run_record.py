"""output_dir/run.json: what a run (PPO, SFT, reward model, eval) ran on, and what its `auto`
settings resolved to there.

`precision: auto`, `fp32_matmul: auto`, `fp32_attention: auto` and `compile_layers: auto` each
decide on the machine at hand (the CPU's bf16 support and matrix unit, a timing of two kernels),
and the fast paths turn themselves off for releases or architectures they do not know. Two runs
of the same config can therefore compute in different precisions or kernels on two machines. The
config file cannot say which; this record does: one entry per start of the run (a resumed run
adds its own, which may be another machine), with the library versions, the device and CPU, the
thread and rank counts, each `auto` setting as asked and as resolved, the models' attention
implementations and the fast-path gate's verdicts. Written by rank 0 only, before the first step
of each start, and completed after it (PPO) or after training (SFT, reward model): some fast
paths are decided at their first use.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

from ppo import distributed as dist
from ppo import durable
from ppo.fastpath.fp32_attention import implementation
from ppo.fastpath.gate import verdicts
from ppo.host_cpu import cpu_flags, cpu_model

RUN_RECORD = "run.json"
PACKAGES = ("ppo-rlhf", "torch", "transformers", "tokenizers", "accelerate", "peft", "datasets")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def what_ran(
    config,
    device: torch.device,
    precision: str,
    models: dict,
    step: int = 0,
    fp32_kernel: str = "mkl",
    compiles_layers: bool = False,
) -> dict[str, Any]:
    """A start's record (see the module's docstring). `models`: name -> model (None: not in the run);
    `fp32_kernel`: the fp32 linear kernel on a CPU (the stages and eval keep torch's, MKL);
    `compiles_layers`: whether the decoder layers run compiled (PPO's `compile_layers`)."""
    flags = cpu_flags()
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step": step,
        "versions": {"python": platform.python_version(), **_versions()},
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": {"model": cpu_model(), "bf16": [f for f in BF16_FLAGS if f in flags], "avx2": "avx2" in flags},
        "threads": torch.get_num_threads(),
        "world_size": dist.world_size(),
        "precision": {"asked": getattr(config, "precision", None), "ran": precision},
        "fp32_matmul": {
            "asked": getattr(config, "fp32_matmul", None),
            "ran": fp32_kernel if device.type == "cpu" else None,  # an accelerator has its own kernels
        },
        "fp32_attention": {"asked": getattr(config, "fp32_attention", "auto")},
        "compile_layers": {"asked": getattr(config, "compile_layers", False), "ran": compiles_layers},
        # transformers' attention implementation of each model: sdpa (torch's kernel for the autocast
        # dtype), ppo_fp32_sdpa (fp32 kernel), ppo_fp32_decode_sdpa (fp32 while sampling only).
        "attention": {name: implementation(model) for name, model in models.items() if model is not None},
        "fast_paths": verdicts(),
    }


def ppo_run(trainer) -> dict[str, Any]:
    """The record of a PPO trainer's start."""
    models = {
        "policy": trainer.policy,
        "reference": trainer.ref_model,
        "critic": trainer.critic.module if trainer.critic is not None else None,
        "reward_model": trainer.rewards.reward_model,
    }
    return what_ran(
        trainer.config,
        trainer.device,
        trainer.precision,
        models,
        trainer.global_step,
        trainer.fp32_kernel,
        trainer.compiles_layers,
    )


def record_start(output_dir: str | Path, record: dict[str, Any]) -> None:
    """Append a start's record to `output_dir`/run.json (rank 0); a start from step 0 begins the
    file afresh. The file is replaced whole (`durable.write_text`), so that an interrupted write
    cannot leave half a JSON document."""
    if not dist.is_main():
        return
    path = Path(output_dir) / RUN_RECORD
    starts = []
    if record["step"] > 0 and path.is_file():  # a resumed run keeps the earlier starts
        try:
            starts = json.loads(path.read_text(encoding="utf-8"))["starts"]
        except (ValueError, KeyError, TypeError):
            starts = []  # unreadable: this start's record is still worth keeping
    starts.append(record)
    _write(path, starts)


def complete_start(output_dir: str | Path) -> None:
    """After a start's first step (PPO) or its training (SFT, reward model): the fast-path verdicts
    again, now that every fast path has been asked for (some are decided at their first use)."""
    if not dist.is_main():
        return
    path = Path(output_dir) / RUN_RECORD
    try:
        starts = json.loads(path.read_text(encoding="utf-8"))["starts"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # record_start could not write it: nothing to complete
    starts[-1]["fast_paths"] = verdicts()
    try:
        _write(path, starts)
    except OSError as err:  # a record is not worth stopping a run that has started: it keeps its start's
        warnings.warn(f"could not complete {path} with the fast paths' verdicts: {err}", stacklevel=2)


def _write(path: Path, starts: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_text(path, json.dumps({"starts": starts}, indent=1))
