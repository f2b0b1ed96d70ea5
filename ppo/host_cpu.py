"""Facts about the host CPU, read from Linux's /proc: its vector extensions and how busy it is.

Standard library only, so that it can be imported before torch (the demo decides OpenMP's wait
policy with it, which must be set before torch loads OpenMP). Shared with `benchmarks/machine.py`.
"""

from __future__ import annotations

import os
import platform
import time


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx2, avx512_bf16, amx_bf16, ...); empty where /proc is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9B14", ...), from /proc; else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_busy_s() -> float:
    """CPU seconds the whole machine (all processes) has spent busy, from /proc/stat; NaN without it."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


def others_keep_a_core_busy(seconds: float = 0.25) -> bool:
    """Whether other processes used at least half a core over `seconds` (this one sleeps meanwhile).
    False where /proc/stat is missing."""
    start = machine_busy_s()
    time.sleep(seconds)
    return machine_busy_s() - start >= 0.5 * seconds
