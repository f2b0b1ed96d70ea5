"""Scaling out with torchrun: the process group, rank helpers, DDP / FSDP2 wrapping, collectives.

One process is the default and needs nothing: with no process group every helper here is a no-op
(`wrap` returns the module, a gather returns its input, a mean-reduce returns the values), so the
recipes and `ppo.update` are the same code on 1 or N ranks. Under `torchrun` (RANK, WORLD_SIZE,
LOCAL_RANK in the environment) `init_from_env` joins the group: NCCL on CUDA, gloo on CPU.

Failure behaviour: every collective has a timeout (`dist_timeout_s`, default 30 min). When a rank
raises, its process exits; the other ranks fail at their next collective - at once when the
backend sees the peer's connection close (gloo), or when the timeout expires (a rank that hangs;
NCCL's watchdog then aborts the process). `report_failures` prints which rank failed and why on
each rank, and torchrun stops the remaining workers and exits non-zero: a crash never hangs.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEFAULT_TIMEOUT_S = 1800.0
STRATEGIES = ("ddp", "fsdp")
_timeout_s = DEFAULT_TIMEOUT_S


# ---- process group and ranks ----


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes in the environment; True when distributed.

    Idempotent, and a no-op (False) for one process, torchrun --nproc_per_node=1 included.
    On CUDA each process takes GPU LOCAL_RANK, so that "cuda" means its own device afterwards.
    """
    global _timeout_s
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    _timeout_s = float(timeout_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=_timeout_s))
    return True


def teardown() -> None:
    """Leave the process group and free it (end of a recipe); a no-op without one.

    Call it at the end of a script that trains under torchrun, after the last collective: the
    recipes and the CLI do. It is not for the failure path: a rank that raised just exits.
    """
    if _initialized():
        dist.destroy_process_group()
        _release_mesh_groups()


