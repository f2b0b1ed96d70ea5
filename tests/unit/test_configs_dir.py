"""Every shipped config loads into its dataclass (no misspelt key can hide in a YAML file)."""

from pathlib import Path

import pytest

from ppo import config as C

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"sft": C.SFTConfig, "reward": C.RewardConfig, "ppo": C.PPOConfig, "eval": C.EvalConfig}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    kind = path.stem.rsplit("-", 1)[-1]
    cls = KINDS.get(kind) or C.DemoConfig
    C.load_config(cls, path)


def test_demo_yaml_is_the_demo_defaults():
    """`ppo-rlhf demo --config configs/demo.yaml` and a bare `ppo-rlhf demo` are the same run."""
    assert C.load_config(C.DemoConfig, ROOT / "configs" / "demo.yaml") == C.DemoConfig()
