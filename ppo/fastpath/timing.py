"""Timing two ways of computing the same thing, for the `auto` settings that pick the faster one on
the machine at hand (`fp32_matmul`, `fp32_attention`)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_times(trials: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each trial's best time in seconds over `rounds` rounds, after one warm-up call each (the first
    call builds kernels). The trials alternate within a round, and each keeps its best time, so
    that a moment of machine noise cannot make the faster one look slower."""
    best = dict.fromkeys(trials, float("inf"))
    for trial in trials.values():
        trial()
    for _ in range(rounds):
        for name, trial in trials.items():
            start = time.perf_counter()
            trial()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
