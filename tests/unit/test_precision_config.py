"""`rollout_logprobs`, `fp32_attention` (true / false / auto) and `tis_cap`: loading, and the errors for bad values."""

from __future__ import annotations

import pytest

from ppo.config import ConfigError, PPOConfig, load_config


@pytest.mark.parametrize("raw, value", [("auto", "auto"), ("true", True), ("false", False)])
def test_rollout_logprobs_loads_from_an_override(raw, value):
    assert load_config(PPOConfig, overrides=[f"rollout_logprobs={raw}"]).rollout_logprobs == value


def test_defaults_pick_per_precision_and_leave_tis_off():
    config = PPOConfig()
    assert config.rollout_logprobs == "auto" and config.tis_cap is None


@pytest.mark.parametrize("raw", ["sometimes", "1", "0"])
def test_rollout_logprobs_rejects_other_values_naming_them(raw):
    with pytest.raises(ConfigError, match=f"rollout_logprobs must be true, false or auto; got {raw!r}"):
        load_config(PPOConfig, overrides=[f"rollout_logprobs='{raw}'"])
    with pytest.raises(ConfigError, match="rollout_logprobs"):
        PPOConfig(rollout_logprobs=1)


def test_tis_cap_loads_and_is_checked():
    assert load_config(PPOConfig, overrides=["tis_cap=2"]).tis_cap == 2.0
    with pytest.raises(ConfigError, match="tis_cap must be >= 1.*got 0.5"):
        PPOConfig(tis_cap=0.5)
    with pytest.raises(ConfigError, match="rollout_logprobs=true"):
        PPOConfig(tis_cap=2.0, rollout_logprobs=True)
    assert PPOConfig(tis_cap=2.0, rollout_logprobs=False).tis_cap == 2.0


@pytest.mark.parametrize("raw, value", [("auto", "auto"), ("true", True), ("false", False)])
def test_fp32_attention_loads_from_an_override_and_refuses_other_values(raw, value):
    assert load_config(PPOConfig, overrides=[f"fp32_attention={raw}"]).fp32_attention == value
    with pytest.raises(ConfigError, match="fp32_attention must be true, false or auto; got 'fast'"):
        load_config(PPOConfig, overrides=["fp32_attention=fast"])
