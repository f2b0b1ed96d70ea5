"""ppo.distributed.clip_grad_norm: torch's clipping to the bit, without rescaling gradients whose
norm is already within the limit (a pass over every gradient that multiplies by 1.0)."""

from __future__ import annotations

import pytest
import torch
import torch.profiler

from ppo import distributed as dist


def parameters_with_grads(scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(7, 5), (5,), (3, 4, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * scale
    return params


def torch_clipped(scale: float, max_norm: float):
    params = parameters_with_grads(scale)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm, [p.grad for p in params]


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_norm_and_gradients_are_torchs_to_the_bit(scale):
    expected_norm, expected_grads = torch_clipped(scale, max_norm=1.0)
    params = parameters_with_grads(scale)
    norm = dist.clip_grad_norm(params, 1.0)
    assert torch.equal(norm, expected_norm)
    for p, expected in zip(params, expected_grads):
        assert torch.equal(p.grad, expected)
    if scale > 1:  # clipped: the new norm is the limit
        assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])) == pytest.approx(1.0, rel=1e-5)


def multiplies(clip) -> list[str]:
    """The in-place multiplies (torch's rescaling) that `clip()` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        clip()
    return [e.name for e in prof.events() if e.name in ("aten::mul_", "aten::_foreach_mul_")]


def test_gradients_within_the_limit_are_not_rescaled():
    params = parameters_with_grads(0.01)
    assert multiplies(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))  # torch rescales by 1.0
    before = [p.grad.clone() for p in params]
    assert multiplies(lambda: dist.clip_grad_norm(params, 1.0)) == []
    assert multiplies(lambda: dist.clip_grad_norm(params, float("inf"))) == []  # the stages' "no clipping"
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert multiplies(lambda: dist.clip_grad_norm(parameters_with_grads(10.0), 1.0))  # over the limit: rescaled


def test_a_non_finite_norm_still_rescales_as_torch_does():
    params = parameters_with_grads(1.0)
    params[1].grad[0] = float("nan")
    norm = dist.clip_grad_norm(params, 1.0)
    assert norm.isnan()
    assert all(p.grad.isnan().all() for p in params)  # torch multiplies every gradient by nan
