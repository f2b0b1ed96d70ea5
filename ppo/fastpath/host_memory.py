"""Host-memory behaviour of a CPU run: freed activations go back to the OS instead of staying resident.

A PPO iteration allocates and frees hundreds of MiB of activations in every phase, most of them
tensors of a few MiB. glibc's malloc serves a block that large from its heap once a bigger one was
freed (its mmap threshold rises with every freed mapping, up to 32 MiB), and a heap fragments: on
W4 (SmolLM2-135M) the process peaks ~700 MiB above what the same run reaches when every block of
1 MiB or more is its own mapping, returned to the OS the moment it is freed.

`PPOConfig.host_release_memory` does both things glibc allows: it pins the mmap threshold at 1 MiB
(`mallopt(M_MMAP_THRESHOLD)`, process-wide from the trainer's construction on) and calls
`malloc_trim(0)` at the phase boundaries for what the heap still holds. Measured on W4 in fp32
(docs/performance.md): the update's peak RSS 6,633 -> 5,903 MiB in one iteration (0.60x TRL's
peak in the benchmark), the iteration 13% slower on one thread and 31% on two, as every large
block is mapped and its pages faulted in afresh. So it is off by default: a switch for a run that
is short of memory rather than of time. (malloc_trim alone, at the phase boundaries, lowered W2's
peak by 5% for 9-15% more time.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_blocks(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of `nbytes` or more by its own mapping, returned to the OS when freed
    (process-wide, and it stops glibc raising the threshold); False where the C library is not glibc."""
    libc = _glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, nbytes) == 1


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def memory_releaser(enabled: bool, device) -> Callable[[], bool]:
    """What the trainer calls at its phase boundaries: `release_free_memory` for a CPU run that
    asked for it (large blocks mapped from then on), else a no-op."""
    if enabled and getattr(device, "type", device) == "cpu" and _glibc() is not None:
        map_large_blocks()
        return release_free_memory
    return lambda: False
