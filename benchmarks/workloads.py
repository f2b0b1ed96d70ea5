"""The benchmark workloads W1-W4 (see BENCHMARKS.md); W1-W3 built with ppo-rlhf's own code.

Everything here must produce exactly the workload that the TRL anchor (`trl_ppo_bench.py`) builds,
so that the two systems are compared on the same models, prompts and sizes:

  * tokenizer: word level, `<pad>`=0, `<eos>`=1, `<unk>`=2, then `t3`..`t{V-1}`, left padding;
  * models: random-init Qwen3, fp32. Policy seeded with `seed`, reference = copy of the policy;
    reward model seeded with `seed + 1`, value model = copy of the reward model;
  * prompts: `numpy.random.default_rng(seed).integers(3, V, (B * iterations, P))`, batch i being
    rows i*B .. i*B+B-1; no stop token, so every response runs to exactly R tokens.

W4 is a real checkpoint (SmolLM2-135M-Instruct) instead of random toys: `real_model.py` builds it.

The FLOP count (`workload_flops`) is the anchor's convention, written out below; the same number
is used for both systems, so "achieved GFLOP/s" is a speed figure on a common scale.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Workload:
    """V vocab, H hidden, L layers, B prompts per iteration, P prompt tokens, R response tokens."""

    name: str
    vocab: int
    hidden: int
    layers: int
    batch: int
    prompt_len: int
    response_len: int
    ppo_epochs: int
    mini_batches: int  # optimizer steps per epoch; mini-batch = batch / mini_batches samples
    real_model: bool = False  # models, tokenizer and prompts from a model directory (real_model.py)

    @property
    def mini_batch_size(self) -> int:
        return self.batch // self.mini_batches

    @property
    def tokens_per_iter(self) -> int:
        """Prompt + response tokens of one rollout (the tokens/s numerator, as in the anchor)."""
        return self.batch * (self.prompt_len + self.response_len)

    def as_dict(self) -> dict:
        return asdict(self)


W1 = Workload(
    "W1", vocab=4096, hidden=256, layers=4, batch=16, prompt_len=32, response_len=32, ppo_epochs=4, mini_batches=2
)
W2 = Workload(
    "W2", vocab=8192, hidden=512, layers=8, batch=16, prompt_len=64, response_len=64, ppo_epochs=4, mini_batches=2
)
# W3 is W1 with long responses and a single optimizer step: it stresses generation.
W3 = replace(W1, name="W3", response_len=256, ppo_epochs=1, mini_batches=1)
# W4: SmolLM2-135M-Instruct's weights (V, H, L are its own), a large vocabulary, 30 layers.
W4 = Workload(
    "W4",
    vocab=49152,
    hidden=576,
    layers=30,
    batch=16,
    prompt_len=64,
    response_len=64,
    ppo_epochs=4,
    mini_batches=2,
    real_model=True,
)
WORKLOADS = {w.name: w for w in (W1, W2, W3, W4)}
DEFAULT_WORKLOADS = "W1,W2,W3"  # W4 takes minutes per iteration on 2 cores: asked for by name
# `--smoke`: the same pipeline at toy size, for a test that finishes in seconds.
SMOKE = Workload(
    "smoke", vocab=256, hidden=64, layers=2, batch=4, prompt_len=8, response_len=8, ppo_epochs=2, mini_batches=2
)


def trl_bench_args(w: Workload, model_dir: str | None = None, prompts_json: str | None = None) -> list[str]:
    """Arguments of `trl_ppo_bench.py` that reproduce workload `w` (W3: W1 with overrides; W4: its
    model directory and the prompts file both systems read)."""
    base = w.name if w.name in ("W2", "W4") else "W1"
    args = ["--workload", base]
    reference = WORKLOADS[base]
    for field in ("vocab", "hidden", "layers", "batch", "prompt_len", "response_len", "ppo_epochs", "mini_batches"):
        if getattr(w, field) != getattr(reference, field):
            args += [f"--{field.replace('_', '-')}", str(getattr(w, field))]
    if w.real_model:
        if model_dir is None or prompts_json is None:
            raise ValueError(f"{w.name} needs its model directory and prompts file for the TRL anchor")
        args += ["--model-dir", str(model_dir), "--prompts-json", str(prompts_json)]
    return args


# ---- builders ---------------------------------------------------------------------------------


def build_tokenizer(w: Workload):
    """The word-level tokenizer: ids 0..2 special, then word `t{i}` has id i."""
    from ppo.demo.tiny import build_tokenizer as tiny_tokenizer

    tokenizer = tiny_tokenizer([f"t{i}" for i in range(3, w.vocab)], chat_template=False)
    assert len(tokenizer) == w.vocab and tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    return tokenizer


def build_models(w: Workload, tokenizer, seed: int = 0):
    """(policy, reference, reward model, value model), all fp32, seeded as the anchor seeds them."""
    if w.real_model:
        raise ValueError(f"{w.name} loads a real model: see real_model.build_models")
    from ppo.demo.tiny import TinyModelSpec, build_policy, build_reward_model

    # head_dim 64 gives H/64 query heads and H/128 key-value heads (the tiny builder halves them).
    spec = TinyModelSpec(
        hidden_size=w.hidden, num_layers=w.layers, head_dim=64, intermediate_multiple=3, max_position_embeddings=1024
    )
    policy = build_policy(tokenizer, spec, seed=seed)
    reward_model = build_reward_model(tokenizer, spec, seed=seed + 1)
    reference = copy.deepcopy(policy)
    value_model = copy.deepcopy(reward_model)
    for model in (policy, reference, reward_model, value_model):
        assert all(p.dtype.is_floating_point and p.element_size() == 4 for p in model.parameters())
    cfg = policy.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (w.hidden // 64, max(1, w.hidden // 128)), (
        "config drifted from the anchor"
    )
    return policy, reference, reward_model, value_model


def build_prompts(w: Workload, tokenizer, iterations: int, seed: int = 0) -> list[list[str]]:
    """`iterations` batches of B prompt strings of exactly P tokens each (checked by re-tokenizing)."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(3, w.vocab, size=(w.batch * iterations, w.prompt_len), dtype=np.int64)
    texts = [" ".join(f"t{i}" for i in row) for row in ids]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if not np.array_equal(np.asarray(encoded), ids):
        raise RuntimeError("prompt text does not tokenize back to the sampled ids")
    return [texts[i * w.batch : (i + 1) * w.batch] for i in range(iterations)]


