"""The one optimizer builder and the stages' schedule (ppo.optim): decay on matrices only, the
learning rate of each optimizer step from lr_schedule.lr_factor, warmup_ratio in steps."""

from __future__ import annotations

import pytest
import torch

from ppo.config import SFTConfig
from ppo.optim import build_adamw, build_optimizer, optimizer_step


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))


def test_weight_decay_applies_to_matrices_only():
    model = tiny_model()
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.1)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.1 if p.ndim >= 2 else 0.0), name
    assert len(decay) == len(list(model.parameters()))


def test_without_decay_one_group_and_the_same_step_as_plain_adamw():
    model, reference = tiny_model(), tiny_model()
    ours = build_adamw(model, lr=1e-2)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    assert len(ours.param_groups) == 1
    for m, opt in ((model, ours), (reference, plain)):
        m(torch.ones(2, 3)).sum().backward()
        opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_module_without_trainable_parameters_is_refused():
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_adamw(model, lr=1e-3)


def test_stage_schedule_warms_up_over_warmup_ratio_of_the_steps_then_decays_like_ppo():
    # 4 steps, warmup_ratio 0.5 -> 2 warm-up steps: 1/3, 2/3 of the rate, then linear decay over the
    # remaining 2 steps (1, 1/2), exactly lr_factor(s, 4, "linear", warmup_steps=2).
    config = SFTConfig(learning_rate=0.3, warmup_ratio=0.5, lr_scheduler="linear", max_grad_norm=None)
    model = tiny_model()
    optimizer, schedule = build_optimizer(model, config, total_steps=4)
    rates = []
    for step in range(1, 5):
        model(torch.ones(2, 3)).sum().backward()
        rates.append(optimizer_step(model, optimizer, schedule, config.max_grad_norm, step, epoch=0)["learning_rate"])
        assert all(p.grad is None for p in model.parameters())
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.15])


def test_a_nan_gradient_stops_the_step_before_the_weights_change():
    model = tiny_model()
    optimizer, schedule = build_optimizer(model, SFTConfig(), total_steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.ones(2, 3)).sum() * float("nan")).backward()
    with pytest.raises(FloatingPointError, match="gradient norm is nan at optimizer step 1"):
        optimizer_step(model, optimizer, schedule, 1.0, 1, 0)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
