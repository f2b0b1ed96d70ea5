"""Metrics: one JSON line per step always, optional TensorBoard / W&B, phase timers."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ppo import distributed as dist


class PhaseTimer:
    """Wall-clock seconds per named phase, per step and in total."""

    def __init__(self) -> None:
        self.step: dict[str, float] = {}
        self.total: dict[str, float] = defaultdict(float)
        self.tokens: dict[str, int] = defaultdict(int)
        self.steps = 0

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.step[name] = self.step.get(name, 0.0) + elapsed
            self.total[name] += elapsed

    def finish_step(self, tokens: dict[str, int]) -> dict[str, float]:
        """Time and tokens/s per phase of the step that just ended, as metrics."""
        out = {}
        for name, seconds in self.step.items():
            out[f"time/{name}_s"] = seconds
            if name in tokens and seconds > 0:
                out[f"time/{name}_tokens_per_s"] = tokens[name] / seconds
                self.tokens[name] += tokens[name]
        self.step = {}
        self.steps += 1
        return out

    def table(self) -> str:
        """A plain-text table of the phases over all steps (printed at the end of train())."""
        total = sum(self.total.values()) or 1.0
        lines = [f"{'phase':<10} {'total s':>9} {'s/step':>8} {'share':>6} {'tokens/s':>10}"]
        for name, seconds in self.total.items():
            per_step = seconds / max(self.steps, 1)
            rate = self.tokens[name] / seconds if seconds > 0 and self.tokens[name] else float("nan")
            lines.append(f"{name:<10} {seconds:>9.2f} {per_step:>8.3f} {seconds / total:>6.0%} {rate:>10.0f}")
        return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """metrics.jsonl in the output directory, plus TensorBoard / W&B when named in `report_to`."""

    def __init__(self, output_dir: str | Path, report_to: list[str] | None = None, config: dict | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.backends = []
        for name in report_to or []:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # optional dependency

                self.backends.append(("tensorboard", SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))))
            elif name == "wandb":
                import wandb  # optional dependency

                wandb.init(config=config or {})
                self.backends.append(("wandb", wandb))
            elif name not in ("none", "jsonl"):
                raise ValueError(f"report_to: unknown backend {name!r} (choose tensorboard, wandb or none)")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in scalars.items()}}) + "\n")
        for kind, backend in self.backends:
            if kind == "tensorboard":
                for key, value in scalars.items():
                    backend.add_scalar(key, value, step)
            else:
                backend.log(scalars, step=step)

    def close(self) -> None:
        for kind, backend in self.backends:
            if kind == "tensorboard":
                backend.close()
            else:
                backend.finish()


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def main_logger(out: Path, report_to: list[str] | None = None):
    """metrics.jsonl (and TensorBoard / W&B) on rank 0; a NullLogger on the other ranks."""
    return MetricsLogger(out, report_to) if dist.is_main() else NullLogger()
