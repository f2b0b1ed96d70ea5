"""The SFT recipe: `ppo-rlhf sft --config sft.yaml key=value ...` (also `python -m ppo.sft`).

    1. the config: YAML + `key=value` overrides (`ppo.config.SFTConfig`)
    2. `train_sft(config)` (`ppo.sft_stage`): output-dir check, model and rows, tokens, optimizer,
       epochs of the completion-only cross-entropy, eval loss, output_dir/final
    3. one line with the final and eval losses; exit status 2 for a config error, 1 for bad data or a
       NaN loss

Under torchrun (`torchrun --nproc_per_node=8 -m ppo.sft ...`) the stage runs data-parallel.
"""

from __future__ import annotations

import sys

from ppo.config import SFTConfig
from ppo.sft_stage import train_sft
from ppo.stage import run_cli


def main(argv: list[str] | None = None) -> int:
    """`ppo-rlhf sft --config sft.yaml key=value ...`; returns the exit code."""
    return run_cli(
        "sft", SFTConfig, train_sft, argv, lambda m: f"final loss {m['final_loss']:.4f}, eval loss {m['eval_loss']}"
    )


if __name__ == "__main__":
    sys.exit(main())
