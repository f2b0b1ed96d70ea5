"""Profile one ppo-rlhf iteration with torch.profiler and attribute operator time to its phases.

Used by `ppo_bench.py --profile DIR`. Each trainer phase (generate / score / update) is wrapped in a
`phase/<name>` profiler range; every operator's self time is charged to the phase that encloses it,
so the report says e.g. how much of the update is backward matmuls versus the optimizer.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path


def profile_step(trainer, prompts, out_dir: str, top: int = 15) -> str:
    """Run `trainer.step(prompts)` under the profiler; write DIR/phases.txt, ops.txt and trace.json;
    return the per-phase summary text."""
    from torch.profiler import ProfilerActivity, profile, record_function

    timer, original_phase = trainer.timer, trainer.timer.phase

    @contextlib.contextmanager
    def labelled_phase(name):
        with record_function(f"phase/{name}"), original_phase(name):
            yield

    timer.phase = labelled_phase
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            stats = trainer.step(prompts)
    finally:
        timer.phase = original_phase
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
