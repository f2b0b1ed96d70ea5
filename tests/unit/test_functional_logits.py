"""ppo.functional against independent plain-loop float64 references: log-probs, entropy and the
masked statistics.
"""

from __future__ import annotations

import math

import pytest
import torch
from functional_references import (
    DTYPES,
    LENGTHS,
    T,
    close,
    d64,
    mask_from_lengths,
    mask_list,
    rand,
    ref_entropy_row,
    ref_logprobs,
    ref_masked_mean_all,
    ref_real_values,
    ref_var,
)

import ppo.functional as F
from ppo.functional import softmax as kernels  # where the chunk sizes live


def set_chunk(monkeypatch, chunk: int) -> None:
    """The chunk size on every device, so the CPU tests cover the accelerators' loop too."""
    monkeypatch.setattr(kernels, "_CHUNK_NUMEL", chunk)
    monkeypatch.setattr(kernels, "_CPU_CHUNK_NUMEL", chunk)


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 7, 11 * 3, 1 << 24])
def test_logprobs_vs_loop_reference(dtype, chunk, monkeypatch):
    set_chunk(monkeypatch, chunk)
    logits = rand(3, 5, 11, seed=1, scale=3.0).to(dtype)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    out = F.logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    close(out, ref_logprobs(logits, labels), dtype)


@pytest.mark.parametrize("chunk", [1, 13, 1 << 24])
def test_logprobs_matches_log_softmax_gather_incl_grad(chunk, monkeypatch):
    set_chunk(monkeypatch, chunk)
    full = rand(4, 7, 13, seed=3, scale=4.0).requires_grad_()
    logits = full[:, 1:-1]  # non-contiguous slice, as taken from a model output
    labels = torch.randint(0, 13, (4, 5), generator=torch.Generator().manual_seed(4))
    weights = rand(4, 5, seed=5)
    out = F.logprobs_from_logits(logits, labels)
    (out * weights).sum().backward()
    ref_full = full.detach().double().requires_grad_()
    ref = torch.log_softmax(ref_full[:, 1:-1], dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref * weights.double()).sum().backward()
    close(out, ref)
    close(full.grad, ref_full.grad)


def test_logprobs_bf16_grad_and_saved_memory():
    logits = rand(2, 6, 50, seed=6, scale=3.0).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(7))
    saved = {}

    def pack(t):  # keyed by storage: the same tensor saved by two ops costs memory once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = F.logprobs_from_logits(logits, labels)
    # Only the bf16 logits themselves plus [B, T]-sized tensors may be kept for backward: no fp32
    # copy of the logits (which would be 2x the bf16 size on its own).
    assert sum(saved.values()) <= logits.numel() * 2 + 64 * logits.shape[0] * logits.shape[1]
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref_logits = logits.detach().double().requires_grad_()
    torch.log_softmax(ref_logits, -1).gather(-1, labels.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 9 * 2, 1 << 24])
def test_entropy_vs_loop_reference(dtype, chunk, monkeypatch):
    set_chunk(monkeypatch, chunk)
    logits = rand(2, 3, 4, 9, seed=8, scale=3.0).to(dtype)  # arbitrary leading dims
    out = F.entropy_from_logits(logits)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4)
    ref = [[[ref_entropy_row(zs) for zs in b] for b in a] for a in d64(logits)]
    close(out, ref, dtype)


def test_entropy_gradient_edge_values_and_1d():
    logits = rand(3, 4, 10, seed=9, scale=2.0).requires_grad_()
    w = rand(3, 4, seed=10)
    (F.entropy_from_logits(logits) * w).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(ref_logits, -1)
    (-(logp.exp() * logp).sum(-1) * w.double()).sum().backward()
    close(logits.grad, ref_logits.grad)
    # uniform -> log V; one-hot-ish with -inf entries -> 0 and no NaN; large offsets are stable
    close(F.entropy_from_logits(torch.zeros(10)), math.log(10))
    masked_vocab = torch.tensor([5.0, float("-inf"), float("-inf")])
    close(F.entropy_from_logits(masked_vocab), 0.0)
    close(F.entropy_from_logits(torch.tensor([1000.0, 1000.0])), math.log(2))


