"""The reward-model recipe on tiny Qwen3 models built locally: loss, learning, saving, checks."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import yaml

from ppo.collate import collate
from ppo.config import RewardConfig
from ppo.demo.tiny import TinyModelSpec, build_reward_model, build_tokenizer
from ppo.forward import sequence_scores
from ppo.preference import encode_pairs, evaluate_pairs, pairwise_accuracy, pairwise_loss
from ppo.reward_stage import train_reward_model
from ppo.run_inputs import reward_model_from_policy
from ppo.stage import OutputDirError
from ppo.train_reward import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

WORDS = [f"w{i}" for i in range(29)] + ["user", "assistant", ":"]
MARKER = "w25"


def marker_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen holds the marker word somewhere; rejected is random words without it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = [f"w{rng.randrange(2, 20)}" for _ in range(3)]
        chosen.insert(rng.randrange(4), MARKER)
        rejected = [f"w{rng.randrange(2, 20)}" for _ in range(4)]
        rows.append(
            {"prompt": f"w1 w{rng.randrange(2, 20)}", "chosen": " ".join(chosen), "rejected": " ".join(rejected)}
        )
    return rows


def small_config(tmp_path, **overrides) -> RewardConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), learning_rate=1e-3, batch_size=8, lr_scheduler="constant", progress_bar=False
    )
    values.update(overrides)
    return RewardConfig(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One reward-model run on the marker pairs, shared by the tests that inspect its results."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tokenizer = build_tokenizer(WORDS)
    model = build_reward_model(tokenizer, TinyModelSpec(), seed=1)
    config = small_config(tmp_path_factory.mktemp("reward"), num_epochs=2, eval_fraction=0.25)
    metrics = train_reward_model(config, model, tokenizer, rows=marker_pairs(96))
    return config, model, tokenizer, metrics


# --- loss --------------------------------------------------------------------------------------


def test_pairwise_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    # -log sigmoid(x) = log(1 + exp(-x)), with x = r_c - r_r - margin
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]
    assert pairwise_loss(chosen, rejected).tolist() == pytest.approx(expected, abs=1e-6)
    with_margin = [math.log1p(math.exp(-(1.0 - 0.5))), math.log1p(math.exp(-(-0.5 - 0.5)))]
    assert pairwise_loss(chosen, rejected, margin=0.5).tolist() == pytest.approx(with_margin, abs=1e-6)
    centered = [with_margin[0] + 0.1 * 1.0**2, with_margin[1] + 0.1 * 1.5**2]
    assert pairwise_loss(chosen, rejected, margin=0.5, center_coef=0.1).tolist() == pytest.approx(centered, abs=1e-6)


@pytest.mark.parametrize("margin", [0.0, 1.5])
def test_margin_moves_the_loss_of_a_fixed_batch_as_the_formula_says(tiny_reward_model, tiny_tokenizer, margin):
    rows = marker_pairs(3)

    # Reference scores: each sequence alone, unpadded.
    def score(ids: list[int]) -> float:
        return sequence_scores(tiny_reward_model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()

    gaps = [score(chosen) - score(rejected) for chosen, rejected in encode_pairs(tiny_tokenizer, rows, 64)]
    expected = sum(math.log1p(math.exp(-(g - margin))) for g in gaps) / len(gaps)
    result = evaluate_pairs(tiny_reward_model, tiny_tokenizer, rows, batch_size=2, margin=margin)
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["accuracy"] == pytest.approx(sum(g > 0 for g in gaps) / len(gaps))


# --- training and outputs ----------------------------------------------------------------------


def test_held_out_accuracy_rises(trained):
    _, model, tokenizer, metrics = trained
    assert metrics["eval_rows"] == 24 and metrics["train_rows"] == 72 and metrics["steps"] == 2 * 9
    assert metrics["accuracy_before"] < 0.8
    assert metrics["accuracy"] >= 0.9
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert pairwise_accuracy(model, tokenizer, marker_pairs(40, seed=7)) >= 0.9  # unseen pairs too


def test_saved_model_loads_as_a_one_label_classifier_and_scores_the_same(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config, model, _, metrics = trained
    final = f"{config.output_dir}/final"
    loaded = AutoModelForSequenceClassification.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tokenizer.pad_token_id
    ids = [tokenizer(t)["input_ids"] for t in ["w1 w2 w25 <eos>", "w3 <eos>", "w4 w5 w6 w7 <eos>"]]
    batch = collate(ids, tokenizer.pad_token_id)  # right padding
    with torch.no_grad():
        ours = sequence_scores(model, batch.input_ids, batch.attention_mask)
        assert torch.allclose(sequence_scores(loaded, batch.input_ids, batch.attention_mask), ours, atol=1e-6)
        # Standalone use without ppo: transformers' own pooling finds the same last token.
        assert torch.allclose(
            loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0], ours, atol=1e-5
        )
    assert yaml.safe_load(open(f"{config.output_dir}/config.yaml"))["eval_fraction"] == 0.25
    last = json.loads(open(f"{config.output_dir}/metrics.jsonl").read().splitlines()[-1])
    assert last["accuracy"] == pytest.approx(metrics["accuracy"])


def test_init_from_policy_copies_the_backbone_exactly(tiny_policy, tiny_tokenizer, tmp_path):
    for source in (tiny_policy, tmp_path / "policy"):
        if not isinstance(source, torch.nn.Module):
            tiny_policy.save_pretrained(source)
            tiny_tokenizer.save_pretrained(source)
        reward = reward_model_from_policy(source)
        assert reward.config.num_labels == 1 and reward.score.weight.shape == (1, 64)
        assert torch.equal(
            reward.model.layers[1].mlp.down_proj.weight, tiny_policy.model.layers[1].mlp.down_proj.weight
        )
        assert torch.equal(reward.model.embed_tokens.weight, tiny_policy.model.embed_tokens.weight)
    # Through the recipe: a causal-LM directory with init_from_policy trains and saves a classifier.
    config = small_config(
        tmp_path, model_name_or_path=str(tmp_path / "policy"), init_from_policy=True, eval_fraction=0.0
    )
    metrics = train_reward_model(config, rows=marker_pairs(8))
    assert metrics["steps"] == 1 and metrics["accuracy"] is None
    assert json.load(open(tmp_path / "out" / "final" / "config.json"))["architectures"] == [
        "Qwen3ForSequenceClassification"
    ]


def test_a_causal_lm_given_as_reward_model_is_refused(tiny_policy, tiny_tokenizer, tmp_path):
    tiny_policy.save_pretrained(tmp_path / "policy")
    tiny_tokenizer.save_pretrained(tmp_path / "policy")
    config = small_config(tmp_path, model_name_or_path=str(tmp_path / "policy"))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM, not a sequence classifier.*init_from_policy=true"):
        train_reward_model(config, rows=marker_pairs(8))
    with pytest.raises(ValueError, match="not a sequence classifier.*init_from_policy=true"):
        train_reward_model(small_config(tmp_path), tiny_policy, tiny_tokenizer, rows=marker_pairs(8))
    two_labels = build_reward_model(tiny_tokenizer)
    two_labels.config.num_labels = 2
    with pytest.raises(ValueError, match="has 2 labels"):
        train_reward_model(small_config(tmp_path), two_labels, tiny_tokenizer, rows=marker_pairs(8))
    assert not (tmp_path / "out").exists()  # nothing written


def test_refuses_a_different_run_in_output_dir(tiny_tokenizer, tmp_path):
    model = build_reward_model(tiny_tokenizer, TinyModelSpec(), seed=1)
    train_reward_model(small_config(tmp_path, save_final=False), model, tiny_tokenizer, rows=marker_pairs(8))
    with pytest.raises(OutputDirError, match="overwrite=true"):
        train_reward_model(small_config(tmp_path, margin=1.0), model, tiny_tokenizer, rows=marker_pairs(8))
    train_reward_model(
        small_config(tmp_path, margin=1.0, overwrite=True, save_final=False),
        model,
        tiny_tokenizer,
        rows=marker_pairs(8),
    )
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["margin"] == 1.0


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_trains_from_jsonl_and_rejects_misspelt_keys(tiny_reward_model, tiny_tokenizer, tmp_path, capsys):
    assert main([f"output_dir={tmp_path / 'out'}", "centre_rewards_coefficient=0.01"]) == 2
    assert "Did you mean 'center_rewards_coefficient'" in capsys.readouterr().err
    pytest.importorskip("ppo.formats", reason="ppo.formats (JSONL loading) has not landed yet")
    tiny_reward_model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in marker_pairs(16)))
    config_file = tmp_path / "reward.yaml"
    config_file.write_text(
        f"model_name_or_path: {tmp_path / 'rm'}\ndata: {data}\nprogress_bar: false\neval_fraction: 0.25\n"
    )
    assert main(["--config", str(config_file), f"output_dir={tmp_path / 'out'}", "learning_rate=0.001"]) == 0, (
        capsys.readouterr().err
    )
    assert "held-out accuracy" in capsys.readouterr().out
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_shared_responses_are_scored_once_with_the_same_scores_and_gradients(tiny_reward_model, tiny_tokenizer):
    """K responses to one prompt as all their pairs: the deduplicated pass (one row per distinct
    response) gives the scores and the gradient of scoring every pair's two rows separately."""
    from ppo.preference import pair_scores

    responses = ["w3 w4", "w5", "w6 w7 w8", "w9"]
    rows = [
        {"prompt": "w1 w2", "chosen": a, "rejected": b} for i, a in enumerate(responses) for b in responses[i + 1 :]
    ]
    pairs = encode_pairs(tiny_tokenizer, rows, 64)
    pad = tiny_tokenizer.pad_token_id
    calls = []

    def counting_scorer(ids, mask):
        calls.append(ids.shape[0])
        return sequence_scores(tiny_reward_model, ids, mask)

    grads = []
    for scorer in (counting_scorer, None):
        tiny_reward_model.zero_grad()
        if scorer is None:  # the straightforward path: each pair's two sequences on their own
            scored = [pair_scores(tiny_reward_model, [p], pad) for p in pairs]
            chosen, rejected = torch.cat([c for c, _ in scored]), torch.cat([r for _, r in scored])
        else:
            chosen, rejected = pair_scores(tiny_reward_model, pairs, pad, scorer)
            deduped = (chosen.detach(), rejected.detach())
        pairwise_loss(chosen, rejected).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_reward_model.parameters() if p.grad is not None]))
    assert calls == [len(responses)]  # 6 pairs, 12 sequences, 4 distinct
    assert torch.allclose(deduped[0], chosen.detach(), atol=1e-5) and torch.allclose(
        deduped[1], rejected.detach(), atol=1e-5
    )
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_prompt_grouped_steps_keep_a_prompts_pairs_together_and_cover_every_pair():
    from ppo.reward_stage import prompt_grouped_steps

    prompts = ["a", "b", "a", "c", "b", "a", "", ""]
    epochs = {}
    for epoch, group in prompt_grouped_steps(prompts, 3, num_epochs=2, seed=0):
        epochs.setdefault(epoch, []).extend(group)
    for order in epochs.values():
        assert sorted(order) == list(range(len(prompts)))
        named = [prompts[i] for i in order if prompts[i]]
        runs = [p for i, p in enumerate(named) if i == 0 or named[i - 1] != p]
        assert len(runs) == len(set(named))  # each prompt's pairs in one contiguous run
    assert epochs[0] != epochs[1]  # reshuffled per epoch


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_mlp_trains_the_same_bits(tiny_tokenizer, tmp_path, precision, quiet_bf16_emulation):
    runs = []
    for fused in (False, True):
        model = build_reward_model(tiny_tokenizer, TinyModelSpec(hidden_size=32, num_layers=2), seed=1)
        config = small_config(tmp_path / str(fused), num_epochs=2, fused_mlp=fused, precision=precision)
        metrics = train_reward_model(config, model, tiny_tokenizer, rows=marker_pairs(16))
        runs.append((model, {k: v for k, v in metrics.items() if k != "output_dir"}))
    (stock, stock_metrics), (fused, fused_metrics) = runs
    assert "forward" in vars(fused.model.layers[0].mlp) and "forward" not in vars(stock.model.layers[0].mlp)
    assert fused_metrics == stock_metrics and stock_metrics["precision"] == precision
    for p, q in zip(fused.parameters(), stock.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_norm_trains_the_same_to_rounding(tiny_tokenizer, tmp_path, precision, quiet_bf16_emulation):
    runs = []
    for fused in (False, True):
        model = build_reward_model(tiny_tokenizer, TinyModelSpec(hidden_size=32, num_layers=2), seed=1)
        config = small_config(tmp_path / str(fused), num_epochs=2, fused_norm=fused, precision=precision)
        metrics = train_reward_model(config, model, tiny_tokenizer, rows=marker_pairs(16))
        runs.append((model, {k: v for k, v in metrics.items() if k != "output_dir"}))
    (stock, stock_metrics), (fused, fused_metrics) = runs
    assert "forward" in vars(fused.model.norm) and "forward" not in vars(stock.model.norm)
    assert fused_metrics.pop("precision") == stock_metrics.pop("precision") == precision
    assert fused_metrics.keys() == stock_metrics.keys()
    # In bf16 a last-bit difference of the fp32 norm can round a matmul's input to the next bf16
    # value: the two runs agree to bf16's rounding, not fp32's.
    rel, atol = (1e-4, 1e-5) if precision == "fp32" else (2e-2, 1e-3)
    for key, value in stock_metrics.items():
        assert fused_metrics[key] == pytest.approx(value, rel=rel, abs=1e-6), key
    # AdamW's step is ~lr whatever the gradient's size: where a gradient is ~0, rounding moves a
    # weight by a fraction of the learning rate
    for p, q in zip(fused.parameters(), stock.parameters()):
        torch.testing.assert_close(p, q, rtol=rel, atol=atol)
