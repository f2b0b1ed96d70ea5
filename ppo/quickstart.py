"""`create_trainer`: one call from names and paths to a ready PPOTrainer and its prompts.

trainer, prompts = create_trainer(
    model_name="out/sft/final", dataset_name="prompts.jsonl",
    reward_functions=["final_number"], learning_rate=1e-6, batch_size=8)
trainer.train(prompts)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def create_trainer(
    model_name: str,
    dataset_name: str | None = None,
    reward_model_name: str | None = None,
    reward_functions: Sequence[str | Callable] | None = None,
    reward_function_weights: Sequence[float] | None = None,
    **config: Any,
):
    """Load the policy (and reward model), resolve reward functions by name, load the prompts.

    `reward_function_weights` weighs the reward model first (when given), then each function.
    Every other keyword is a PPOConfig field; a misspelt one fails with a close-match hint.
    Returns `(trainer, prompt_rows)`; prompt_rows is None without a dataset.
    """
    from ppo.config import PPOConfig, build_config
    from ppo.rewards import resolve_reward_function
    from ppo.run_inputs import load_models, load_prompts
    from ppo.trainer import PPOTrainer

    if reward_model_name is None and not reward_functions:
        raise ValueError("create_trainer needs reward_model_name and/or reward_functions")
    names = [f for f in reward_functions or [] if isinstance(f, str)]
    values = {**config, "model_name_or_path": model_name, "reward_model_path": reward_model_name, "reward_funcs": names}
    if dataset_name is not None:
        values["dataset_name"] = dataset_name
    if reward_function_weights is not None:
        values["reward_weights"] = list(reward_function_weights)
    cfg: PPOConfig = build_config(PPOConfig, values, source="create_trainer")
    models = load_models(cfg)
    # Callables keep their place in the list, so weights line up with what the user wrote.
    models["reward_funcs"] = [resolve_reward_function(f) for f in reward_functions or []] or None
    trainer = PPOTrainer(config=cfg, **models)
    prompts = load_prompts(cfg, models["tokenizer"]) if dataset_name is not None else None
    return trainer, prompts
