"""Host-memory behaviour of a CPU run: give freed memory back to the OS.

A PPO iteration allocates and frees hundreds of MiB of activations in every phase (sampling,
scoring, each model's pass of every mini-batch). glibc's malloc keeps freed heap memory resident
for reuse, and fragmentation keeps more of it than the next phase can reuse: on the W2 benchmark
workload the process holds ~600 MiB above its live tensors between passes. `malloc_trim(0)` hands
the free pages back. Called at the phase boundaries (`PPOConfig.host_release_memory`), it lowered
W2's peak RSS from 2078 to 1971-1985 MiB (-5%; the peak itself is inside a pass, where the live
activations are) and the iteration took 9-15% longer, as the next phase faults its pages back in.
So it is off by default, a switch for a run that is short of memory rather than time. (Pinning
malloc's mmap threshold instead, so that every large block is its own mapping, cost +55% time.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Callable


@functools.cache
def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # glibc only: musl and macOS have allocators with other knobs.
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def memory_releaser(enabled: bool, device) -> Callable[[], bool]:
    """What the trainer calls at its phase boundaries: `release_free_memory` for a CPU run that
    asked for it, else a no-op."""
    if enabled and getattr(device, "type", device) == "cpu" and _glibc() is not None:
        return release_free_memory
    return lambda: False
