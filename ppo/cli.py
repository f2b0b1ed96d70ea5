"""`ppo-rlhf <stage> ...`: one subcommand per recipe, each with its own `main(argv)`.

    ppo-rlhf demo                       the whole pipeline on a built-in task, on a laptop CPU
    ppo-rlhf sft    --config sft.yaml   supervised fine-tuning
    ppo-rlhf reward --config rm.yaml    reward model on preference pairs (Bradley-Terry)
    ppo-rlhf train  --config ppo.yaml   PPO (also `python -m ppo.train`)
    ppo-rlhf eval   --config eval.yaml  reward, KL, perplexity and accuracy of a model

Every stage takes `--config FILE` and `key=value` overrides; `ppo-rlhf <stage> --help` lists keys.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "demo": ("ppo.demo.run", "run SFT -> reward model -> PPO -> evaluation on a built-in task"),
    "sft": ("ppo.sft", "supervised fine-tuning on prompt/completion pairs"),
    "reward": ("ppo.train_reward", "train a reward model on preference pairs"),
    "train": ("ppo.train", "PPO against a reward model and/or reward functions"),
    "eval": ("ppo.evaluate", "evaluate a model: reward, KL, perplexity, accuracy"),
}


def usage() -> str:
    lines = ["usage: ppo-rlhf <stage> [--config FILE] [key=value ...]", "", "stages:"]
    lines += [f"  {name:<7} {text}" for name, (_, text) in STAGES.items()]
    return "\n".join(lines)


def unknown_stage_message(argv: list[str]) -> str:
    """Which word was taken for the stage, why it is not one, and the likely fix."""
    import difflib

    stage = argv[0]
    message = f"ppo-rlhf: unknown stage {stage!r}: the first word must be one of {', '.join(STAGES)}."
    later = [word for word in argv[1:] if word in STAGES]
    if later:  # `ppo-rlhf --config x.yaml train`
        return f"{message} Put the stage first: ppo-rlhf {later[0]} {' '.join(w for w in argv if w != later[0])}"
    close = difflib.get_close_matches(stage.lower(), STAGES, n=1, cutoff=0.5)
    return f"{message} Did you mean {close[0]!r}?" if close else message


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ppo import __version__

        print(f"ppo-rlhf {__version__}")
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"{unknown_stage_message(argv)}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
