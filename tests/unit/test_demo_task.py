"""The demo's synthetic task: the oracle is sane, the demonstrator leaves headroom, splits are clean."""

import itertools
import math
import random
import statistics

import pytest

from ppo.demo.task import DemoTask, describe, gold_reward, make_splits

TASK = DemoTask()
DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [TASK.sample_prompt(rng) for _ in range(500)]


def test_prompt_format_and_lengths(prompts):
    vocab = set(TASK.vocabulary())
    assert len(vocab) == len(TASK.vocabulary()) <= 60
    for row in prompts:
        assert set(row["prompt"].split()) <= vocab and set(row["answer"].split()) <= vocab
        assert len(row["prompt"].split()) <= TASK.max_items + 4
        assert 1 <= len(row["answer"].split()) < TASK.max_items
        assert row["answer"] == TASK.ideal_response(row["prompt"])


def test_examples():
    assert TASK.ideal_response("above 4 : 7 2 9 4 1 =") == "7 9"
    assert TASK.ideal_response("below 3 : 5 0 8 2 =") == "0 2"
    assert TASK.ideal_response("even : 3 6 1 8 5 =") == "6 8"
    assert TASK.ideal_response("odd : 3 6 1 8 5 =") == "3 1 5"
    assert TASK.ideal_response("above 8 : 1 2 =") == "none"
    p = "odd : 3 6 1 8 5 ="
    assert TASK.gold_score(p, "3 1 5") == 100.0
    assert TASK.gold_score(p, "  3\n1   5 <eos>") == 100.0  # whitespace- and EOS-tolerant
    assert 0 < TASK.gold_score(p, "3 1") < TASK.gold_score(p, "3 1 5") == 100.0
    assert 0 < TASK.gold_score(p, "3 1 5 6") < 100.0
    assert TASK.gold_score(p, "1 3 5") < 100.0  # order matters
    assert TASK.gold_score(p, "") == TASK.gold_score(p, "6 8") == 0.0
    assert TASK.gold_score("not a prompt", "3 1 5") == 0.0
    with pytest.raises(ValueError):
        TASK.ideal_response("hello")


def test_ideal_scores_max(prompts):
    for row in prompts:
        assert TASK.gold_score(row["prompt"], row["answer"]) == 100.0


def test_random_word_sequences_stay_in_range_and_score_low(prompts):
    rng, vocab, scores = random.Random(1), TASK.vocabulary(), []
    for row in prompts:
        for _ in range(4):
            resp = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 20)))
            g = TASK.gold_score(row["prompt"], resp)
            assert 0.0 <= g <= 100.0 and math.isfinite(g)
            scores.append(g)
        assert TASK.gold_score(row["prompt"], "") == 0.0
        assert TASK.gold_score(row["prompt"], "= : above <unk> banana") == 0.0
        assert TASK.gold_score(row["prompt"], " ".join(DIGITS * 5)) < 20.0  # too long
    assert statistics.mean(scores) < 5.0


def test_prompt_independent_answers_score_low(prompts):
    # Every constant answer of 0-3 distinct digits, plus a few natural ones: even the best
    # is far below the ideal, so reward hacking by a fixed output shows up in the gold score.
    consts = [" ".join(c) for k in range(4) for c in itertools.permutations(DIGITS, k)]
    consts += ["none", "0 2 4 6 8", "1 3 5 7 9", "5 6 7 8 9", "0 1 2 3 4", " ".join(DIGITS)]
    sample = prompts[:100]
    best = max(statistics.mean(TASK.gold_score(r["prompt"], c) for r in sample) for c in consts)
    assert best <= 20.0
    # Copying the list reads the prompt but ignores the rule: still low.
    copy = statistics.mean(TASK.gold_score(r["prompt"], r["prompt"].split(":")[1][:-1]) for r in prompts)
    assert copy <= 35.0


def test_demonstrator_leaves_headroom(prompts):
    # Designed band: the demonstrator averages ~51/100 (ideal 100, garbage ~1), and its most
    # common answer (what greedy SFT decoding imitates) is still clearly below the ideal.
    rng = random.Random(2)
    demo = [TASK.gold_score(r["prompt"], TASK.demonstrate(r["prompt"], rng)) for r in prompts]
    assert 40.0 <= statistics.mean(demo) <= 60.0
    assert sum(g == 100.0 for g in demo) >= 0.15 * len(demo)  # PPO can find the right answer

    def mode(prompt):
        counts = {}
        for _ in range(40):
            d = TASK.demonstrate(prompt, rng)
            counts[d] = counts.get(d, 0) + 1
        return max(counts, key=counts.get)

    modes = [TASK.gold_score(r["prompt"], mode(r["prompt"])) for r in prompts[:200]]
    assert statistics.mean(modes) <= 72.0


