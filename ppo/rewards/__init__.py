"""Scoring: reward models and reward functions, combined into one score per sample."""

from ppo.rewards.combine import RewardSources
from ppo.rewards.funcs import (
    RewardFunctionError,
    call_reward_function,
    resolve_reward_function,
)

__all__ = ["RewardFunctionError", "RewardSources", "call_reward_function", "resolve_reward_function"]
