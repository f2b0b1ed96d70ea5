"""PPOTrainer's optimizers come from ppo.optim's one builder: decay on matrices only."""

from __future__ import annotations

from ppo import PPOConfig, PPOTrainer


def test_ppo_trainer_builds_its_optimizers_with_the_same_builder(tiny_policy, tiny_tokenizer):
    config = PPOConfig(weight_decay=0.05, max_new_tokens=2, progress_bar=False, precision="fp32", fp32_matmul="mkl")
    trainer = PPOTrainer(
        config, tiny_policy, tiny_tokenizer, reward_funcs=lambda completions, **kw: [0.0] * len(completions)
    )
    for name, module in (("policy", trainer.policy), ("critic", trainer.critic.module)):
        decay = {id(p): g["weight_decay"] for g in trainer.optimizers[name].param_groups for p in g["params"]}
        trainable = [p for p in module.parameters() if p.requires_grad]
        assert len(decay) == len(trainable)
        assert {decay[id(p)] for p in trainable if p.ndim < 2} == {0.0}  # biases and norm weights
        assert {decay[id(p)] for p in trainable if p.ndim >= 2} == {0.05}


def test_gradient_checkpointing_keeps_torchs_own_linear_kernel(tiny_policy, tiny_tokenizer, monkeypatch):
    """The recomputation in backward runs outside the oneDNN context: with checkpointing the trainer
    never picks oneDNN, even where `fp32_matmul=auto` would, and an explicit onednn is refused."""
    import pytest

    import ppo.trainer as trainer_module
    from ppo.config import ConfigError

    asked = []
    monkeypatch.setattr(trainer_module, "resolve_fp32_matmul", lambda choice, *a: asked.append(choice) or choice)
    trainer = PPOTrainer(
        PPOConfig(gradient_checkpointing=True, fp32_matmul="auto", precision="fp32"),
        tiny_policy,
        tiny_tokenizer,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
    )
    assert asked == ["mkl"] and trainer.fp32_kernel == "mkl"
    with pytest.raises(ConfigError, match="fp32_matmul=onednn cannot run with gradient_checkpointing"):
        PPOConfig(gradient_checkpointing=True, fp32_matmul="onednn")
