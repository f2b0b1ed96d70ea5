"""The reward-model recipe: `ppo-rlhf reward --config reward.yaml key=value ...` (also
`python -m ppo.train_reward`).

    1. the config: YAML + `key=value` overrides (`ppo.config.RewardConfig`)
    2. `train_reward_model(config)` (`ppo.reward_stage`): output-dir check, model and pairs, tokens,
       optimizer, accuracy before, epochs of the Bradley–Terry loss, accuracy after, output_dir/final
    3. one line with the held-out accuracy before and after; exit status 2 for a config error, 1 for
       bad data or a NaN loss

Under torchrun (`torchrun --nproc_per_node=8 -m ppo.train_reward ...`) the stage runs data-parallel.
"""

from __future__ import annotations

import sys

from ppo.config import RewardConfig
from ppo.reward_stage import train_reward_model
from ppo.stage import run_cli


def main(argv: list[str] | None = None) -> int:
    """`ppo-rlhf reward --config reward.yaml key=value ...`; returns the exit code."""
    return run_cli(
        "reward",
        RewardConfig,
        train_reward_model,
        argv,
        lambda m: f"held-out accuracy {m['accuracy_before']} -> {m['accuracy']}",
    )


if __name__ == "__main__":
    sys.exit(main())
