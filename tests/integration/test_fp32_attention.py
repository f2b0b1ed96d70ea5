"""fp32_attention: under bf16 autocast on a CPU, attention runs torch's fp32 kernel on the bf16
inputs (prompt passes, scoring, the update, lean decode steps and the pruned last layer), and the
sampling KV cache is held in fp32; elsewhere nothing changes. `auto` times both kernels and keeps
the bf16 one where it is clearly faster, for the forwards and for sampling separately."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_setups import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from ppo import PPOConfig, PPOTrainer
from ppo.data import collate_prompts
from ppo.fastpath import fp32_attention
from ppo.fastpath.kv_cache import rollout_cache
from ppo.rollout import HFRolloutEngine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_gate", "quiet_bf16_emulation")

PROMPTS = ["a b c", "d e", "f g h i", "j"]


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


class AttentionDtypes(TorchDispatchMode):
    """The dtypes of every attention kernel's query (forward and backward) dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__:
            self.seen.append(args[0].dtype)
        return func(*args, **kwargs or {})


def batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def switched(model):
    model = copy.deepcopy(model)
    assert fp32_attention.install(model)
    return model


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_under_autocast_the_kernel_is_fp32_forward_and_backward(tiny_policy, arch):
    stock = tiny_policy if arch == "qwen3" else tiny_llama()
    fast = switched(stock)
    ids, mask, positions = batch()
    results = {}
    for name, model in (("stock", stock), ("fast", fast)):
        model.zero_grad(set_to_none=True)
        with AttentionDtypes() as kernels, bf16():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (kernels.seen, logits.detach().float(), grads)
    assert results["stock"][0] and set(results["stock"][0]) == {torch.bfloat16}
    assert results["fast"][0] and set(results["fast"][0]) == {torch.float32}
    assert results["fast"][1].dtype == torch.float32
    # the same bf16 model to bf16's rounding: logits and every parameter's gradient
    torch.testing.assert_close(results["fast"][1], results["stock"][1], atol=0.05, rtol=0.02)
    assert results["fast"][2].keys() == results["stock"][2].keys()
    for name, grad in results["stock"][2].items():
        scale = float(grad.abs().max()) or 1.0
        assert float((results["fast"][2][name] - grad).abs().max()) <= 0.05 * scale, name


