"""The last decoder layer run at the read positions only (`ppo.fastpath.last_layer`) against the whole layer:
the same log-probs, entropies, hidden states, values, scores and gradients, on the three model
families it knows, both attention implementations, with and without padding."""

from __future__ import annotations

import pytest
import torch
import transformers

from ppo.forward import policy_logprobs, sequence_scores, token_values
from ppo.fastpath.compat import enable_activation_checkpointing
from ppo.fastpath.last_layer import _prunable_last_layer, last_layer_rows, pruning

FAMILIES = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, transformers.Qwen3ForSequenceClassification),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, transformers.Qwen2ForSequenceClassification),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, transformers.LlamaForSequenceClassification),
}
RESPONSE = 5


def build(family: str, attn: str = "sdpa", seed: int = 0):
    config_class, lm_class, cls_class = FAMILIES[family]
    config = config_class(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, num_labels=1, attn_implementation=attn,
    )
    torch.manual_seed(seed)
    # float64 where transformers allows it (its eager attention gives NaN at padding in float64):
    # the two paths sum in different orders, and float32 rounding would hide small errors.
    dtype = torch.float64 if attn == "sdpa" else torch.float32
    return lm_class(config).to(dtype), cls_class(config).to(dtype)


def batch(padded: bool):
    ids = torch.randint(3, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:  # left-padded prompts of different lengths, one response that ended early
        mask[0, :3] = 0
        mask[1, :1] = 0
        mask[2, -2:] = 0
    return ids, mask


def run_everything(policy, critic, ids, mask):
    """Every read of the models the trainer makes, and the gradients of their sum."""
    policy.zero_grad(set_to_none=True)
    critic.zero_grad(set_to_none=True)
    logprobs, entropy, hidden = policy_logprobs(policy, ids, mask, RESPONSE, 0.7, with_entropy=True, output_hidden=True)
    values = token_values(critic, ids, mask, RESPONSE)
    scores = sequence_scores(critic, ids, mask)
    (logprobs.sum() + entropy.sum() + hidden.square().sum() + values.sum() + scores.sum()).backward()
    grads = [p.grad for m in (policy, critic) for p in m.parameters()]
    return [logprobs, entropy, hidden, values, scores], grads


def rows_seen_by_last_mlp(model):
    """A list that gets the number of positions the last layer's MLP is fed, per call."""
    seen = []
    layer = model.model.layers[-1] if hasattr(model, "model") else model.layers[-1]
    layer.mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [True, False])
def test_pruned_last_layer_matches_the_whole_layer(family, attn, padded):
    policy, critic = build(family, attn)
    ids, mask = batch(padded)
    seen = rows_seen_by_last_mlp(policy)
    with pruning(False):
        full_out, full_grads = run_everything(policy, critic, ids, mask)
    assert seen == [ids.shape[1]]
    pruned_out, pruned_grads = run_everything(policy, critic, ids, mask)
    assert seen[1:] == [RESPONSE]  # the pruned path really ran
    # float64: RMSNorm still computes in float32, so ~1e-8 relative; a wrong position or mask
    # shows at 1e-2. float32: rounding, scaled by each tensor's largest entry.
    tol = 1e-6 if full_out[0].dtype == torch.float64 else 1e-4
    for full, pruned in zip(full_out + full_grads, pruned_out + pruned_grads):
        assert pruned is not None  # every weight of the last layer still learns
        torch.testing.assert_close(pruned, full, rtol=tol, atol=tol * float(full.abs().max()))


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_pruned_last_layer_under_bf16_autocast(weights):
    policy, critic = (m.to(getattr(torch, weights)) for m in build("qwen3"))
    ids, mask = batch(padded=True)
    seen = rows_seen_by_last_mlp(policy)
    results = []
    for prune in (False, True):
        with pruning(prune), torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run_everything(policy, critic, ids, mask))
    assert seen == [ids.shape[1], RESPONSE]
    (full_out, full_grads), (pruned_out, pruned_grads) = results
    for full, pruned in zip(full_out + full_grads, pruned_out + pruned_grads):
        assert pruned.dtype == full.dtype
        torch.testing.assert_close(pruned, full, rtol=2e-2, atol=2e-2 * float(full.abs().max()))


def test_the_reward_model_reads_only_the_last_real_tokens():
    _, critic = build("qwen3")
    ids, mask = batch(padded=True)
    seen = rows_seen_by_last_mlp(critic.model)
    sequence_scores(critic, ids, mask)
    assert seen == [2]  # rows end at column 11 (twice) and 9


def test_the_layer_is_restored_after_the_block_even_on_error():
    policy, _ = build("qwen3")
    layer = policy.model.layers[-1]
    with pytest.raises(RuntimeError, match="boom"), last_layer_rows(policy, torch.tensor([3, 4])):
        assert "forward" in vars(layer)
        raise RuntimeError("boom")
    assert "forward" not in vars(layer)


def test_unknown_or_checkpointed_models_run_the_whole_layer():
    policy, _ = build("qwen3")
    assert _prunable_last_layer(policy) is policy.model.layers[-1]
    layer = policy.model.layers[-1]
    hooked = layer.forward  # a per-instance forward of someone else's (as accelerate's offload hooks set)
    layer.forward = hooked
    with last_layer_rows(policy, torch.tensor([3, 4])):
        assert layer.forward is hooked
    assert layer.forward is hooked
    del layer.forward
    enable_activation_checkpointing(policy)
    assert _prunable_last_layer(policy) is None  # recomputation in backward runs outside the block
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert _prunable_last_layer(gpt2) is None
    ids, mask = batch(padded=True)
    with pruning(True):
        logprobs, _, _ = policy_logprobs(gpt2, ids, mask, RESPONSE, 1.0)
    assert logprobs.shape == (3, RESPONSE)


def test_calls_it_cannot_prune_run_the_whole_layer():
    """With a cache (as in sampling's prefill) the block steps aside instead of failing."""
    policy, _ = build("qwen3")
    ids, _ = batch(padded=False)
    seen = rows_seen_by_last_mlp(policy)
    with torch.no_grad():
        expected = policy(input_ids=ids, use_cache=True).logits
        with last_layer_rows(policy, torch.tensor([10, 11])):
            out = policy(input_ids=ids, use_cache=True).logits
    assert seen == [ids.shape[1], ids.shape[1]]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
