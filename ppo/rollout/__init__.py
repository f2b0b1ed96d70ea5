"""Rollout engines: turn prompts into sampled responses. The trainer sees only `RolloutEngine`."""

from ppo.rollout.base import RolloutEngine, SamplingParams
from ppo.rollout.hf import HFRolloutEngine

__all__ = ["RolloutEngine", "SamplingParams", "HFRolloutEngine"]
