"""Where one ppo-rlhf iteration's time goes, phase by phase (generate / score / update).

Two instruments, each run on one extra iteration after the measured ones, never on those:
  * `ppo_bench.py --profile DIR` (`profile_step`): torch.profiler, each phase a `phase/<name>`
    range, every operator's self time charged to the phase that encloses it. Shares to read with
    care: the profiler slows short operators far more than long ones.
  * `ppo_bench.py --split-matmul` (`split_step`): timed pieces. Every matrix product, forward and
    backward, is timed by the wall clock around the call (`MatmulClock`); torch's CPU operators are
    synchronous, so the time inside the call is the product's. See benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operators that are one matrix product (plus at most a bias): nn.Linear and the LM head,
# forward and backward, in every path ppo-rlhf takes (torch's own, oneDNN's `_linear_pointwise`,
# the lean decode step's mm/addmm, and under inference mode `linear`/`matmul` themselves).
MATMUL_OPS = frozenset(
    {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation", "mv", "addmv", "dot", "matmul", "linear"}
    | {"_linear_pointwise", "mkldnn_linear", "mkldnn_linear_backward_weights", "mkldnn_linear_backward_input"}
)


def op_kind(name: str) -> str:
    """'matmul', 'attention' (a fused scaled-dot-product kernel: QK^T, softmax and AV, forward or
    backward) or 'other', for an aten operator's name (its overload packet)."""
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or name in ("_flash_attention_forward", "_efficient_attention_forward"):
        return "attention"
    return "other"


@contextlib.contextmanager
def labelled_phases(trainer, enter):
    """Inside: each trainer phase also runs inside `enter(name)` (a context manager), around the
    phase's own timer, so what `enter` does on entry and exit is not in the phase's time."""
    timer, original_phase = trainer.timer, trainer.timer.phase

    @contextlib.contextmanager
    def labelled_phase(name):
        with enter(name), original_phase(name):
            yield

    timer.phase = labelled_phase
    try:
        yield
    finally:
        timer.phase = original_phase


def profile_step(trainer, prompts, out_dir: str, top: int = 15) -> str:
    """Run `trainer.step(prompts)` under the profiler; write DIR/phases.txt, ops.txt and trace.json;
    return the per-phase summary text."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with (
        labelled_phases(trainer, lambda name: record_function(f"phase/{name}")),
        profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof,
    ):
        stats = trainer.step(prompts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    (out / "ops.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60))
    (out / "ops_by_shape.txt").write_text(
        prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=60)
    )
    summary = phase_summary(
        prof.events(), {k[5:-2]: v for k, v in stats.items() if k.startswith("time/") and k.endswith("_s")}, top
    )
    (out / "phases.txt").write_text(summary)
    return summary


def _phase_of(event) -> str | None:
    node = event
    while node is not None:
        if node.name.startswith("phase/"):
            return node.name[len("phase/") :]
        node = node.cpu_parent
    return None


def phase_summary(events, phase_wall_s: dict[str, float], top: int) -> str:
    """Self CPU time per (phase, operator), with each phase's top operators and their share.

    Self time is summed over threads, so a phase on 2 threads can show up to 2x its wall time; the
    share column is relative to the phase's total self time.
    """
    self_us: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for event in events:
        if event.name.startswith("phase/"):
            continue
        phase = _phase_of(event) or "outside"
        self_us[phase][event.name] += event.self_cpu_time_total
        calls[phase][event.name] += 1
    lines = []
    for phase, ops in self_us.items():
        total = sum(ops.values()) or 1.0
        wall = phase_wall_s.get(phase)
        wall_txt = f", wall {wall:.3f} s (under the profiler)" if wall is not None else ""
        lines.append(f"== {phase}: self CPU {total / 1e6:.3f} s{wall_txt}")
        for name, us in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"   {us / 1e6:8.3f} s  {us / total:6.1%}  {calls[phase][name]:7d} calls  {name}")
    return "\n".join(lines)


class MatmulClock(TorchDispatchMode):
    """Sums the wall time spent inside matrix products and fused attention kernels, per phase.

    A dispatch mode sees every aten operator, those autograd runs in backward included, after
    composite operators are split up (and on their own under inference mode): so the timed calls
    are the products themselves, never one inside another. Each timed call includes ~1-3 us of the
    Python detour; every operator, timed or not, pays some 10-30 us more of it outside the timed
    region, which slows the iteration watched (`ops` counts them) but not the timed pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "outside"
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._kinds: dict = {}  # operator -> kind, so each operator is classified once

    @contextlib.contextmanager
    def in_phase(self, name: str):
        outer, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = outer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = self._kinds.get(func)
        if kind is None:
            kind = self._kinds[func] = op_kind(func.overloadpacket.__name__)
        self.calls[self.phase][kind] += 1
        if kind == "other":
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[self.phase][kind] += time.perf_counter() - start
        return out


def split_step(trainer, prompts) -> dict[str, dict]:
    """Run `trainer.step(prompts)` with every matrix product timed. Per phase: this (slower)
    iteration's wall time `timed_phase_s`, `matmul_s` and `attention_s` spent inside the timed
    calls, the calls of each kind and `ops`, all operators. `add_remainder` then sets them against
    the measured iterations' phase times."""
    with MatmulClock():  # the mode's first use imports and builds what it needs: 1-3 s, not in the step
        torch.ones(1).add(1)
    clock = MatmulClock()
    with labelled_phases(trainer, clock.in_phase), clock:
        stats = trainer.step(prompts)
    split = {}
    for phase in ("generate", "score", "update"):
        seconds, calls = clock.seconds[phase], clock.calls[phase]
        split[phase] = {
            "timed_phase_s": stats[f"time/{phase}_s"],
            "matmul_s": seconds["matmul"],
            "attention_s": seconds["attention"],
            "matmul_calls": calls["matmul"],
            "attention_calls": calls["attention"],
            "ops": sum(calls.values()),
        }
    return split


def add_remainder(split: dict[str, dict], phase_s: dict[str, float]) -> dict[str, dict]:
    """`split` with each phase's measured time `phase_s` (the un-instrumented iterations' median)
    and `other_s` = phase_s - matmul_s - attention_s: everything that is not a timed product. On a
    busy machine the instrumented iteration can be the slower one, and `other_s` then negative."""
    for phase, piece in split.items():
        piece["phase_s"] = phase_s[phase]
        piece["other_s"] = phase_s[phase] - piece["matmul_s"] - piece["attention_s"]
    return split
