"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) during train(): finish the step in progress,
save a checkpoint, stop with one line saying where it is.

The first signal only sets a flag, read by the loop between steps: the step in progress finishes,
so the weights, optimizers and RNGs are consistent, a checkpoint is written (`save_on_interrupt`)
and train() raises `TrainingInterrupted`. The CLI prints its message as one line and exits with
128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells report a killed command.
A second signal abandons the step at once: no checkpoint of a half-updated model is written, and
the last one on disk (whose writes are atomic) stays the one to resume from.

Under torchrun the launcher signals every rank, not necessarily between the same two steps; the
ranks agree through one all-reduce after each step, so all of them stop after the same step and
take part in the same (collective) checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Self

from ppo import distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """train() stopped by a signal; `exit_code` is what the CLI exits with, str() says where the
    checkpoint to resume from is."""

    def __init__(self, signum: int, abandoned: bool = False):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.abandoned = abandoned  # a second signal: the step in progress was not finished
        self.exit_code = 128 + signum

    def describe(self, message: str) -> TrainingInterrupted:
        self.args = (message,)
        return self


class StopOnSignal:
    """`with StopOnSignal() as stop:` ... `if stop.requested(): ...` between steps. Outside the
    main thread (where Python cannot install handlers) it does nothing and signals act as usual."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise TrainingInterrupted(signum, abandoned=True)
        self.signum = signum
        if dist.is_main():  # os.write: print() could re-enter a write the signal interrupted
            name = signal.Signals(signum).name
            os.write(
                2,
                f"\nppo-rlhf: {name} received: finishing this step, then stopping (send it again to stop at "
                "once)\n".encode(),
            )

    def requested(self) -> int | None:
        """The signal that asked to stop on any rank, or None. Collective under torchrun."""
        if dist.world_size() == 1:
            return self.signum
        asked = [s for s in dist.all_gather_objects(self.signum) if s is not None]
        return asked[0] if asked else None


def exit_on_signals(stage: str, run) -> int:
    """`run()` for a CLI recipe: a TrainingInterrupted, or SIGINT/SIGTERM outside train()'s loop
    (while models load), ends with one line on stderr and exit status 128 + the signal number
    instead of a traceback (SIGINT) or a silent death (SIGTERM)."""
    import sys

    def stop_now(signum, frame):
        raise TrainingInterrupted(signum, abandoned=True)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop_now) if main else None
    try:
        return run()
    except TrainingInterrupted as err:
        print(f"ppo-rlhf {stage}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"ppo-rlhf {stage}: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
