"""Host-memory behaviour of a CPU run: give freed activation memory back to the OS.

A PPO update allocates and frees the same few hundred MiB of activations every mini-batch. glibc's
malloc serves a large allocation with its own `mmap` (returned to the OS on free) only until the
first such block is freed: then it raises its mmap threshold to that block's size, and from there on
blocks come from the heap, where fragmentation keeps freed memory resident. Peak RSS of the W2
benchmark workload drifts up by ~20% that way. Pinning the threshold keeps large blocks on `mmap`.
The cost is a page fault and a zeroed page for every fresh block: on W2 (2 threads, threshold 1 MiB)
peak RSS fell 2319 -> 1890 MiB and the iteration took 55% longer. So it is off by default, a
switch (`PPOConfig.host_mmap_threshold_mib`) for a run that is short of memory rather than time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


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
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def pin_mmap_threshold(threshold_mib: float | None) -> bool:
    """Serve host allocations of at least `threshold_mib` MiB with mmap from now on (process-wide).

    None leaves malloc alone. Returns whether the setting took effect (False off glibc)."""
    if threshold_mib is None:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_mib * 2**20)))
