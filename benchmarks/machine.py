"""What machine the numbers came from: CPU, load, CPU time used by others, and its matmul peak.

Standard library and `ppo.host_cpu` only at import time (torch is imported inside `matmul_peak`), so
the benchmark workers can import this module before they pin their thread counts.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

from ppo import host_cpu

cpu_model = host_cpu.cpu_model


def cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16")) -> list[str]:
    """The vector-extension flags that decide the fp32 and bf16 matmul speed."""
    have = host_cpu.cpu_flags()
    return [flag for flag in wanted if flag in have]


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


machine_busy_s = host_cpu.machine_busy_s


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak(dtype_name: str, seconds: float = 2.0) -> dict:
    """Practical matmul GFLOP/s of this process's threads for `dtype_name` ("float32" through
    torch.matmul, i.e. MKL; "float32-onednn"; "bfloat16").

    Like cpu_peak.py: square N^3 products (2N^3 FLOPs) timed back to back; N is the largest of
    512/1024/2048 whose product takes under a tenth of the budget, so a CPU without native bf16
    (tens of times slower) still finishes in about `seconds`. Returns the median and best sample.
    """
    import torch

    if dtype_name == "float32-onednn":  # the kernel `PPOConfig.fp32_matmul=onednn` runs (a @ b.T)
        from ppo.fastpath.onednn_linear import onednn_mm

        dtype = torch.float32

        def product(a, b, out=None):
            return onednn_mm(a, b)
    else:
        dtype = getattr(torch, dtype_name)
        product = torch.matmul
    size = 256
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        product(a, b)  # warm-up (first call allocates and picks a kernel)
        start = time.perf_counter()
        product(a, b)
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
        product(a, b, out=out)
        samples.append(2.0 * size**3 / (time.perf_counter() - start) / 1e9)
    return {
        "dtype": dtype_name,
        "n": size,
        "samples": len(samples),
        "gflops_median": statistics.median(samples),
        "gflops_best": max(samples),
    }
