"""What machine the numbers came from: CPU, load, CPU time used by others, and its matmul peak.

Standard library only at import time (torch is imported inside `matmul_peak`), so the benchmark
workers can import this module before they pin their thread counts.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16")) -> list[str]:
    """The vector-extension flags that decide the fp32 and bf16 matmul speed."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in have]
    except OSError:
        pass
    return []


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_busy_s() -> float:
    """CPU seconds the whole machine (all processes) has spent busy, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak(dtype_name: str, seconds: float = 2.0) -> dict:
    """Practical matmul GFLOP/s of this process's threads for `dtype_name` ("float32"/"bfloat16").

    Like cpu_peak.py: square N^3 products (2N^3 FLOPs) timed back to back; N is the largest of
    512/1024/2048 whose product takes under a tenth of the budget, so a CPU without native bf16
    (tens of times slower) still finishes in about `seconds`. Returns the median and best sample.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    size = 256
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up (first call allocates and picks a kernel)
        start = time.perf_counter()
        torch.matmul(a, b)
        elapsed = time.perf_counter() - start
        if size > 256 and elapsed > seconds / 10:
            break
        size = n
        if elapsed > seconds / 40:  # the next size is 8x slower: it would not fit the budget
            break
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    samples, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 3:
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        samples.append(2.0 * size**3 / (time.perf_counter() - start) / 1e9)
    return {"dtype": dtype_name, "n": size, "samples": len(samples), "gflops_median": statistics.median(samples), "gflops_best": max(samples)}
