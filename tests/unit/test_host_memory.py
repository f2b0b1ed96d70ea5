"""Releasing freed heap memory to the OS (glibc's malloc_trim at the trainer's phase boundaries, and
large blocks as their own mappings)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppo.fastpath import host_memory
from ppo.fastpath.host_memory import _glibc, memory_releaser, release_free_memory

PROBE = r"""
import sys, torch
from ppo.fastpath.host_memory import map_large_blocks, release_free_memory
if sys.argv[1] == "map":
    assert map_large_blocks()
def rss_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
a = torch.ones(16 * 2**18); del a  # freeing a 16 MiB mmap block raises glibc's threshold past it
before = rss_mib()
b = torch.ones(8 * 2**18)          # 8 MiB, now from the heap
c = torch.ones(2**16)              # allocated after b, so b is not at the top of the heap
del b
kept = rss_mib() - before
if sys.argv[1] == "release":
    assert release_free_memory()
print(round(kept), round(rss_mib() - before))
"""


def resident_after_free(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    kept, after = out.stdout.split()[-2:]
    return int(kept), int(after)


@pytest.mark.skipif(_glibc() is None or not Path("/proc/self/status").exists(), reason="glibc's malloc on Linux")
def test_release_returns_a_freed_heap_block_to_the_os():
    kept, after = resident_after_free("release")
    assert kept >= 7  # malloc kept the freed 8 MiB resident...
    assert after <= 1  # ...until it was released
    kept, after = resident_after_free("keep")
    assert kept >= 7 and after >= 7


@pytest.mark.skipif(_glibc() is None or not Path("/proc/self/status").exists(), reason="glibc's malloc on Linux")
def test_mapped_large_blocks_leave_at_once():
    kept, after = resident_after_free("map")
    assert kept <= 1 and after <= 1  # the 8 MiB block was its own mapping: unmapped when freed


def test_releaser_is_a_no_op_unless_asked_for_on_a_cpu(monkeypatch):
    assert memory_releaser(False, torch.device("cpu"))() is False
    assert memory_releaser(True, torch.device("meta"))() is False
    if _glibc() is not None:
        with monkeypatch.context() as patch:  # mapping large blocks is process-wide: not in the test process
            pinned = []
            patch.setattr(host_memory, "map_large_blocks", lambda: pinned.append(1) or True)
            assert memory_releaser(True, torch.device("cpu")) is release_free_memory
            assert pinned == [1]
