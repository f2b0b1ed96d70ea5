"""head_logprobs: log-probs and entropy from hidden states and the head's weight equal those of
the logits, values and gradients, in every chunking, with a temperature, a bias and under bf16."""

from __future__ import annotations

import pytest
import torch

from ppo import functional as F
from ppo.functional import head as head_module


def inputs(dtype=torch.float64, rows=(3, 5), hidden=16, vocab=37, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*rows, hidden, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) / 2).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, rows, generator=g)
    return h, w, b, labels


def straightforward(h, w, b, labels, temperature):
    logits = torch.nn.functional.linear(h, w, b)
    return F.logprobs_from_logits(logits, labels, temperature), F.entropy_from_logits(logits, temperature)


def grads_of(outputs, params, weights):
    loss = sum((o * c).sum() for o, c in zip(outputs, weights))
    return torch.autograd.grad(loss, [p for p in params if p is not None])


@pytest.mark.parametrize("chunk", [None, 37, 1])  # one chunk; one row per chunk; below one row
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_logits_path(monkeypatch, chunk, temperature, bias):
    if chunk is not None:
        monkeypatch.setattr(head_module, "_CPU_HEAD_CHUNK_NUMEL", chunk)
    h, w, b, labels = inputs(bias=bias)
    lp, ent = F.head_logprobs(h, w, labels, temperature, with_entropy=True, bias=b)
    ref_lp, ref_ent = straightforward(h, w, b, labels, temperature)
    assert lp.dtype == ent.dtype == torch.float64 and lp.shape == ent.shape == labels.shape
    torch.testing.assert_close(lp, ref_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)
    coefficients = (torch.randn_like(lp), torch.randn_like(ent))
    fused_grads = grads_of((lp, ent), (h, w, b), coefficients)
    for got, want in zip(fused_grads, grads_of((ref_lp, ref_ent), (h, w, b), coefficients)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_log_probs_alone_and_gradcheck():
    h, w, b, labels = inputs(rows=(2, 3), hidden=4, vocab=6, bias=True)
    lp, ent = F.head_logprobs(h, w, labels, bias=b)
    assert ent is None
    torch.testing.assert_close(lp, straightforward(h, w, b, labels, 1.0)[0])
    assert torch.autograd.gradcheck(lambda *a: F.head_logprobs(a[0], a[1], labels, 0.9, True, bias=a[2]), (h, w, b))


def test_fp32_results_for_fp32_inputs_and_memory_is_per_chunk(monkeypatch):
    monkeypatch.setattr(head_module, "_CPU_HEAD_CHUNK_NUMEL", 2 * 37)
    h, w, b, labels = inputs(dtype=torch.float32, rows=(4, 6))
    seen = []
    real = head_module._logits
    monkeypatch.setattr(head_module, "_logits", lambda *a: seen.append(a[0].shape[0]) or real(*a))
    lp, ent = F.head_logprobs(h, w, labels, with_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert lp.dtype == torch.float32 and max(seen) == 2 and len(seen) == 2 * 12  # 12 chunks, forward and backward
    ref_lp, ref_ent = straightforward(h.detach(), w.detach(), None, labels, 1.0)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_the_product_rounds_like_the_models_head():
    """compute_dtype=bf16 is what autocast does to the model's own head: bf16 logits, fp32 after."""
    h, w, _, labels = inputs(dtype=torch.float32, rows=(4, 8), hidden=32, vocab=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(h, w)
        assert logits.dtype == torch.bfloat16
        ref_lp, ref_ent = F.logprobs_from_logits(logits, labels), F.entropy_from_logits(logits)
        lp, ent = F.head_logprobs(h, w, labels, with_entropy=True, compute_dtype=torch.bfloat16)
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-2)  # one bf16 step of a logit, at most
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=2e-2)
    assert (lp - ref_lp).abs().mean() < 2e-3
    fp32_lp, _ = F.head_logprobs(h, w, labels)
    assert not torch.equal(lp, fp32_lp)  # the product did run in bf16


def test_labels_must_match_the_rows():
    h, w, _, labels = inputs()
    with pytest.raises(ValueError, match="labels shape"):
        F.head_logprobs(h, w, labels[:, :-1])
