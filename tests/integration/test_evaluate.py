"""`ppo.measures` and the `ppo.evaluate` recipe on tiny models built locally: KL, accuracy, best-of-n,
perplexity, and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from ppo.demo.tiny import TinyModelSpec, build_policy
from ppo.evaluate import main
from ppo.measures import evaluate_policy, normalise_answer, perplexity
from ppo.rewards.builtin import exact_match
from ppo.rollout import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

PROMPTS = ["w3 w4", "w5", "w6 w7 w8", "w9 w10", "w11", "w12 w13"]


def sampling(tokenizer, **kw) -> SamplingParams:
    values = dict(max_new_tokens=5, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
    values.update(kw)
    return SamplingParams(**values)


def n_words(completions, **kwargs):
    """A reward function with a known preference: longer responses."""
    return [float(len(c.split())) for c in completions]


# --- KL -----------------------------------------------------------------------------------------


def test_kl_of_a_model_to_itself_is_zero(tiny_policy, tiny_tokenizer):
    result = evaluate_policy(
        tiny_policy,
        tiny_tokenizer,
        PROMPTS,
        ref_model=copy.deepcopy(tiny_policy),
        sampling=sampling(tiny_tokenizer, temperature=0.7),
        seed=0,
    )
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(g["kl"] == pytest.approx(0.0, abs=1e-6) for g in result["generations"])


def test_kl_is_the_log_ratio_of_the_sampled_token_at_the_sampling_temperature(tiny_policy, tiny_tokenizer):
    # Greedy one-token responses: the sampled token is the policy's argmax, so the expected KL
    # can be computed by hand from one forward pass of each model over the prompt.
    ref = build_policy(tiny_tokenizer, TinyModelSpec(), seed=7)
    temperature = 0.7
    result = evaluate_policy(
        tiny_policy,
        tiny_tokenizer,
        PROMPTS,
        ref_model=ref,
        sampling=sampling(tiny_tokenizer, max_new_tokens=1, top_k=1, temperature=temperature),
        seed=0,
    )
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tiny_tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(tiny_policy(ids).logits[0, -1] / temperature, dim=-1)
            ref_lp = torch.log_softmax(ref(ids).logits[0, -1] / temperature, dim=-1)
        token = lp.argmax()
        expected.append((lp[token] - ref_lp[token]).item())
    assert [g["kl"] for g in result["generations"]] == pytest.approx(expected, abs=1e-5)
    assert result["kl"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


# --- accuracy, length, EOS ----------------------------------------------------------------------


def test_accuracy_is_whitespace_normalised_exact_match_as_the_reward_function_sees_it(tiny_policy, tiny_tokenizer):
    params = sampling(tiny_tokenizer)
    first = evaluate_policy(tiny_policy, tiny_tokenizer, PROMPTS, sampling=params, seed=3)
    # Half the rows get their own (re-spaced) sample as the answer, the others an impossible one;
    # the same seed reproduces the same samples.
    rows = [
        {
            "prompt": g["prompt"],
            "answer": "  " + g["completion"].replace(" ", "   ") + " " if i % 2 == 0 else "w0 w0 w0 w0 w0 w0",
        }
        for i, g in enumerate(first["generations"])
    ]
    result = evaluate_policy(tiny_policy, tiny_tokenizer, rows, reward_funcs=[exact_match], sampling=params, seed=3)
    assert [g["completion"] for g in result["generations"]] == [g["completion"] for g in first["generations"]]
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["accuracy"] == pytest.approx(result["rewards/exact_match"])
    assert normalise_answer(" a \n b  ") == "a b"


def test_rows_without_answers_have_no_accuracy_and_lengths_are_counted(tiny_policy, tiny_tokenizer):
    result = evaluate_policy(
        tiny_policy, tiny_tokenizer, PROMPTS, sampling=sampling(tiny_tokenizer, max_new_tokens=3), seed=0
    )
    assert "accuracy" not in result and "reward" not in result and "kl" not in result
    assert result["num_prompts"] == len(result["generations"]) == len(PROMPTS)
    assert 1.0 <= result["response_length"] <= 3.0
    assert 0.0 <= result["eos_fraction"] <= 1.0


# --- best-of-n ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["function", "model"])
def test_best_of_n_keeps_the_highest_scored_of_the_same_n_samples(
    tiny_policy, tiny_tokenizer, tiny_reward_model, source
):
    n = 4
    kwargs = {"reward_funcs": [n_words]} if source == "function" else {"reward_model": tiny_reward_model}
    key = "rewards/n_words" if source == "function" else "reward_model"
    params = sampling(tiny_tokenizer)
    # Each prompt written n times in a row is the batch best-of-n samples from internally, so the
    # same seed draws the very same n samples per prompt.
    repeated = [p for p in PROMPTS for _ in range(n)]
    plain = evaluate_policy(
        tiny_policy, tiny_tokenizer, repeated, sampling=params, seed=5, batch_size=len(repeated), **kwargs
    )
    best = evaluate_policy(
        tiny_policy, tiny_tokenizer, PROMPTS, sampling=params, seed=5, batch_size=len(PROMPTS), best_of_n=n, **kwargs
    )
    name = key.removeprefix("rewards/")
    for i, chosen in enumerate(best["generations"]):
        group = plain["generations"][i * n : (i + 1) * n]
        scores = [g[name] for g in group]
        top = max(range(n), key=lambda j: (scores[j], -j))  # the first of ties, as argmax keeps
        assert chosen[name] == pytest.approx(max(scores))
        assert chosen["completion"] == group[top]["completion"]
    assert best["reward"] >= plain["reward"]
    assert best["kl_best_of_n"] == pytest.approx(math.log(n) - (n - 1) / n)


def test_best_of_n_needs_a_reward(tiny_policy, tiny_tokenizer):
    with pytest.raises(ValueError, match="best_of_n"):
        evaluate_policy(tiny_policy, tiny_tokenizer, PROMPTS, best_of_n=2)


# --- greedy decoding ----------------------------------------------------------------------------


def test_temperature_zero_decodes_greedily_whatever_the_seed(tiny_policy, tiny_tokenizer):
    params = sampling(tiny_tokenizer, temperature=0.0, max_new_tokens=4, stop_token_ids=())
    runs = [evaluate_policy(tiny_policy, tiny_tokenizer, PROMPTS, sampling=params, seed=s) for s in (0, 1)]
    assert [g["completion"] for g in runs[0]["generations"]] == [g["completion"] for g in runs[1]["generations"]]
    # By hand: append the argmax of a full forward (no cache) four times.
    for prompt, generated in zip(PROMPTS, runs[0]["generations"]):
        ids = tiny_tokenizer(prompt)["input_ids"]
        start = len(ids)
        with torch.no_grad():
            for _ in range(4):
                ids.append(int(tiny_policy(torch.tensor([ids])).logits[0, -1].argmax()))
        assert generated["completion"] == tiny_tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_greedy_kl_is_measured_at_temperature_one(tiny_policy, tiny_tokenizer):
    ref = build_policy(tiny_tokenizer, TinyModelSpec(), seed=7)
    params = sampling(tiny_tokenizer, temperature=0.0, max_new_tokens=1, stop_token_ids=())
    result = evaluate_policy(tiny_policy, tiny_tokenizer, PROMPTS, ref_model=ref, sampling=params, seed=0)
    for prompt, generated in zip(PROMPTS, result["generations"]):
        ids = torch.tensor([tiny_tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_policy(ids).logits[0, -1].double(), dim=-1)
            ref_logp = torch.log_softmax(ref(ids).logits[0, -1].double(), dim=-1)
        token = int(logp.argmax())
        assert generated["kl"] == pytest.approx((logp[token] - ref_logp[token]).item(), abs=1e-5)


def test_greedy_refuses_best_of_n(tiny_policy, tiny_tokenizer):
    from ppo.config import ConfigError, EvalConfig

    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate_policy(
            tiny_policy,
            tiny_tokenizer,
            PROMPTS,
            reward_funcs=[n_words],
            sampling=sampling(tiny_tokenizer, temperature=0.0),
            best_of_n=2,
        )
    with pytest.raises(ConfigError, match="best_of_n=2 needs temperature > 0"):
        EvalConfig(model_name_or_path="m", temperature=0.0, best_of_n=2)
    assert EvalConfig(model_name_or_path="m", temperature=0.0).temperature == 0.0


# --- perplexity ---------------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_mean_nll_by_hand(tiny_policy, tiny_tokenizer):
    texts = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11 w12", "w2"]  # the one-token text predicts nothing
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tiny_tokenizer(text)["input_ids"]
            if len(ids) < 2:
                continue
            logp = torch.log_softmax(tiny_policy(torch.tensor([ids])).logits[0].double(), dim=-1)
            for t in range(1, len(ids)):
                nll -= logp[t - 1, ids[t]].item()
                count += 1
    assert count == 2 + 1 + 4
    assert perplexity(tiny_policy, tiny_tokenizer, texts, batch_size=3) == pytest.approx(
        math.exp(nll / count), rel=1e-5
    )


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def saved(tiny_policy, tiny_tokenizer, tiny_reward_model, tmp_path):
    tiny_policy.save_pretrained(tmp_path / "policy")
    tiny_tokenizer.save_pretrained(tmp_path / "policy")
    tiny_reward_model.save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": p, "answer": "w1"}) for p in PROMPTS), encoding="utf-8"
    )
    (tmp_path / "texts.txt").write_text("w3 w4 w5\nw6 w7\n", encoding="utf-8")
    return tmp_path


def test_cli_writes_eval_json(saved, capsys):
    out = saved / "eval"
    args = [
        f"model_name_or_path={saved / 'policy'}",
        f"ref_model_path={saved / 'policy'}",
        f"reward_model_path={saved / 'rm'}",
        "reward_funcs=[exact_match]",
        f"prompts_file={saved / 'prompts.jsonl'}",
        f"text_file={saved / 'texts.txt'}",
        "max_new_tokens=4",
        "best_of_n=2",
        "num_samples=4",
        f"output_dir={out}",
    ]
    assert main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["num_prompts"] == len(result["generations"]) == 4
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    for key in (
        "reward",
        "rewards/reward_model",
        "rewards/exact_match",
        "accuracy",
        "perplexity",
        "eos_fraction",
        "response_length",
    ):
        assert math.isfinite(result[key]), key
    assert (out / "config.yaml").is_file()
    [run] = json.loads((out / "run.json").read_text())["starts"]  # what the numbers came from
    assert run["precision"] == {"asked": None, "ran": "fp32"} and set(run["attention"]) == {
        "policy",
        "reference",
        "reward_model",
    }
    assert "perplexity" in capsys.readouterr().out
    assert main(args) == 0  # the same command again is the same run: allowed


def test_cli_refuses_another_run_and_misspelt_keys(saved, capsys):
    out = saved / "eval"
    base = [f"model_name_or_path={saved / 'policy'}", f"text_file={saved / 'texts.txt'}", f"output_dir={out}"]
    assert main(base) == 0
    before = (out / "eval.json").read_text()
    assert main(base + ["seed=1"]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert (out / "eval.json").read_text() == before
    assert main(base + ["temprature=0.5"]) == 2
    assert "Did you mean 'temperature'" in capsys.readouterr().err


def test_cli_scores_a_reward_model_with_its_own_tokenizer_on_re_tokenized_text(saved, tiny_tokenizer):
    from ppo.demo.tiny import build_reward_model, build_tokenizer
    from ppo.forward import sequence_scores
    from ppo.rewards.model import render_for_reward_tokenizer

    words = [f"w{i}" for i in range(29)] + ["user", "assistant", ":"]
    rm_tokenizer = build_tokenizer(list(reversed(words)))  # the same words under other ids
    rm = build_reward_model(rm_tokenizer, TinyModelSpec(hidden_size=64, num_layers=2), seed=3).eval()
    rm.save_pretrained(saved / "rm_own")
    rm_tokenizer.save_pretrained(saved / "rm_own")
    out = saved / "eval_own"
    assert (
        main(
            [
                f"model_name_or_path={saved / 'policy'}",
                f"reward_model_path={saved / 'rm_own'}",
                f"prompts_file={saved / 'prompts.jsonl'}",
                "max_new_tokens=4",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    generations = json.loads((out / "eval.json").read_text())["generations"]
    expected, on_policy_ids = [], []
    with torch.no_grad():
        for g in generations:
            text = render_for_reward_tokenizer(rm_tokenizer, g["prompt"], g["completion"])
            for tok, scores in ((rm_tokenizer, expected), (tiny_tokenizer, on_policy_ids)):
                enc = tok([text], return_tensors="pt", add_special_tokens=False)
                scores.append(sequence_scores(rm, enc["input_ids"], enc["attention_mask"]).item())
    assert [g["reward_model"] for g in generations] == pytest.approx(expected, abs=1e-5)
    # The premise: the policy's token ids would have given other scores.
    assert max(abs(a - b) for a, b in zip(expected, on_policy_ids)) > 1e-3


def test_a_nan_reward_model_score_stops_evaluation_naming_the_source(tiny_policy, tiny_tokenizer, tiny_reward_model):
    with torch.no_grad():
        tiny_reward_model.score.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="reward_model gave nan for sample 0"):
        evaluate_policy(
            tiny_policy,
            tiny_tokenizer,
            PROMPTS,
            reward_model=tiny_reward_model,
            sampling=sampling(tiny_tokenizer),
            seed=0,
        )
