"""The arithmetic word-problem generator: answers right by a plain re-computation, splits disjoint,
files in the prompt format the recipes read."""

from __future__ import annotations

import json
import random
import re

import pytest

from ppo.data_tasks.arithmetic import main, make_problem, make_split
from ppo.rewards.builtin import final_number


def recompute(question: str) -> int:
    """The answer from the question's words alone: a reference independent of the generator."""
    value = int(re.search(r"has (\d+) ", question).group(1))
    for sentence in question.split(". ")[1:]:
        if m := re.search(r"(buys|finds|is given|picks up) (\d+) more", sentence):
            value += int(m.group(2))
        elif m := re.search(r"(gives away|loses|uses|sells) (\d+) of them", sentence):
            value -= int(m.group(2))
        elif "doubles" in sentence:
            value *= 2
        elif "triples" in sentence:
            value *= 3
    return value


@pytest.mark.parametrize("steps", [1, 2])
def test_answers_match_a_recomputation_and_the_rule_reward(steps):
    rng = random.Random(3)
    for _ in range(200):
        row = make_problem(rng, steps)
        assert int(row["answer"]) == recompute(row["question"]) >= 1
        assert row["prompt"][0]["role"] == "user" and row["question"] in row["prompt"][0]["content"]
        assert final_number([f"The answer is {row['answer']}."], [row["answer"]]) == [1.0]


def test_splits_are_disjoint_and_seeded():
    train, held = make_split(300, 50, seed=1)
    assert len(train) == 300 and len(held) == 50
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert make_split(300, 50, seed=1) == (train, held) and make_split(300, 50, seed=2) != (train, held)
    with pytest.raises(ValueError, match="operations may hold"):
        make_split(1, 1, operations="+/")


def test_cli_writes_prompt_rows(tmp_path):
    assert main(["--out", str(tmp_path), "--train", "20", "--eval", "5", "--seed", "0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and set(rows[0]) == {"prompt", "answer"}
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 5
    held = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    texts = (tmp_path / "eval.txt").read_text().splitlines()
    assert [t.rsplit(" ", 1)[1] for t in texts] == [r["answer"] for r in held]
