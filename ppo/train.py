"""The PPO recipe: `python -m ppo.train ...` (the same as `ppo-rlhf train ...`).

    python -m ppo.train --model_name out/sft/final --reward_model_path out/reward/final \\
        --prompts_file prompts.txt --learning_rate 1e-6 --batch_size 8 --output_dir out/ppo
    ppo-rlhf train --config configs/qwen3-0.6b-ppo.yaml kl_coef=0.05

Steps:
    1. the config: YAML + overrides (`key=value`, `--key value` or `--key=value`)
    2. refuse an output_dir holding another run or a finished one (unless overwrite or resuming),
       or one of this run's inputs; nothing is removed yet
    3. load the policy, tokenizer, reward model / functions, optional reference and critic
    4. load the prompts (text file, JSONL/CSV/Parquet/..., or a datasets name)
    5. PPOTrainer(...); only then remove the previous run's outputs (overwrite), and train:
       config.yaml, metrics.jsonl, step_N/ checkpoints, final/

Scaling out: the same command under torchrun (`torchrun --nproc_per_node=8 -m ppo.train ...`)
runs data-parallel; `strategy=fsdp` shards the models (docs/scaling.md).
"""

from __future__ import annotations

import sys
from typing import Any

from ppo import distributed as dist
from ppo.config import PPOConfig, save_config
from ppo.run_inputs import load_models, load_prompts
from ppo.stage import PPO_OUTPUTS, check_output_dir, normalise_argv, remove_outputs, run_cli


def run_ppo(config: PPOConfig) -> dict[str, Any]:
    """Steps 2-5; returns a summary for the CLI."""
    from ppo.trainer import PPOTrainer

    dist.init_from_env(config.dist_timeout_s)  # under torchrun; before loading, so "cuda" is this rank's GPU
    out = check_output_dir(config, PPO_OUTPUTS)  # reads only: nothing is removed before the run can start
    models = load_models(config)
    rows = load_prompts(config, models["tokenizer"])
    trainer = PPOTrainer(config=config, **models)
    # Everything loaded and checked: now a new run may replace the previous one's outputs (only
    # those: other files in output_dir stay). A resumed run keeps them.
    dist.barrier()  # every rank has loaded before rank 0 removes anything
    if not config.resume_from_checkpoint and dist.is_main():
        remove_outputs(out, PPO_OUTPUTS)

    # config.yaml once the run has started (after a resume has restored its checkpoint), so a run
    # that fails to resume leaves the previous one's config.yaml as it was.
    def write_config() -> None:
        if dist.is_main():
            save_config(config, out / "config.yaml")

    trainer.on_train_start = [write_config]
    history = trainer.train(rows, num_epochs=config.num_epochs, max_length=config.max_length)
    last = history[-1] if history else {}
    return {
        "steps": trainer.global_step,
        "output_dir": config.output_dir,
        "mean_reward": last.get("mean_reward"),
        "kl": last.get("kl"),
    }


def main(argv: list[str] | None = None) -> int:
    from ppo.interrupt import exit_on_signals

    argv = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    # SIGINT / SIGTERM: one line and exit status 130 / 143, after a checkpoint (ppo.interrupt).
    return exit_on_signals(
        "train",
        lambda: run_cli(
            "train", PPOConfig, run_ppo, argv, lambda m: f"last mean reward {m['mean_reward']}, kl {m['kl']}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
