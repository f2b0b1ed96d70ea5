"""The fast-path gate (`ppo.fastpath.gate`): each fast path turns itself off, with one warning and
the stock result, when its self-check disagrees with the stock computation, when the architecture
is unknown, and when the installed version is outside the tested window."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers.models.qwen3 import modeling_qwen3

from ppo.batch import PromptBatch
from ppo.fastpath import gate, onednn_linear
from ppo.fastpath import kv_cache as kv_cache_module
from ppo.fastpath.kv_cache import PreallocatedLayer, rollout_cache
from ppo.fastpath.last_layer import last_layer_rows, pruning
from ppo.forward import policy_logprobs
from ppo.rollout import HFRolloutEngine, SamplingParams

VOCAB = 40


pytestmark = pytest.mark.usefixtures("fresh_gate")


def qwen3(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=0,
    )
    return transformers.Qwen3ForCausalLM(config).eval()


def gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)
    ).eval()


def batch():
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def fast_path_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, gate.FastPathWarning)]


def test_every_fast_path_passes_its_self_check_on_the_architectures_it_knows():
    model = qwen3()
    state = torch.random.get_rng_state()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for name in ("prune_last_layer", "lean_decode", "kv_cache"):
            assert gate.fast_path_allowed(name, model)
        assert gate.fast_path_allowed("onednn_linear")
    assert fast_path_warnings(record) == []
    assert set(gate.verdicts().values()) == {"on"}
    assert torch.equal(torch.random.get_rng_state(), state)  # the checks leave the random stream alone


def test_the_verdict_is_taken_once_per_architecture(monkeypatch):
    calls = []
    original = gate._judge
    monkeypatch.setattr(gate, "_judge", lambda name, model: calls.append(name) or original(name, model))
    for _ in range(3):
        gate.fast_path_allowed("kv_cache", qwen3())
    assert calls == ["kv_cache"]


# --- prune_last_layer -------------------------------------------------------------------------


def logprobs_with_pruning(model, prune: bool):
    ids, mask = batch()
    with pruning(prune), torch.no_grad():
        return policy_logprobs(model, ids, mask, 4, 1.0)[0]


def test_prune_last_layer_turns_off_when_the_stock_layer_computes_something_else(monkeypatch):
    model = qwen3()
    stock_forward = modeling_qwen3.Qwen3DecoderLayer.forward

    def drifted(self, hidden_states, *args, **kwargs):  # a release whose layer computes differently
        out = stock_forward(self, hidden_states, *args, **kwargs)
        return (out[0] + 0.5, *out[1:]) if isinstance(out, tuple) else out + 0.5

    monkeypatch.setattr(modeling_qwen3.Qwen3DecoderLayer, "forward", drifted)
    with pytest.warns(gate.FastPathWarning, match="'prune_last_layer' is off for qwen3: it disagreed with the stock"):
        gated = logprobs_with_pruning(model, prune=True)
    stock = logprobs_with_pruning(model, prune=False)
    assert torch.equal(gated, stock)  # the stock layer ran


def test_prune_last_layer_turns_off_for_an_unknown_architecture():
    ids, mask = batch()
    with pytest.warns(gate.FastPathWarning, match="'prune_last_layer' is off for gpt2: model type 'gpt2'"):
        with last_layer_rows(gpt2(), torch.tensor([3, 4])):
            pass


def test_prune_last_layer_turns_off_outside_the_tested_window(monkeypatch):
    model = qwen3()
    monkeypatch.setitem(gate.TESTED_WINDOW, "transformers", ("0.1", "0.2"))
    seen = []
    model.model.layers[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    with pytest.warns(gate.FastPathWarning, match=r"transformers \S+ is outside the tested window \(>= 0.1, < 0.2\)"):
        gated = logprobs_with_pruning(model, prune=True)
    assert seen == [9]  # the whole layer, every position
    assert torch.equal(gated, logprobs_with_pruning(model, prune=False))


# --- lean_decode and kv_cache --------------------------------------------------------------------


def sample(model, lean_decode: bool):
    ids, mask = batch()
    prompts = PromptBatch(ids, mask, texts=["", ""], extras={}, seeds=[11, 12])
    engine = HFRolloutEngine(model, _Tokenizer(), lean_decode=lean_decode)
    rollout = engine.generate(prompts, SamplingParams(max_new_tokens=5, stop_token_ids=(1,)))
    return engine, rollout.response_ids, rollout.logprobs


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 1


def test_lean_decode_turns_off_when_the_stock_mlp_computes_something_else(monkeypatch):
    model = qwen3()
    stock_forward = modeling_qwen3.Qwen3MLP.forward
    monkeypatch.setattr(modeling_qwen3.Qwen3MLP, "forward", lambda self, x: 2.0 * stock_forward(self, x))
    with pytest.warns(gate.FastPathWarning, match="'lean_decode' is off for qwen3: it disagreed"):
        engine, tokens, logprobs = sample(model, lean_decode=True)
    assert engine.lean_decoder is None
    _, stock_tokens, stock_logprobs = sample(model, lean_decode=False)
    assert torch.equal(tokens, stock_tokens) and torch.equal(logprobs, stock_logprobs)


def test_lean_decode_turns_off_for_an_unknown_architecture_or_version(monkeypatch):
    with pytest.warns(gate.FastPathWarning, match="'lean_decode' is off for gpt2: model type 'gpt2'"):
        assert sample(gpt2(), lean_decode=True)[0].lean_decoder is None
    monkeypatch.setitem(gate.TESTED_WINDOW, "torch", ("99.0", "100.0"))
    with pytest.warns(gate.FastPathWarning, match="'lean_decode' is off for qwen3: torch .* outside the tested window"):
        assert sample(qwen3(), lean_decode=True)[0].lean_decoder is None


def test_kv_cache_turns_off_when_ours_disagrees_with_the_stock_forward(monkeypatch):
    model = qwen3()
    update = PreallocatedLayer.update

    def stale(self, key_states, value_states, *args, **kwargs):  # as if a release changed the protocol
        keys, values = update(self, key_states, value_states, *args, **kwargs)
        return keys, values * 0.5

    monkeypatch.setattr(PreallocatedLayer, "update", stale)
    with pytest.warns(gate.FastPathWarning, match="'kv_cache' is off for qwen3"):
        cache = rollout_cache(model, 16)
    assert not any(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    monkeypatch.setattr(PreallocatedLayer, "update", update)
    _, stock_tokens, stock_logprobs = sample(model, lean_decode=False)  # transformers' cache, verdict kept
    gate.reset()
    _, our_tokens, our_logprobs = sample(qwen3(), lean_decode=False)  # our cache again, after a reset
    assert torch.equal(stock_tokens, our_tokens)
    torch.testing.assert_close(stock_logprobs, our_logprobs)


def test_kv_cache_turns_off_outside_the_tested_window(monkeypatch):
    monkeypatch.setitem(gate.TESTED_WINDOW, "transformers", ("99.0", "100.0"))
    with pytest.warns(gate.FastPathWarning, match="'kv_cache' is off for qwen3: transformers"):
        cache = kv_cache_module.rollout_cache(qwen3(), 16)
    assert type(cache) is transformers.DynamicCache and not any(
        isinstance(layer, PreallocatedLayer) for layer in cache.layers
    )


# --- onednn_linear -------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
def test_onednn_linear_turns_off_when_it_disagrees_with_torch(monkeypatch):
    assert onednn_linear.resolve_fp32_matmul("onednn", torch.device("cpu")) == "onednn"
    gate.reset()
    real = onednn_linear.onednn_mm
    monkeypatch.setattr(onednn_linear, "onednn_mm", lambda a, b_t, bias=None: real(a, b_t, bias) * 1.01)
    with pytest.warns(gate.FastPathWarning, match="'onednn_linear' is off: it disagreed"):
        assert onednn_linear.resolve_fp32_matmul("onednn", torch.device("cpu")) == "mkl"


def test_onednn_linear_turns_off_outside_the_tested_window(monkeypatch):
    monkeypatch.setitem(gate.TESTED_WINDOW, "torch", ("1.0", "1.1"))
    with pytest.warns(gate.FastPathWarning, match="'onednn_linear' is off: torch"):
        kernel = onednn_linear.resolve_fp32_matmul("onednn", torch.device("cpu"))
    assert kernel == "mkl"


def test_a_one_layer_model_gets_a_one_layer_twin():
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    twin = gate.tiny_twin(config)
    assert twin.config.num_hidden_layers == 1 and len(twin.model.layers) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert gate.fast_path_allowed("kv_cache", transformers.Qwen3ForCausalLM(config))
    assert fast_path_warnings(record) == []