def test_demonstrations_depend_on_the_prompt():
    rng = random.Random(3)
    outs = {TASK.demonstrate(TASK.sample_prompt(rng)["prompt"], rng) for _ in range(200)}
    assert len(outs) > 50


SIZES = dict(n_sft=300, n_pref=300, n_ppo=100, n_eval=100)


@pytest.fixture(scope="module")
def splits():
    return make_splits(TASK, seed=0, **SIZES)


def test_make_splits_shapes_and_determinism(splits):
    assert {k: len(v) for k, v in splits.items()} == {
        "sft": 300, "preference": 300, "ppo": 100, "eval": 100}
    assert set(splits["sft"][0]) >= {"prompt", "completion"}
    assert set(splits["preference"][0]) >= {"prompt", "chosen", "rejected"}
    assert set(splits["ppo"][0]) >= {"prompt", "answer"} and set(splits["eval"][0]) >= {"prompt", "answer"}
    assert make_splits(TASK, seed=0, **SIZES) == splits
    assert make_splits(TASK, seed=1, **SIZES) != splits
    # The eval set does not move when the training splits are resized.
    assert make_splits(TASK, seed=0, n_sft=10, n_pref=5, n_ppo=7, n_eval=100)["eval"] == splits["eval"]


def test_make_splits_disjoint_and_in_vocabulary(splits):
    eval_prompts = {r["prompt"] for r in splits["eval"]}
    assert len(eval_prompts) == len(splits["eval"])
    for name in ("sft", "preference", "ppo"):
        assert not eval_prompts & {r["prompt"] for r in splits[name]}, name
    vocab = set(TASK.vocabulary())
    for rows in splits.values():
        for row in rows:
            for text in row.values():
                assert set(text.split()) <= vocab
    for row in splits["eval"] + splits["ppo"]:
        assert row["answer"] == TASK.ideal_response(row["prompt"])


def test_preference_pairs_have_margin(splits):
    for row in splits["preference"]:
        chosen = TASK.gold_score(row["prompt"], row["chosen"])
        gap = chosen - TASK.gold_score(row["prompt"], row["rejected"])
        assert gap >= TASK.pair_margin


def test_gold_reward_convention(splits):
    rows = splits["eval"][:5]
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    assert gold_reward(prompts=prompts, completions=answers, completion_ids=[[1]] * 5) == [100.0] * 5
    assert gold_reward(prompts=prompts, completions=[""] * 5) == [0.0] * 5
    chat = [[{"role": "assistant", "content": r["answer"]}] for r in rows]
    assert gold_reward(prompts=prompts, completions=chat) == [100.0] * 5


def test_describe():
    text = describe(TASK)
    assert 2 <= len(text.strip().splitlines()) <= 3 and "oracle" in text.lower()


def _features(prompt, response):
    """Count features a small reward model could pick up: (rule, word) hits, length, order."""
    words, head = response.split(), prompt.split(":")[0].strip()
    items = prompt.split(":")[1].split()[:-1]
    feats = {("len", min(len(words), 8)): 1.0, ("bias",): 1.0}
    for w in words:
        feats[(head, w)] = feats.get((head, w), 0.0) + 1.0
        feats[("listed", w in items)] = feats.get(("listed", w in items), 0.0) + 1.0
    pos = [items.index(w) for w in words if w in items]
    feats[("inversions",)] = float(sum(a > b for a, b in zip(pos, pos[1:])))
    feats[("repeats",)] = float(len(words) - len(set(words)))
    return feats


def test_preferences_are_learnable_by_a_linear_scorer():
    data = make_splits(TASK, seed=5, n_sft=0, n_pref=1200, n_ppo=0, n_eval=0)["preference"]
    diffs = []
    for row in data:
        fc, fr = _features(row["prompt"], row["chosen"]), _features(row["prompt"], row["rejected"])
        diffs.append({k: fc.get(k, 0.0) - fr.get(k, 0.0) for k in fc.keys() | fr.keys()})
    train, test = diffs[:900], diffs[900:]
    w, rng = {}, random.Random(0)
    for _epoch in range(8):  # logistic regression on (chosen - rejected), plain SGD
        rng.shuffle(train)
        for d in train:
            margin = sum(w.get(k, 0.0) * v for k, v in d.items())
            g = 1.0 / (1.0 + math.exp(min(margin, 30.0)))
            for k, v in d.items():
                w[k] = w.get(k, 0.0) + 0.1 * g * v
    acc = statistics.mean(sum(w.get(k, 0.0) * v for k, v in d.items()) > 0 for d in test)
    assert acc >= 0.85
