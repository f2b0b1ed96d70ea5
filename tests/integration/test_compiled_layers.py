"""compile_layers: decoder layers through torch.compile give the numbers of the layers' own forward
(to float rounding), leave sampling and the weights alone, and fall back when the compiler fails.

Slow: inductor compiles C++ kernels (tens of seconds on 2 cores, once per process per graph kind).
"""

from __future__ import annotations

import copy

import pytest
import torch

from ppo import PPOConfig, PPOTrainer
from ppo.config_io import ConfigError
from ppo.fastpath import compiled_layers
from ppo.fastpath.compiled_layers import compile_decoder_layers, decoder_layers, uncompile_decoder_layers
from ppo.fastpath.gate import FastPathWarning
from ppo.fastpath.last_layer import last_layer_rows

pytestmark = pytest.mark.slow

PROMPTS = ["w3 w4", "w5 w6 w7 w8 w9", "w2", "w8 w9 w10"]


def count_w1(completions, **kwargs):
    return [float(c.split().count("w1")) for c in completions]


def forward_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logits.float().log_softmax(-1)[..., 1].sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_compute_what_the_layers_do(tiny_policy):
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 9]])
    mask = (ids != 0).long()
    eager_logits, eager_grads = forward_and_grads(tiny_policy, ids, mask)
    keys = list(tiny_policy.state_dict())
    with torch.no_grad():
        eager_greedy = tiny_policy.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)

    assert compile_decoder_layers(tiny_policy) == len(decoder_layers(tiny_policy)) == 2
    assert compile_decoder_layers(tiny_policy) == 2  # idempotent
    logits, grads = forward_and_grads(tiny_policy, ids, mask)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6)
    assert list(tiny_policy.state_dict()) == keys  # saving sees the same weights under the same names
    with torch.no_grad():  # sampling carries a KV cache: the layers' own forward, the same tokens
        assert torch.equal(
            tiny_policy.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), eager_greedy
        )

    # The pruned last layer takes its turn and hands the compiled forward back.
    last = decoder_layers(tiny_policy)[-1]
    compiled_forward = vars(last)["forward"]
    with torch.no_grad(), last_layer_rows(tiny_policy, torch.tensor([3, 5])):
        pruned = tiny_policy(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert vars(last)["forward"] is not compiled_forward
    assert vars(last)["forward"] is compiled_forward
    torch.testing.assert_close(pruned[:, [3, 5]], eager_logits[:, [3, 5]], rtol=1e-5, atol=1e-5)

    uncompile_decoder_layers(tiny_policy)
    assert all("forward" not in vars(layer) for layer in decoder_layers(tiny_policy))


def test_a_ppo_step_with_compiled_layers_matches_the_eager_step(tiny_policy, tiny_tokenizer, tiny_reward_model):
    """Policy, separate critic and reward model compiled: one step (two epochs of two mini-batches)
    gives the eager step's samples, statistics and weights to float rounding."""
    results = {}
    for compiled in (False, True):
        config = PPOConfig(
            batch_size=4,
            mini_batch_size=2,
            ppo_epochs=2,
            max_new_tokens=6,
            precision="fp32",
            fp32_matmul="mkl",
            compile_layers=compiled,
            progress_bar=False,
            seed=0,
        )
        trainer = PPOTrainer(
            config,
            copy.deepcopy(tiny_policy),
            tiny_tokenizer,
            reward_model=copy.deepcopy(tiny_reward_model),
            reward_funcs=count_w1,
        )
        layers = [decoder_layers(m)[0] for m in (trainer.policy, trainer.critic.module, trainer.rewards.reward_model)]
        assert all(
            isinstance(vars(layer).get("forward"), compiled_layers._CompiledForward) == compiled for layer in layers
        )
        stats = trainer.step(PROMPTS)
        weights = [p.detach().clone() for p in [*trainer.policy.parameters(), *trainer.critic.module.parameters()]]
        results[compiled] = stats, weights
    (eager, eager_weights), (fused, fused_weights) = results[False], results[True]
    assert fused["generated_texts"] == eager["generated_texts"]
    for key in ("mean_reward", "kl", "loss", "policy_loss", "value_loss", "entropy"):
        assert fused[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(eager_weights, fused_weights):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_compiler_failure_warns_and_runs_the_layers_uncompiled(tiny_policy, monkeypatch):
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        eager = tiny_policy(input_ids=ids, use_cache=False).logits

    class InductorFailure(RuntimeError):
        pass

    InductorFailure.__module__ = "torch._inductor.exc"  # what a missing C++ compiler raises from

    def failing(*args, **kwargs):
        raise InductorFailure("no working C++ compiler found")

    monkeypatch.setattr(compiled_layers, "_failed", [])
    monkeypatch.setitem(compiled_layers._compiled, type(decoder_layers(tiny_policy)[0]), failing)
    compile_decoder_layers(tiny_policy)
    with pytest.warns(FastPathWarning, match="compile_layers is off: torch.compile failed .*C\\+\\+ compiler"):
        with torch.no_grad():
            logits = tiny_policy(input_ids=ids, use_cache=False).logits
    assert torch.equal(logits, eager)

    # A model's own error is not the compiler's: it reaches the caller.
    monkeypatch.setattr(compiled_layers, "_failed", [])
    monkeypatch.setitem(compiled_layers._compiled, type(decoder_layers(tiny_policy)[0]), lambda *a, **k: 1 / 0)
    uncompile_decoder_layers(tiny_policy)
    compile_decoder_layers(tiny_policy)
    with pytest.raises(ZeroDivisionError), torch.no_grad():
        tiny_policy(input_ids=ids, use_cache=False)


@pytest.mark.parametrize("other", [{"gradient_checkpointing": True}, {"fp32_matmul": "onednn"}])
def test_compile_layers_refuses_what_it_cannot_trace(other):
    with pytest.raises(ConfigError, match="compile_layers=true cannot run with"):
        PPOConfig(compile_layers=True, **other)


def test_layers_attending_in_fp32_only_while_sampling_compile_without_a_break(tiny_policy):
    """`fp32_attention`'s DECODE_NAME reads whether a rollout is running; compiled layers never
    run one, and the compiler must not stop at that read (a graph break per layer and call)."""
    from torch._dynamo.utils import counters

    from ppo.fastpath import fp32_attention

    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 9]])
    mask = (ids != 0).long()
    tiny_policy.set_attn_implementation(fp32_attention.DECODE_NAME)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_logits, _ = forward_and_grads(tiny_policy, ids, mask)
    counters.clear()
    compile_decoder_layers(tiny_policy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = forward_and_grads(tiny_policy, ids, mask)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(logits.float(), eager_logits.float(), rtol=0.05, atol=0.05)
    uncompile_decoder_layers(tiny_policy)
