"""Building the models of a run: frozen reference, critic, LoRA, frozen weights in bf16. Nothing algorithmic."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from transformers import AutoModelForSequenceClassification

from ppo import distributed as dist
from ppo.critic import SeparateCritic, SharedCritic
from ppo.fastpath import fp32_attention, fused_mlp, fused_norm
from ppo.fastpath.bf16_weights import hold_in_bf16


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Inference only: no gradients, no optimizer state, dropout off."""
    model.requires_grad_(False)
    return model.eval()


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def reference_context(policy, ref_model):
    """(model, context) that computes reference log-probs.

    With LoRA and no explicit reference, the reference is the policy with its adapter disabled:
    the same weights, no second copy in memory."""
    if ref_model is not None:
        return ref_model, contextlib.nullcontext()
    if is_peft_model(policy):
        return policy, policy.disable_adapter()
    raise ValueError("no reference model")


def apply_lora(model, config, task: str = "causal"):
    """Wrap `model` with a peft LoRA adapter from the config's lora_* fields (a LoraConfig may be
    passed instead). The base weights stay frozen; only the adapter (and a critic's head) train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'ppo-rlhf[peft]'") from None
    if is_peft_model(model):
        return model
    if isinstance(config, LoraConfig):
        lora = config
    else:
        targets = config.lora_target_modules
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else list(targets),
            # A critic's value head is new: it trains in full and is saved with the adapter.
            modules_to_save=["score"] if task == "critic" else None,
        )
    return get_peft_model(model, lora)


def unwrap_peft(model):
    """The Hugging Face model inside a peft wrapper (adapters stay injected and active)."""
    return model.get_base_model() if is_peft_model(model) else model


def default_reference(policy, ref_model):
    """The given reference, None for a LoRA policy (adapter disabled instead), else a frozen copy."""
    if ref_model is not None:
        return freeze(ref_model)
    if is_peft_model(policy):
        return None
    return freeze(copy.deepcopy(policy))


def hold_frozen_in_bf16(models, precision: str, strategy: str, world_size: int) -> int:
    """Under bf16 autocast, the frozen `models`' linear weights in bf16 (`ppo.fastpath.bf16_weights`:
    the same numbers, no cast per forward); returns how many layers changed."""
    if not frozen_bf16_allowed(precision, strategy, world_size):
        return 0
    return sum(hold_in_bf16(model) for model in models if model is not None)


def frozen_bf16_allowed(precision: str, strategy: str, world_size: int) -> bool:
    """Whether frozen weights may be held in bf16: under bf16 precision, and not sharded by FSDP2,
    which holds a layer's parameters as one flat buffer of one dtype."""
    return precision == "bf16" and not (strategy == "fsdp" and world_size > 1)


def attend_in_fp32(models, precision: str, device: torch.device, mode=True) -> int:
    """Under bf16 autocast on a CPU, the `models`' attention in fp32 (`ppo.fastpath.fp32_attention`:
    torch's fp32 kernels are the faster ones there without AMX); `mode="auto"` times both kernels
    at each model's head shapes first and keeps the bf16 one where it is clearly faster. Returns how
    many models switched."""
    if precision != "bf16" or device.type != "cpu":
        return 0

    def rank_zeros_choice(name):  # under torchrun every rank attends as rank 0's timing says
        return dist.all_gather_objects(name)[0]

    return sum(fp32_attention.install(model, mode, rank_zeros_choice) for model in models if model is not None)


def keep_fewer_activations(model, config) -> None:
    """On a model that is trained: the fused MLP and norm forwards its config asks for
    (`fused_mlp`, `fused_norm`; the same bits, less memory kept for backward)."""
    if model is None:
        return
    if config.fused_mlp:
        fused_mlp.install(model)
    if config.fused_norm:
        fused_norm.install(model)


def critic_from_policy(policy) -> torch.nn.Module:
    """A sequence classifier with the policy's backbone weights and a zero-initialised score head."""
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    critic = AutoModelForSequenceClassification.from_config(config)
    body = getattr(critic, critic.base_model_prefix)
    source = getattr(policy, policy.base_model_prefix, None)
    if source is None or type(source) is not type(body):
        raise TypeError(f"cannot build a critic from {type(policy).__name__}: pass value_model= explicitly")
    body.load_state_dict(source.state_dict())
    head = critic.score if hasattr(critic, "score") else critic.classifier
    torch.nn.init.zeros_(head.weight)
    if getattr(head, "bias", None) is not None:
        torch.nn.init.zeros_(head.bias)
    return critic.to(dtype=next(policy.parameters()).dtype, device=next(policy.parameters()).device)


def build_critic(value_head: str, policy, reward_model=None, value_model=None, reward_tokenizer=None, lora_config=None):
    """The critic role: the user's value model, a copy of a compatible reward model, a model made
    from the policy's weights, or (value_head='shared') a head on the policy itself. With
    `lora_config` a separate critic trains a LoRA adapter plus its head instead of full weights."""
    if value_head == "shared":
        if value_model is not None:
            warnings.warn("value_head='shared' ignores the value_model that was passed", stacklevel=2)
        param = next(policy.parameters())
        hidden = (
            policy.config.get_text_config().hidden_size
            if hasattr(policy.config, "get_text_config")
            else policy.config.hidden_size
        )
        return SharedCritic(hidden, dtype=param.dtype, device=param.device)
    if value_model is not None:
        model = value_model
    elif reward_model is not None and reward_tokenizer is None and hasattr(reward_model, "base_model_prefix"):
        # TRL's default: the reward model already reads these sequences well.
        model = copy.deepcopy(reward_model)
    else:
        model = critic_from_policy(unwrap_peft(policy))
    model.requires_grad_(True)
    if lora_config is not None:
        model = apply_lora(model, lora_config, task="critic")
    return SeparateCritic(model.eval())
