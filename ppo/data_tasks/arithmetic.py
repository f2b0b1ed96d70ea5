"""GSM8K-style arithmetic word problems, generated locally with their answers.

    python -m ppo.data_tasks.arithmetic --out data/arithmetic --train 2000 --eval 200 --seed 0

writes `train.jsonl` and `eval.jsonl`, one problem a line (and `eval.txt`, each held-out question
followed by its answer, a text set for `ppo-rlhf eval`'s perplexity), as chat messages so that the policy's
chat template renders them:

    {"prompt": [{"role": "user", "content": "Tom has 7 apples. He buys 5 more. How many apples
     does Tom have now? Answer with the number only."}], "answer": "12"}

The `answer` column is what the built-in `final_number` reward compares the completion's last
number with (the rule reward of the GSM8K tutorial). `steps=1` problems take one operation
(+, -, x), `steps=2` chain two. Train and eval problems never share a question text. Everything is
drawn from one seeded generator, so a seed gives the same files on every machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

NAMES = ["Tom", "Anna", "Ben", "Maria", "Sam", "Lena", "Omar", "Zoe", "Ravi", "Emma", "Leo", "Mia"]
THINGS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells", "cards", "coins"]
INSTRUCTION = "Answer with the number only."


def _add(rng: random.Random, name: str, thing: str, start: int) -> tuple[str, int]:
    more = rng.randint(2, 20)
    verb = rng.choice(["buys", "finds", "is given", "picks up"])
    return f"{name} {verb} {more} more.", start + more


def _sub(rng: random.Random, name: str, thing: str, start: int) -> tuple[str, int]:
    if start < 2:  # nothing to take away without reaching zero
        return _add(rng, name, thing, start)
    less = rng.randint(1, start - 1)
    verb = rng.choice(["gives away", "loses", "uses", "sells"])
    return f"{name} {verb} {less} of them.", start - less


def _mul(rng: random.Random, name: str, thing: str, start: int) -> tuple[str, int]:
    times = rng.choice([2, 3])
    return f"Then {name} {'doubles' if times == 2 else 'triples'} the number of {thing}.", start * times


OPERATIONS = {"+": _add, "-": _sub, "x": _mul}


def make_problem(rng: random.Random, steps: int = 1, operations: str = "+-x") -> dict:
    """One problem: {"prompt": [user message], "answer": "<integer>", "question": text}."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {thing}."]
    for _ in range(steps):
        op = rng.choice(operations)
        sentence, value = OPERATIONS[op](rng, name, thing, value)
        sentences.append(sentence)
    sentences.append(f"How many {thing} does {name} have now?")
    question = " ".join(sentences)
    return {
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "answer": str(value),
        "question": question,
    }


def make_split(
    n_train: int, n_eval: int, seed: int = 0, steps: int = 1, operations: str = "+-x"
) -> tuple[list[dict], list[dict]]:
    """(train, eval) problems with distinct question texts (eval drawn first, train avoids them)."""
    unknown = set(operations) - set(OPERATIONS)
    if unknown:
        raise ValueError(f"operations may hold {''.join(OPERATIONS)}; got {''.join(sorted(unknown))!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = []
    for count in (n_eval, n_train):
        rows: list[dict] = []
        attempts = 0
        while len(rows) < count:
            attempts += 1
            if attempts > 50 * max(count, 1):
                raise ValueError(
                    f"only {len(rows)} distinct problems of {steps} step(s) found for {count} asked; ask for fewer"
                )
            row = make_problem(rng, steps, operations)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        splits.append(rows)
    return splits[1], splits[0]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppo.data_tasks.arithmetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/arithmetic", help="directory for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--eval", type=int, default=200, help="held-out problems")
    parser.add_argument("--steps", type=int, default=1, help="operations per problem (1 or 2)")
    parser.add_argument("--operations", default="+-x", help="which of + - x to draw from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held_out = make_split(args.train, args.eval, args.seed, args.steps, args.operations)
    out = Path(args.out)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(held_out, out / "eval.jsonl")
    (out / "eval.txt").write_text("".join(f"{r['question']} {r['answer']}\n" for r in held_out), encoding="utf-8")
    print(f"wrote {len(train)} training and {len(held_out)} held-out problems to {out}/(train|eval).jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