# ----------------------------------------------------------------------------- masked stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bool_mask", [False, True])
def test_masked_mean_vs_reference(dtype, bool_mask):
    x = rand(len(LENGTHS), T, seed=11, scale=3.0).to(dtype)
    mask = mask_from_lengths(LENGTHS, T)
    mask = mask.bool() if bool_mask else mask
    close(F.masked_mean(x, mask), ref_masked_mean_all(x, mask), dtype)
    rows = [sum(v for v, k in zip(r, m) if k) / sum(m) for r, m in zip(d64(x), mask_list(mask))]
    close(F.masked_mean(x, mask, dim=1), rows, dtype)
    cols = []
    for j in range(T):
        vals = [r[j] for r, m in zip(d64(x), mask_list(mask)) if m[j]]
        cols.append(sum(vals) / len(vals))
    close(F.masked_mean(x, mask, dim=0), cols, dtype)
    assert F.masked_mean(x, mask, dim=1).dtype == torch.float32


def test_masked_mean_empty_is_zero():
    x = rand(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    assert F.masked_mean(x, torch.zeros(2, 3)).item() == 0.0
    close(F.masked_mean(x, mask, dim=1), [x[0, 0].item(), 0.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_vs_reference(dtype, unbiased):
    x = (rand(len(LENGTHS), T, seed=12, scale=2.0) + 5.0).to(dtype)
    mask = mask_from_lengths(LENGTHS, T)
    close(F.masked_var(x, mask, unbiased=unbiased), ref_var(ref_real_values(x, mask), unbiased), dtype)


def test_masked_var_needs_two_positions():
    x, mask = rand(2, 3), torch.tensor([[0.0, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="masked_var: need at least 2"):
        F.masked_var(x, mask)
    assert F.masked_var(x, mask, unbiased=False).item() == 0.0
    with pytest.raises(ValueError):
        F.masked_var(x, torch.zeros(2, 3), unbiased=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_vs_reference(dtype, shift_mean):
    x = (rand(len(LENGTHS), T, seed=13, scale=3.0) + 2.0).to(dtype)
    mask = mask_from_lengths(LENGTHS, T)
    vals = ref_real_values(x, mask)
    mu, var = sum(vals) / len(vals), ref_var(vals, unbiased=True)
    ref = [
        [((v - mu) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mu)) if k else 0.0 for v, k in zip(r, m)]
        for r, m in zip(d64(x), mask_list(mask))
    ]
    out = F.masked_whiten(x, mask, shift_mean=shift_mean)
    close(out, ref, dtype)
    assert (out[mask == 0] == 0).all()
    white = ref_real_values(out, mask)
    target_mean = 0.0 if shift_mean else mu
    assert abs(sum(white) / len(white) - target_mean) < 1e-5
    assert abs(ref_var(white, unbiased=True) - 1.0) < 1e-5


def test_temperature_inside_equals_dividing_the_logits_first():
    """The temperature applied on each upcast chunk (no full-size copy) is the same maths as dividing
    the logits before: values and gradients."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    upstream = torch.randn(3, 5, dtype=torch.float64)
    for fn in (lambda z, t: F.logprobs_from_logits(z, labels, t), lambda z, t: F.entropy_from_logits(z, t)):
        inside = logits.clone().requires_grad_(True)
        before = logits.clone().requires_grad_(True)
        value_inside, value_before = fn(inside, 0.7), fn(before / 0.7, 1.0)
        torch.testing.assert_close(value_inside, value_before)
        (value_inside * upstream).sum().backward()
        (value_before * upstream).sum().backward()
        torch.testing.assert_close(inside.grad, before.grad)


@pytest.mark.parametrize("shape", [(4, 8, 16), (3, 5, 7, 16), (2, 300)])
def test_cpu_chunks_cover_every_element_once_within_the_cpu_limit(shape, monkeypatch):
    monkeypatch.setattr(kernels, "_CHUNK_NUMEL", 1 << 30)  # the accelerators' size must not apply on a CPU
    monkeypatch.setattr(kernels, "_CPU_CHUNK_NUMEL", 40)
    logits = torch.zeros(shape)
    for idx in kernels._chunks(logits):
        piece = logits[idx]
        assert piece.numel() <= max(40, shape[-1]), (idx, piece.shape)
        piece += 1
    assert torch.equal(logits, torch.ones(shape))
