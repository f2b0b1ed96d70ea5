"""ppo-rlhf: PPO for RLHF on Hugging Face causal language models.

    from ppo import PPOConfig, PPOTrainer

Heavy imports (transformers) happen on first use of a public name, so `import ppo` is instant.
"""

__version__ = "0.1.0"
__all__ = ["PPOConfig", "PPOTrainer", "create_trainer", "__version__"]


def __getattr__(name):
    if name == "PPOConfig":
        from ppo.config import PPOConfig

        return PPOConfig
    if name == "PPOTrainer":
        from ppo.trainer import PPOTrainer

        return PPOTrainer
    if name == "create_trainer":
        from ppo.quickstart import create_trainer

        return create_trainer
    raise AttributeError(f"module 'ppo' has no attribute {name!r}")
