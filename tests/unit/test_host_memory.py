"""Pinning glibc's mmap threshold: freed large blocks go back to the OS instead of staying resident."""

import subprocess
import sys
from pathlib import Path

import pytest

from ppo.host_memory import _glibc, pin_mmap_threshold

PROBE = r"""
import sys, torch
from ppo.host_memory import pin_mmap_threshold
def rss_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
if sys.argv[1] == "pin":
    assert pin_mmap_threshold(1.0)
a = torch.ones(16 * 2**18); del a  # freeing a 16 MiB mmap block raises glibc's threshold past it
before = rss_mib()
b = torch.ones(8 * 2**18)          # 8 MiB: from the heap unless the threshold is pinned
c = torch.ones(2**16)              # allocated after b, so b is not at the top of the heap
del b
print(round(rss_mib() - before))
"""


def resident_after_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None or not Path("/proc/self/status").exists(), reason="glibc's malloc on Linux")
def test_pinned_threshold_returns_a_freed_block_to_the_os():
    assert resident_after_free("pin") <= 1
    # The probe can fail: with malloc's own dynamic threshold the freed 8 MiB stay resident.
    assert resident_after_free("leave") >= 7


def test_none_leaves_malloc_alone():
    assert pin_mmap_threshold(None) is False