def test_without_autocast_it_is_the_stock_computation_bit_for_bit(tiny_policy):
    fast = switched(tiny_policy)
    ids, mask, positions = batch()
    with torch.no_grad():
        stock_logits = tiny_policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        fast_logits = fast(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(fast_logits, stock_logits)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_sampling_attends_in_fp32_over_an_fp32_cache(tiny_policy, tiny_tokenizer, arch):
    """The prompt pass fills an fp32 cache and each lean decode step attends in fp32; greedy tokens
    match a full forward's argmax over the same sequence."""
    model = switched(tiny_policy if arch == "qwen3" else tiny_llama(vocab_size=tiny_tokenizer.vocab_size))
    engine = HFRolloutEngine(model, tiny_tokenizer, bf16)
    assert engine.lean_decoder is not None and engine.lean_decoder.attention is fp32_attention.sdpa
    with bf16(), torch.no_grad():
        cache = rollout_cache(model, 8)
        cache.update(torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16), 0)
    assert cache.layers[0].keys.dtype == cache.layers[0].values.dtype == torch.float32
    prompts = collate_prompts(tiny_tokenizer, PROMPTS)
    with AttentionDtypes() as kernels:
        rollout = engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert kernels.seen and set(kernels.seen) == {torch.float32}
    # each greedy token is the argmax of the full forward over everything before it (bf16 too)
    sequence = torch.cat([prompts.input_ids, rollout.response_ids], dim=1)
    mask = torch.cat([prompts.attention_mask, rollout.response_mask.long()], dim=1)
    with bf16(), torch.no_grad():
        logits = model(input_ids=sequence, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    width = prompts.input_ids.shape[1]
    for row in range(len(PROMPTS)):
        for t in range(int(rollout.response_mask[row].sum())):
            top2 = logits[row, width + t - 1].float().topk(2).values
            if float(top2[0] - top2[1]) > 0.05:  # not a near-tie that bf16 rounding may flip
                assert int(logits[row, width + t - 1].argmax()) == int(rollout.response_ids[row, t])


def test_the_trainer_switches_every_model_under_bf16_only(tiny_policy, tiny_tokenizer, tiny_reward_model):
    def trainer(precision, **overrides):
        config = PPOConfig(batch_size=4, max_new_tokens=4, progress_bar=False, precision=precision, **overrides)
        policy, reward = copy.deepcopy(tiny_policy), copy.deepcopy(tiny_reward_model)
        return PPOTrainer(config, policy, tiny_tokenizer, reward_model=reward), reward

    on, reward_model = trainer("bf16", fp32_attention=True)
    models = (on.policy, on.ref_model, on.critic.module, reward_model)
    assert all(fp32_attention.uses_fp32_attention(m) for m in models)
    stats = on.step(PROMPTS)
    assert all(torch.isfinite(torch.tensor(v)).all() for k, v in stats.items() if isinstance(v, float))
    for off, _ in (trainer("fp32"), trainer("bf16", fp32_attention=False)):
        assert not any(fp32_attention.uses_fp32_attention(m) for m in (off.policy, off.ref_model, off.critic.module))


def test_other_attention_implementations_are_left_alone(tiny_policy):
    eager = copy.deepcopy(tiny_policy)
    eager.set_attn_implementation("eager")
    assert not fp32_attention.install(eager)
    assert eager.config._attn_implementation == "eager"


def test_a_saved_model_loads_with_plain_transformers(tiny_policy, tmp_path):
    model = switched(tiny_policy)
    model.save_pretrained(tmp_path)
    assert fp32_attention.NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation == "sdpa"
    ids, mask, positions = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits,
            model(input_ids=ids, attention_mask=mask, position_ids=positions).logits,
        )


@pytest.fixture
def probe(monkeypatch):
    """Set what `auto`'s timing finds: (bf16 time / fp32 time) for the forwards, for a decode step."""
    asked = []

    def set_ratios(train: float, decode: float):
        monkeypatch.setattr(fp32_attention, "kernel_speedups", lambda *shape: asked.append(shape) or (train, decode))
        return asked

    return set_ratios


@pytest.mark.parametrize(
    ("train", "decode", "expected"),
    [
        (1.7, 3.0, fp32_attention.NAME),  # this project's AVX512-BF16 CPUs: fp32 wins both
        (1.7, 0.5, fp32_attention.NAME),  # fp32 wins the forwards: sampling follows
        (0.5, 3.0, fp32_attention.DECODE_NAME),  # bf16 wins the forwards only
        (0.5, 0.5, None),  # bf16 wins both: the stock kernels
        (0.9, 0.9, fp32_attention.NAME),  # bf16 faster, but not by the margin: the more exact kernel
    ],
)
def test_auto_keeps_the_bf16_kernel_only_where_it_is_clearly_faster(tiny_policy, probe, train, decode, expected):
    asked = probe(train, decode)
    assert fp32_attention.choose(tiny_policy, "auto") == expected
    config = tiny_policy.config
    assert asked == [(config.num_attention_heads, config.num_key_value_heads, config.head_dim)]
    assert fp32_attention.choose(tiny_policy, True) == fp32_attention.NAME and len(asked) == 1  # no timing
    model = copy.deepcopy(tiny_policy)
    assert fp32_attention.install(model, "auto") == (expected is not None)
    assert model.config._attn_implementation == (expected or "sdpa")
    with pytest.raises(ValueError, match="true, false or auto"):
        fp32_attention.choose(tiny_policy, "fast")


