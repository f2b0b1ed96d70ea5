"""What a recipe's config names, loaded: PPO's models and prompts, a reward model, a tokenizer.

Shared by the recipes (`ppo.train`, `ppo.train_reward`) and `create_trainer`, so that no recipe
imports another. The loading itself (paths, GGUF files, the checks that name the file) is
`ppo.models`'; this module turns a config into the objects a trainer takes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ppo import distributed as dist
from ppo.config import ConfigError, PPOConfig
from ppo.rewards.model import check_reward_model
from ppo.stage_configs import RewardConfig


def _dtype(name: str):
    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ConfigError(f"torch_dtype must be float32, bfloat16, float16 or auto; got {name!r}") from None


def load_models(config: PPOConfig) -> dict[str, Any]:
    """Step 3: every model the trainer needs, loaded from the config's paths."""
    from ppo.models import check_vocab_covers, load_causal_lm, load_sequence_classifier, load_tokenizer
    from ppo.rewards import resolve_reward_function

    if not config.model_name_or_path:
        raise ConfigError("no policy: set model_name_or_path (or --model_name)")
    dist.init_from_env(config.dist_timeout_s)  # under torchrun "cuda" is then this rank's GPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _dtype(config.torch_dtype)
    tokenizer = load_tokenizer(config.model_name_or_path)
    models: dict[str, Any] = {
        "model": load_causal_lm(config.model_name_or_path, dtype=dtype).to(device),
        "tokenizer": tokenizer,
        "reward_funcs": [resolve_reward_function(spec) for spec in config.reward_funcs] or None,
    }
    if config.reward_model_path:
        reward_model, reward_tokenizer = load_reward_model(
            RewardConfig(model_name_or_path=config.reward_model_path),
            # PPO has no init_from_policy: a causal LM's fresh head would be an untrained reward
            causal_lm_advice="a reward model is trained first: `ppo-rlhf reward model_name_or_path="
            f"{config.reward_model_path} init_from_policy=true data=PAIRS` makes one (pass its final/ as "
            "reward_model_path); or score with reward_funcs instead",
        )
        models["reward_model"] = reward_model.to(device)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            models["reward_tokenizer"] = reward_tokenizer  # completions are re-tokenized for it
    if config.ref_model_path:
        models["ref_model"] = load_causal_lm(config.ref_model_path, dtype=dtype).to(device)
    if config.value_model_path:
        models["value_model"] = load_sequence_classifier(config.value_model_path, num_labels=1, dtype=dtype).to(device)
        check_vocab_covers(
            models["value_model"], tokenizer, "the value model", config.value_model_path
        )  # it reads the policy's tokens
    return models


def load_prompts(config: PPOConfig, tokenizer) -> list[dict]:
    """Step 4: rows of {prompt, extra columns...} from prompts_file or dataset_name."""
    from ppo.formats import load_prompt_rows

    source = config.prompts_file or config.dataset_name
    if not source:
        raise ConfigError("no prompts: set prompts_file (or --prompts_file) or dataset_name")
    return load_prompt_rows(source, tokenizer, prompt_column=config.prompt_column, skip_bad_rows=config.skip_bad_rows)


def reward_model_from_policy(policy_dir_or_model):
    """An AutoModelForSequenceClassification (num_labels=1) with the causal LM's backbone weights and
    a freshly initialised score head (what other tools call `from_pretrained_policy`).

    A directory or hub name is loaded straight into the classifier (transformers copies the
    backbone and initialises the head); a model object has its backbone state copied.
    """
    from transformers import AutoModelForSequenceClassification

    from ppo.models import load_sequence_classifier

    if isinstance(policy_dir_or_model, (str, Path)):  # a directory, hub name or GGUF file
        return load_sequence_classifier(str(policy_dir_or_model), num_labels=1, dtype=torch.float32)
    policy = policy_dir_or_model
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    body, source = getattr(model, model.base_model_prefix), getattr(policy, policy.base_model_prefix, None)
    if source is None or type(source) is not type(body):
        raise TypeError(
            f"cannot build a reward model from {type(policy).__name__}: its backbone is not a {type(body).__name__}"
        )
    body.load_state_dict(source.state_dict())
    reference = next(policy.parameters())
    return model.to(device=reference.device, dtype=reference.dtype)


def load_reward_model(
    config: RewardConfig,
    model=None,
    tokenizer=None,
    causal_lm_advice: str = "to start a reward model from a causal LM set init_from_policy=true",
):
    """(reward model, tokenizer): the ones given or loaded from `config.model_name_or_path`,
    turned into a fresh-headed classifier with `init_from_policy`, checked to have one label.
    `causal_lm_advice` ends the error for a causal LM given without `init_from_policy`."""
    from ppo.models import check_vocab_covers, load_config, load_sequence_classifier

    path = config.model_name_or_path
    if model is None and not path:
        raise ConfigError("no model: set model_name_or_path=<dir or hub name> or pass model=")
    given = model is not None
    source, tokenizer_source = ("the given model" if given else path), path or getattr(model, "name_or_path", None)
    if config.init_from_policy:
        model = reward_model_from_policy(model if given else path)
    elif not given:
        # Check before loading: transformers would happily load a causal LM into a classifier with a
        # random head, and the user would train from a head they did not mean to reset.
        architectures = load_config(path).architectures or []
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ValueError(
                f"{path} holds a {', '.join(architectures)}, not a sequence classifier with one label; "
                + causal_lm_advice
            )
        model = load_sequence_classifier(path, num_labels=None, dtype=torch.float32)
    if not given:
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    check_reward_model(model, source)
    tokenizer = ready_tokenizer(tokenizer, tokenizer_source, "completions end with one, as PPO samples do")
    check_vocab_covers(model, tokenizer, "the reward model", None if given else path)
    # Standalone users call model(**batch); transformers' pooling needs the pad id for batches.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def ready_tokenizer(tokenizer, source: str | None, why_eos: str):
    """`tokenizer`, else the one loaded from `source`; refused without an EOS token (`why_eos`:
    what the stage needs it for), and given a pad token when it has none (batches are padded)."""
    from ppo.data import ensure_pad_token
    from ppo.models import load_tokenizer

    if tokenizer is None:
        if not source:
            raise ConfigError("no tokenizer: set model_name_or_path= or pass tokenizer=")
        tokenizer = load_tokenizer(source)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer has no EOS token: {why_eos}")
    ensure_pad_token(tokenizer)
    return tokenizer
