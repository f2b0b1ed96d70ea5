"""`bf16_frozen_weights`: under bf16 autocast the reference's and the reward model's linear weights
are held in bf16 (ppo/fastpath/bf16_weights.py). Autocast would cast them to bf16 at every forward,
so a PPO step must come out bit for bit the same, with the weights' memory halved; fp32 runs and
the parts read outside autocast (embeddings, norms, score heads) are left alone.

bf16 is emulated on AVX2-only CPUs: the models are the smallest that show the effect.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_setups import thirds, tiny_llama

from ppo import PPOConfig, PPOTrainer
from ppo.fastpath import bf16_weights
from ppo.fastpath.gate import FastPathWarning, tiny_twin

PROMPTS = ["w3 w4", "w5 w6 w7 w8 w9", "w2", "w8 w9 w10"]


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_gate", "quiet_bf16_emulation")


def dtypes(model) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters()}


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def llama(tie: bool):
    return tiny_llama(tie_word_embeddings=tie).eval().requires_grad_(False)


def test_which_layers_a_causal_lm_holds_in_bf16():
    untied, tied = llama(tie=False), llama(tie=True)
    assert untied.lm_head in bf16_weights.frozen_linears(untied)
    # tied: the head's weight is the embedding's, which must stay fp32 (the residual stream)
    assert tied.lm_head not in bf16_weights.frozen_linears(tied)
    assert len(bf16_weights.frozen_linears(tied)) == 2 * 7  # q k v o, gate up down per layer
    untied.model.layers[0].mlp.up_proj.requires_grad_(True)  # a trainable layer is not frozen
    assert untied.model.layers[0].mlp.up_proj not in bf16_weights.frozen_linears(untied)
    assert bf16_weights.frozen_linears(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def test_reward_model_keeps_its_score_head_and_norms_in_fp32(tiny_reward_model):
    tiny_reward_model.requires_grad_(False)
    before = weight_bytes(tiny_reward_model)
    assert bf16_weights.hold_in_bf16(tiny_reward_model) > 0
    held = dtypes(tiny_reward_model)
    assert held["score.weight"] == torch.float32  # read in fp32 outside autocast (forward.read_head)
    assert held["model.embed_tokens.weight"] == held["model.norm.weight"] == torch.float32
    assert held["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert held["model.layers.1.mlp.down_proj.weight"] == torch.bfloat16
    assert weight_bytes(tiny_reward_model) < before


@pytest.mark.parametrize("tie", [True, False])
def test_self_check_finds_llama_and_qwen3_bit_identical(tie, tiny_policy):
    for config in (llama(tie).config, tiny_policy.config):
        with torch.random.fork_rng():
            assert bf16_weights.mismatch_with_stock(tiny_twin(config)) is None


def test_a_model_that_computes_in_its_weights_dtype_is_refused(monkeypatch):
    """Where a layer reads its weight's dtype (here: every linear runs outside autocast in it), bf16
    weights would change the numbers: the self-check sees it and the model is left as it was."""

    def in_weight_dtype(self, x):
        with torch.autocast("cpu", enabled=False):
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).float()

    monkeypatch.setattr(torch.nn.Linear, "forward", in_weight_dtype)
    model = llama(tie=True)
    assert "differ" in bf16_weights.mismatch_with_stock(tiny_twin(model.config))
    before = dtypes(model)
    with pytest.warns(FastPathWarning, match="bf16_frozen_weights"):
        assert bf16_weights.hold_in_bf16(model) == 0
    assert dtypes(model) == before
    with bf16_weights.bf16_while(model) as held:
        assert held == 0 and dtypes(model) == before


def step(policy, tokenizer, reward_model, **overrides):
    config = PPOConfig(
        batch_size=4,
        max_new_tokens=5,
        gradient_accumulation_steps=2,
        progress_bar=False,
        seed=0,
        **overrides,
    )
    trainer = PPOTrainer(config, policy, tokenizer, reward_model=reward_model, reward_funcs=thirds)
    stats = trainer.step(PROMPTS)
    return trainer, {k: v for k, v in stats.items() if not k.startswith("time/")}


def test_bf16_step_is_bit_identical_with_frozen_weights_held_in_bf16(tiny_policy, tiny_tokenizer, tiny_reward_model):
    with torch.no_grad():
        tiny_policy.model.norm.weight.mul_(5.0)  # logits of a trained model's size: rounding shows
    runs = {}
    for held in (False, True):
        runs[held] = step(
            copy.deepcopy(tiny_policy),
            tiny_tokenizer,
            copy.deepcopy(tiny_reward_model),
            precision="bf16",
            bf16_frozen_weights=held,
        )
    (stock, stock_stats), (trainer, stats) = runs[False], runs[True]
    reference, reward_model = trainer.ref_model, trainer.rewards.reward_model
    assert reference.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert reward_model.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    assert weight_bytes(reference) < weight_bytes(stock.ref_model)
    # the policy and the critic train in fp32 (autocast caches their casts)
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.critic.module.parameters()} == {torch.float32}
    assert stats == stock_stats
    assert stats["kl"] == 0.0  # the untouched policy against its bf16-held reference
    for a, b in zip(trainer.policy.parameters(), stock.policy.parameters()):
        assert torch.equal(a, b)


def test_fp32_and_the_switch_off_leave_the_frozen_models_alone(tiny_policy, tiny_tokenizer, tiny_reward_model):
    for overrides in ({"precision": "fp32"}, {"precision": "bf16", "bf16_frozen_weights": False}):
        trainer = PPOTrainer(
            PPOConfig(batch_size=4, progress_bar=False, **overrides),
            copy.deepcopy(tiny_policy),
            tiny_tokenizer,
            reward_model=copy.deepcopy(tiny_reward_model),
        )
        for model in (trainer.ref_model, trainer.rewards.reward_model):
            assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bf16_while_holds_frozen_weights_for_its_block_and_hands_the_same_ones_back():
    model = llama(tie=False)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    originals = {name: p for name, p in model.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
        with bf16_weights.bf16_while(model) as held:
            assert held == 2 * 7 + 1  # q k v o, gate up down per layer, and the untied head
            assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    assert all(p is originals[name] for name, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="inside"), bf16_weights.bf16_while(model):
        raise RuntimeError("inside")
    assert all(p is originals[name] for name, p in model.named_parameters())


def lora_trainer(policy, tokenizer, held: bool):
    config = PPOConfig(
        batch_size=4,
        max_new_tokens=5,
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        precision="bf16",
        bf16_frozen_weights=held,
        progress_bar=False,
        seed=0,
    )
    return PPOTrainer(config, policy, tokenizer, reward_funcs=thirds)


def test_bf16_lora_samples_on_a_bf16_copy_of_its_frozen_base_bit_identically(tiny_policy, tiny_tokenizer):
    """A LoRA policy's base is frozen, so autocast casts each base weight again at every decode
    step. While sampling, the base runs on bf16 copies: the same numbers, and the fp32 base the
    user holds is handed back untouched."""
    pytest.importorskip("peft")
    with torch.no_grad():
        tiny_policy.model.norm.weight.mul_(5.0)  # logits of a trained model's size: rounding shows
    runs = {}
    for held in (False, True):
        trainer = lora_trainer(copy.deepcopy(tiny_policy), tiny_tokenizer, held)
        q_proj = trainer.policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        seen = []
        q_proj.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(module.weight.dtype))
        base = dict(trainer.policy.named_parameters())
        stats = [trainer.step(PROMPTS) for _ in range(2)]  # the second samples from a moved adapter
        assert all(p is base[name] for name, p in trainer.policy.named_parameters())
        runs[held] = trainer, [{k: v for k, v in s.items() if not k.startswith("time/")} for s in stats], seen
    (stock, stock_stats, stock_seen), (trainer, stats, seen) = runs[False], runs[True]
    assert set(stock_seen) == {torch.float32}
    assert torch.bfloat16 in seen and torch.float32 in seen  # sampling on the copy, the rest on fp32
    assert stats[1]["kl"] != 0.0  # the adapter moved, so the second step compares two policies
    assert stats == stock_stats
    for (name, a), b in zip(trainer.policy.named_parameters(), stock.policy.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