def _release_mesh_groups() -> None:
    """Drop the process groups that FSDP2's device meshes still hold after destroy_process_group.

    Why: DTensor's sharding caches keep every DeviceMesh alive, and each mesh keeps its process
    groups in `_pg_registry` (torch 2.13-2.15), so a gloo group outlived destroy_process_group and its
    worker threads ran into interpreter shutdown, where about one 2-rank CPU run in 15 under load
    aborted ("terminate called without an active exception", SIGABRT) after finishing its work.
    Emptying the registries of the destroyed groups lets the group be freed (threads joined) here.
    Reads a torch internal: where the attribute is missing or not a dict, nothing is done and the
    group lives until exit, as in stock torch.
    """
    import gc

    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:
        return
    for obj in gc.get_objects():
        # The class's MRO, not isinstance: an isinstance hook would run on every object in the heap
        # (torch's opaque-type check touched deprecated module attributes, which then warned).
        registry = getattr(obj, "_pg_registry", None) if DeviceMesh in type(obj).__mro__ else None
        if isinstance(registry, dict):
            registry.clear()  # every group is destroyed by now: the mesh is unusable either way
    gc.collect()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs, prints and writes single-writer files."""
    return rank() == 0


def barrier() -> None:
    if _initialized():
        dist.barrier()


def device() -> torch.device:
    """Where collective buffers live: the current GPU under NCCL, else the CPU."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_slice(n: int) -> slice:
    """This rank's contiguous share of n rows: [r*n/N, (r+1)*n/N). Rank order is row order."""
    r, size = rank(), world_size()
    return slice(r * n // size, (r + 1) * n // size)


@contextlib.contextmanager
def report_failures(what: str):
    """Name the rank in the error of a failing run: either its own exception, or the collective
    that broke because another rank failed (whose own error is printed by that rank)."""
    try:
        yield
    except Exception as err:
        if world_size() > 1 and not getattr(err, "_ppo_rank_reported", False):
            err._ppo_rank_reported = True  # nested guards print once
            if (
                isinstance(err, getattr(dist, "DistBackendError", ()))
                or "gloo" in str(err).lower()
                or "timed out" in str(err).lower()
            ):
                why = (
                    "lost the other ranks (another rank failed, or none answered within "
                    f"dist_timeout_s={_timeout_s:g}s): {err}"
                )
            else:
                why = f"{type(err).__name__}: {err} - the other ranks stop at their next collective"
            print(f"ppo-rlhf: rank {rank()} of {world_size()}: {what} failed: {why}", file=sys.stderr, flush=True)
        raise


# ---- wrapping models ----


class ForwardAs(nn.Module):
    """`fn(*args)` as the forward of a module owning `module`, so that DDP and FSDP2 see a call that
    does not go through `module.forward` (a critic read at every token, a reward model's pooled
    score): their hooks run on the wrapper's forward, and gradients of `module` are synchronised."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        # FSDP2 hooks a module's output for its backward; a view of a temporary would lose the hook
        # on an in-place op, so hand back a tensor of its own (values are [B, R]: a small copy).
        return out.clone() if isinstance(out, Tensor) and out._is_view() else out


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def wrap(module: nn.Module, strategy: str = "ddp") -> nn.Module:
    """A trained model ready for data parallelism: DDP (gradients all-reduced), or FSDP2
    (`fully_shard` on every transformer layer, then the root; the module is sharded in place).
    One process: `module` itself."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if world_size() == 1:
        return module
    if strategy == "fsdp":
        return _fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if device().type == "cuda" else None
    # No buffer broadcast in forward: buffers (rotary tables) are constants, and a collective in
    # every forward would deadlock sampling loops of different lengths per rank. (The argument
    # was renamed in torch 2.13.)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, **no_sync)


def wrap_frozen(module: nn.Module, strategy: str) -> nn.Module:
    """An inference-only model (reference): sharded under FSDP2, replicated otherwise."""
    return _fully_shard(module) if strategy == "fsdp" and world_size() > 1 else module


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _fully_shard(module: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # Every rank must start from the same weights (DDP broadcasts them; fully_shard does not).
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
    layer_names = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    for sub in [m for m in module.modules() if type(m).__name__ in layer_names]:
        fully_shard(sub, reshard_after_forward=True)
    fully_shard(module, reshard_after_forward=False)  # the root is needed again right away
    # Gather once outside inference mode: FSDP keeps the unsharded buffers it allocates first, and
    # buffers born under torch.inference_mode could not be used for training afterwards.
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    with torch.no_grad():
        for unit in units:
            unit.unshard()
        for unit in units:
            unit.reshard()
    return module


@contextlib.contextmanager
def full_weights(module: nn.Module):
    """FSDP2: keep every layer unsharded while inside (sampling). Ranks run sampling loops of
    different lengths, so forwards there must not all-gather; one gather up front, none after."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    module.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        module.set_reshard_after_forward(True)
        module.set_reshard_after_forward(False, recurse=False)


@contextlib.contextmanager
def gradient_sync(modules: Iterable[nn.Module], enabled: bool):
    """Synchronise gradients in the backward inside (enabled) or accumulate them locally (DDP's
    `no_sync`, FSDP2's `set_requires_gradient_sync(False)`): sync on the last micro-batch only."""
    with contextlib.ExitStack() as stack:
        for module in modules:
            if isinstance(module, nn.parallel.DistributedDataParallel) and not enabled:
                stack.enter_context(module.no_sync())
            elif is_sharded(module):
                module.set_requires_gradient_sync(enabled)
                stack.callback(module.set_requires_gradient_sync, True)
        yield


def clip_grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    """`clip_grad_norm_` returning a plain 0-d tensor (FSDP2 gives a DTensor: the global norm).

    On a CPU the gradients are rescaled only when their norm exceeds `max_norm`: torch multiplies
    every gradient by min(1, max_norm / norm) even when that is exactly 1.0, a pass over all of
    them (W2's policy: ~10 ms of a 21 ms clip; SmolLM2-135M ~4x that, 16 clips an iteration). The
    result is the same bits: x * 1.0 == x. A non-finite norm still rescales, as torch does. On
    GPUs (the comparison would wait for the device), sharded models and torch < 2.6, torch's own
    call."""
    grads = [p.grad for p in params if p.grad is not None]
    own_call = not hasattr(torch.nn.utils, "get_total_norm")  # torch < 2.6
    if own_call or not grads or grads[0].device.type != "cpu" or any(hasattr(g, "full_tensor") for g in grads):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    norm = torch.nn.utils.get_total_norm(grads)
    if not bool(norm <= max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def full_state_dict(module: nn.Module) -> dict[str, Tensor] | None:
    """The full weights of an FSDP2 model gathered to rank 0's CPU (a collective: every rank calls;
    the others get {}). None for a model that is not sharded: save its own state_dict."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- collectives on data ----


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] (pickled; for small things such as texts and counts)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(x: Tensor, pad_value: float = 0, left: bool = False) -> Tensor:
    """Every rank's `x` concatenated along dim 0, in rank order. Other dims may differ per rank and
    are padded to the largest with `pad_value`, at the end (or the start with `left`)."""
    if world_size() == 1:
        return x
    if x.dtype == torch.bool:
        return all_gather_rows(x.to(torch.uint8), int(pad_value), left).bool()
    shape = torch.tensor(x.shape, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    big = torch.stack(shapes).amax(dim=0).tolist()
    pads: list[int] = []
    for dim in reversed(range(x.dim())):  # F.pad lists (before, after) from the last dim back
        extra = big[dim] - x.shape[dim]
        pads += [0, extra] if dim == 0 or not left else [extra, 0]
    parts = [torch.empty(big, dtype=x.dtype, device=x.device) for _ in range(world_size())]
    dist.all_gather(parts, torch.nn.functional.pad(x, pads, value=pad_value))
    return torch.cat([part[: int(s[0])] for part, s in zip(parts, shapes)])


def all_reduce_sum(values: list[float] | Tensor) -> list[float]:
    """Element-wise sums over ranks of a short list of numbers."""
    tensor = torch.as_tensor(values, dtype=torch.float64).to(device())
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_mean(stats: dict[str, float | Tensor]) -> dict[str, float]:
    """The mean over ranks of each statistic (every rank holds the same keys): one all-reduce.
    Equal shares per rank make this the mean over the global batch."""
    keys = sorted(stats)
    values = (
        torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).detach().cpu() for k in keys])
        if keys
        else torch.zeros(0)
    )
    if world_size() > 1:
        values = values.to(device())
        dist.all_reduce(values)
        values = values / world_size()
    return dict(zip(keys, values.tolist()))
