"""SFT's fused LM head (`SFTConfig.fused_lm_head`): the cross-entropy over completion tokens and every
gradient equal the model's logits path (to float rounding, in fp32 and under bf16 autocast, either
padding side), only the completion tokens' states reach the head, no [B, T, V] logits are held, and
it steps aside where it cannot know the logits."""

from __future__ import annotations

import pytest
import torch
from tiny_setups import tiny_llama

from ppo.collate import collate, encode_prompt_completion, sft_labels
from ppo.config import SFTConfig
from ppo.fastpath import fused_head
from ppo.forward import completion_loss_sum
from ppo.sft_stage import train_sft

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_bf16_emulation")

ROWS = [("w3 w4 w5 w6 w7", "w6"), ("w7", "w8 w9 w10 w11"), ("w12 w13 w2", "w14 w15")]


def sft_batch(tokenizer, padding_side="right"):
    examples = [encode_prompt_completion(tokenizer, p, c, 64) for p, c in ROWS]
    return collate(
        [ids for ids, _ in examples], tokenizer.pad_token_id, [sft_labels(ids, n) for ids, n in examples], padding_side
    )


def loss_and_grads(model, batch, fused: bool, precision: str):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, count = completion_loss_sum(model, batch, fused_head_ok=fused)
    loss.backward()
    return loss.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_fused_loss_and_gradients_equal_the_logits_path(tiny_policy, tiny_tokenizer, precision, padding_side):
    model = tiny_policy.train()
    batch = sft_batch(tiny_tokenizer, padding_side)
    calls = []
    real = fused_head.token_logprobs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_head, "token_logprobs", lambda *a: calls.append(1) or real(*a))
        fused = loss_and_grads(model, batch, True, precision)
    assert calls  # it did fuse
    stock = loss_and_grads(model, batch, False, precision)
    assert fused[1] == stock[1] == 1 + 1 + 4 + 1 + 2 + 1  # completion tokens plus one EOS each
    assert fused[0].dtype == stock[0].dtype == torch.float32
    rel = 1e-5 if precision == "fp32" else 2e-2
    assert fused[0].item() == pytest.approx(stock[0].item(), rel=rel)
    assert fused[2].keys() == stock[2].keys()
    for name in stock[2]:
        scale = float(stock[2][name].abs().max())
        err = float((fused[2][name] - stock[2][name]).abs().max())
        assert err <= (1e-4 if precision == "fp32" else 5e-2) * max(scale, 1e-3), (name, err, scale)


def test_only_completion_states_reach_the_head_and_no_logits_are_held(tiny_policy, tiny_tokenizer):
    batch = sft_batch(tiny_tokenizer)
    vocab = tiny_policy.config.vocab_size
    head_rows = []
    real = fused_head.head_logprobs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            fused_head, "head_logprobs", lambda hidden, *a, **k: head_rows.append(len(hidden)) or real(hidden, *a, **k)
        )
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            _, count = completion_loss_sum(tiny_policy, batch, fused_head_ok=True)
    assert head_rows == [count]  # 10 states of 3 x 8 positions
    assert not any(len(s) >= 2 and s[-1] == vocab for s in saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        completion_loss_sum(tiny_policy, batch, fused_head_ok=False)
    assert any(len(s) >= 2 and s[-1] == vocab for s in saved)  # the check sees logits where they are


def test_it_steps_aside_for_a_model_it_cannot_read(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    batch = sft_batch(tiny_tokenizer)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_head, "head_logprobs", lambda *a, **k: calls.append(1))
        fused = completion_loss_sum(model, batch, fused_head_ok=True)
    assert not calls  # GPT-2's logits are not `lm_head(model(...))`: its own forward ran
    stock = completion_loss_sum(model, batch, fused_head_ok=False)
    assert fused[0].item() == stock[0].item() and fused[1] == stock[1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_sft_run_is_the_same_fused_or_not(tiny_tokenizer, tmp_path, precision):
    rows = [{"prompt": p, "completion": c} for p, c in ROWS] * 3
    runs = []
    for fused in (False, True):
        model = tiny_llama(seed=3, vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64)
        config = SFTConfig(
            output_dir=str(tmp_path / f"{fused}"),
            learning_rate=1e-3,
            batch_size=3,
            num_epochs=2,
            eval_fraction=0.25,
            lr_scheduler="constant",
            progress_bar=False,
            precision=precision,
            fused_lm_head=fused,
        )
        runs.append((model, train_sft(config, model, tiny_tokenizer, rows=rows)))
    (stock, stock_metrics), (fused, fused_metrics) = runs
    rel = 1e-4 if precision == "fp32" else 3e-2
    assert fused_metrics["train_loss"] == pytest.approx(stock_metrics["train_loss"], rel=rel)
    assert fused_metrics["eval_loss"] == pytest.approx(stock_metrics["eval_loss"], rel=rel)
    # AdamW's step is ~lr whatever the gradient's size: where a gradient is ~0, rounding moves a
    # weight by a fraction of the learning rate
    for p, q in zip(fused.parameters(), stock.parameters()):
        torch.testing.assert_close(p, q, rtol=rel, atol=1e-4 if precision == "fp32" else 2e-3)