def test_the_timing_gives_two_ratios_for_the_models_head_shapes():
    fp32_attention.kernel_speedups.cache_clear()
    train, decode = fp32_attention.kernel_speedups(4, 2, 16)
    assert 0.0 < train < float("inf") and 0.0 < decode < float("inf")
    assert fp32_attention.kernel_speedups(4, 2, 16) == (train, decode)  # once per process and shape


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_decode_only_forwards_on_the_stock_kernel_and_samples_in_fp32(tiny_policy, tiny_tokenizer, arch):
    """DECODE_NAME: a forward without cache is the stock computation bit for bit (bf16 kernel); the
    sampling cache is fp32 and every attention of a rollout runs in fp32, giving the very tokens and
    log-probs that NAME's rollout gives (the same computation)."""
    stock = tiny_policy if arch == "qwen3" else tiny_llama(vocab_size=tiny_tokenizer.vocab_size)
    decode_only = copy.deepcopy(stock)
    decode_only.set_attn_implementation(fp32_attention.DECODE_NAME)
    assert fp32_attention.decodes_in_fp32(decode_only) and not fp32_attention.uses_fp32_attention(decode_only)
    ids, mask, positions = batch()
    outputs = {}
    for name, model in (("stock", stock), ("decode_only", decode_only)):
        with AttentionDtypes() as kernels, bf16(), torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        outputs[name] = (kernels.seen, logits)
    assert set(outputs["decode_only"][0]) == {torch.bfloat16}
    assert torch.equal(outputs["decode_only"][1], outputs["stock"][1])

    prompts = collate_prompts(tiny_tokenizer, PROMPTS)
    rollouts = {}
    for name, model in (("decode_only", decode_only), ("fp32", switched(stock))):
        engine = HFRolloutEngine(model, tiny_tokenizer, bf16)
        assert engine.lean_decoder is not None
        torch.manual_seed(3)  # the rows' sampling seeds
        with AttentionDtypes() as kernels:
            rollouts[name] = engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.7))
        assert kernels.seen and set(kernels.seen) == {torch.float32}, name
    assert torch.equal(rollouts["decode_only"].response_ids, rollouts["fp32"].response_ids)
    torch.testing.assert_close(rollouts["decode_only"].logprobs, rollouts["fp32"].logprobs, rtol=0, atol=0)
    with bf16(), torch.no_grad():
        cache = rollout_cache(decode_only, 8)
        cache.update(torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16), 0)
    assert cache.layers[0].keys.dtype == torch.float32


def test_the_trainer_follows_what_auto_finds(tiny_policy, tiny_tokenizer, tiny_reward_model, probe):
    def models_of(train, decode, **overrides):
        probe(train, decode)
        config = PPOConfig(batch_size=4, max_new_tokens=4, progress_bar=False, precision="bf16", **overrides)
        reward = copy.deepcopy(tiny_reward_model)
        trainer = PPOTrainer(config, copy.deepcopy(tiny_policy), tiny_tokenizer, reward_model=reward)
        return trainer, (trainer.policy, trainer.ref_model, trainer.critic.module, reward)

    assert PPOConfig().fp32_attention == "auto"
    trainer, models = models_of(0.5, 3.0)
    assert {m.config._attn_implementation for m in models} == {fp32_attention.DECODE_NAME}
    stats = trainer.step(PROMPTS)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in stats.values() if isinstance(v, float))
    _, models = models_of(0.5, 0.5)
    assert {m.config._attn_implementation for m in models} == {"sdpa"}
    _, models = models_of(0.5, 0.5, fp32_attention=True)  # true: fp32 whatever the timing says
    assert {m.config._attn_implementation for m in models} == {fp32_attention.NAME}


def test_a_config_that_does_not_give_its_head_shapes_is_timed_at_typical_ones(tiny_policy, probe):
    asked = probe(0.5, 0.5)
    model = copy.deepcopy(tiny_policy)
    del model.config.head_dim
    model.config.num_key_value_heads = 3  # does not divide the query heads: not a shape to time
    assert fp32_attention.choose(model, "auto") is None
    assert asked == [(8, 8, 64)]