def flop_params(policy, value_model) -> tuple[int, int]:
    """(n_lm, n_cls): parameters that cost 2 FLOPs per token in a forward pass, counted from the
    models themselves (W4: SmolLM2's real parameter counts).

    n_lm  = all policy parameters with the tied embedding counted once: the embedding lookup is
            free but the tied LM-head matmul (V*H) is real compute, so the two cancel (an untied
            embedding is not compute and is left out).
    n_cls = value-model parameters minus the embedding (V*H), score head (H) included.
    """
    embedding = policy.get_input_embeddings().weight
    n_lm = sum(p.numel() for p in policy.parameters())
    if embedding is not policy.get_output_embeddings().weight:
        n_lm -= embedding.numel()
    n_cls = sum(p.numel() for p in value_model.parameters()) - value_model.get_input_embeddings().weight.numel()
    return n_lm, n_cls


def workload_flops(w: Workload, n_lm: int, n_cls: int) -> dict[str, float]:
    """Analytic FLOPs of one PPO iteration, by phase (the anchor's convention).

    With S = P + R and E = ppo_epochs:
      generation      2 * n_lm * B * (P + R - 1)   prefill P tokens, then R - 1 cached steps
      ref forward     2 * n_lm * B * S             (LM head counted on every position)
      reward, value   2 * n_cls * B * S  each
      update          6 * (n_lm + n_cls) * B * S * E   forward + backward = 3 forwards
    plus attention (QK^T and AV): 4 * d_attn * L * (context length) per token and layer, with
    d_attn = (H/64) * 64, i.e. 4*d_attn*L*B*S(S+1)/2 per full forward and the growing context
    for generation; x3E in the update for each of the two trained models.
    Work one system skips or repeats (ppo-rlhf's extra policy forward while scoring, its LM head
    on response positions only) is deliberately not counted: the numerator is the workload.
    """
    B, P, R, E, L = w.batch, w.prompt_len, w.response_len, w.ppo_epochs, w.layers
    S = P + R
    d_attn = (w.hidden // 64) * 64
    attn_full = 4 * d_attn * L * B * S * (S + 1) / 2
    attn_gen = 4 * d_attn * L * B * (P * (P + 1) / 2 + sum(P + t for t in range(1, R)))
    generation = 2 * n_lm * B * (P + R - 1) + attn_gen
    score = 2 * n_lm * B * S + 2 * 2 * n_cls * B * S + 3 * attn_full
    update = 6 * (n_lm + n_cls) * B * S * E + 2 * 3 * E * attn_full
    return {"generate": generation, "score": score, "update": update, "total": generation + score + update}
