"""The synthetic task behind ``ppo-rlhf demo``: digit filtering, scored by a hidden oracle.

A prompt is a rule and a short list of distinct digits; the ideal response lists, in prompt
order, exactly the digits that satisfy the rule::

    above 4 : 7 2 9 4 1 =      ->  7 9
    below 3 : 5 0 8 2 =        ->  0 2
    even : 3 6 1 8 5 =         ->  6 8
    odd : 3 6 1 8 5 =          ->  3 1 5

Why this task:

* The right answer depends on both the rule and the list, so a policy (or a reward hacker)
  that ignores the prompt scores low: the best constant answer averages ~12/100.
* Everything is a whitespace-separated word from a ~17-word vocabulary, prompts are <= 11 words
  and ideal answers <= 6, so a tiny Qwen3 with a word-level tokenizer learns it on a CPU.
* The oracle (``gold_score``) scores ANY word sequence: with L = the longest common subsequence
  of response and ideal answer, P = L / len(response) and R = L / len(ideal),
  gold = 100 * P**2 * R. It is 100 only for the exact answer, loses a smooth, count-based
  amount per missing, extra or misplaced digit (learnable by a reward model), and is 0 for
  junk or an empty response. Precision is squared so that padding is costly: copying the whole
  list (reading the prompt but ignoring the rule) scores ~27 instead of ~49.
* SFT data come from a sloppy demonstrator whose errors are *systematic* (fuzzy around the
  threshold, lazily stopping after two digits), not just random: if they were random, the mode
  of the demonstrations would be the right answer and greedy SFT decoding would already be
  near-perfect. Systematic errors keep SFT clearly below the oracle's best, leaving room for
  PPO, while the demonstrator is still right often enough for PPO to find good samples.
  With the defaults the demonstrator averages ~51/100 and its most common answer ~60/100.
* Preference pairs are two responses to one prompt labelled by the oracle with a minimum gold
  gap, so a reward model sees clean, learnable comparisons.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DIGITS = [str(d) for d in range(10)]
THRESHOLD_RULES = ("above", "below")
PARITY_RULES = ("even", "odd")
NONE_WORD = "none"  # the ideal answer when no digit qualifies (sample_prompt never asks for it)
# Markers a decoder may leave in the text; they are not part of the answer.
_IGNORED = frozenset({"<eos>", "<pad>", "</s>", "<|endoftext|>", "<|im_end|>"})


@dataclass(frozen=True)
class DemoTask:
    """Knobs of the digit-filter task; the defaults are what ``ppo-rlhf demo`` uses."""

    min_items: int = 3  # shortest digit list in a prompt
    max_items: int = 7  # longest digit list in a prompt (prompt <= max_items + 4 words)
    boundary_rate: float = 0.6  # demonstrator misjudges a digit within 1 of the threshold
    lazy_rate: float = 0.6  # demonstrator stops after `lazy_keep` digits
    lazy_keep: int = 2  # how many digits a lazy demonstration keeps
    item_noise: float = 0.08  # demonstrator flips any digit's keep/drop decision at random
    swap_rate: float = 0.15  # demonstrator swaps two adjacent digits of its answer
    copy_rate: float = 0.1  # demonstrator ignores the rule and copies the whole list
    pair_margin: float = 15.0  # minimum gold gap between chosen and rejected

    def vocabulary(self) -> list[str]:
        return DIGITS + list(THRESHOLD_RULES) + list(PARITY_RULES) + [":", "=", NONE_WORD]

    # -- prompts ---------------------------------------------------------------------------
    def sample_prompt(self, rng: random.Random) -> dict:
        # Reject lists where the rule keeps nothing or everything: then copying the list or
        # answering "none" would be ideal, and the policy could skip reading the rule.
        while True:
            items = rng.sample(DIGITS, rng.randint(self.min_items, self.max_items))
            rule = rng.choice(THRESHOLD_RULES + PARITY_RULES)
            head = [rule, str(rng.randint(1, 8))] if rule in THRESHOLD_RULES else [rule]
            prompt = " ".join(head + [":"] + items + ["="])
            kept = _target(_parse(prompt))
            if 0 < len(kept) < len(items):
                return {"prompt": prompt, "answer": " ".join(kept)}

    def ideal_response(self, prompt: str) -> str:
        parsed = _parse(prompt)
        if parsed is None:
            raise ValueError(f"not a digit-filter prompt: {prompt!r}")
        return " ".join(_target(parsed) or [NONE_WORD])

    # -- the sloppy demonstrator -----------------------------------------------------------
    def demonstrate(self, prompt: str, rng: random.Random) -> str:
        parsed = _parse(prompt)
        if parsed is None:
            raise ValueError(f"not a digit-filter prompt: {prompt!r}")
        rule, threshold, items = parsed
        if rng.random() < self.copy_rate:
            return " ".join(items)
        out = []
        for word in items:
            keep = _keeps(rule, threshold, int(word))
            if threshold is not None and abs(int(word) - threshold) <= 1:
                keep ^= rng.random() < self.boundary_rate
            keep ^= rng.random() < self.item_noise
            if keep:
                out.append(word)
        if rng.random() < self.lazy_rate:
            out = out[: self.lazy_keep]
        if len(out) >= 2 and rng.random() < self.swap_rate:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        return " ".join(out or [NONE_WORD])

    # -- the hidden oracle -----------------------------------------------------------------
    def gold_score(self, prompt: str, response: str) -> float:
        parsed = _parse(prompt)
        if parsed is None:
            return 0.0
        ideal = _target(parsed) or [NONE_WORD]
        words = [w for w in str(response).split() if w not in _IGNORED]
        if not words:
            return 0.0
        common = _lcs(words, ideal)
        return 100.0 * (common / len(words)) ** 2 * (common / len(ideal))


def _parse(prompt: str):
    """(rule, threshold or None, items) from the last 'rule [N] : d d d =' in the text, else None."""
    words = str(prompt).split()
    if "=" not in words:
        return None
    end = len(words) - 1 - words[::-1].index("=")
    if ":" not in words[:end]:
        return None
    colon = end - 1 - words[:end][::-1].index(":")
    items = words[colon + 1 : end]
    if not items or any(w not in DIGITS for w in items):
        return None
    if colon >= 1 and words[colon - 1] in PARITY_RULES:
        return words[colon - 1], None, items
    if colon >= 2 and words[colon - 2] in THRESHOLD_RULES and words[colon - 1] in DIGITS:
        return words[colon - 2], int(words[colon - 1]), items
    return None


def _keeps(rule: str, threshold, digit: int) -> bool:
    if rule == "above":
        return digit > threshold
    if rule == "below":
        return digit < threshold
    return (digit % 2 == 0) == (rule == "even")


def _target(parsed) -> list[str]:
    rule, threshold, items = parsed
    return [w for w in items if _keeps(rule, threshold, int(w))]


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _perturb(task: DemoTask, prompt: str, response: str, rng: random.Random) -> str:
    """A nearby alternative to a demonstration, so pairs also contrast single edits."""
    words = response.split()
    if words == [NONE_WORD]:
        words = []
    op = rng.randrange(4)
    if op == 0 and words:
        del words[rng.randrange(len(words))]
    elif op == 1:
        words.insert(rng.randint(0, len(words)), rng.choice(DIGITS))
    elif op == 2 and len(words) >= 2:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        words = task.ideal_response(prompt).split()
    return " ".join(words or [NONE_WORD])


def drift(prompt: str, response: str, rng) -> str:
    """`response` with one of the mistakes a policy makes when it drifts from SFT under an imperfect
    reward model (all three seen in our runs): a digit that is not in the prompt's list, a repeated
    digit, or stopping one digit early."""
    words = [w for w in response.split() if w != NONE_WORD]
    listed = _parse(prompt)[2]
    foreign = [str(d) for d in range(10) if str(d) not in listed]
    mistake = rng.choice(("foreign", "repeat", "early") if words else ("foreign",))
    if mistake == "foreign" and foreign:
        words.insert(rng.randint(0, len(words)), rng.choice(foreign))
    elif mistake == "repeat" or not foreign:
        i = rng.randrange(len(words))
        words.insert(i + 1, words[i])
    else:
        words.pop()
    return " ".join(words)


def _fresh_prompts(task: DemoTask, rng: random.Random, n: int, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        row = task.sample_prompt(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            out.append(row)
    return out


def make_splits(task: DemoTask, seed: int, n_sft: int, n_pref: int, n_ppo: int, n_eval: int) -> dict[str, list[dict]]:
    """Disjoint prompt sets (no eval prompt appears in any training split):
    "sft": [{"prompt", "completion"}] (completion = noisy demonstration),
    "preference": [{"prompt", "chosen", "rejected"}] (oracle-labelled, gap >= task.pair_margin),
    "ppo": [{"prompt", "answer"}], "eval": [{"prompt", "answer"}]. Deterministic for a seed."""

    # One stream per split (string seeds hash deterministically), so e.g. the eval set does
    # not change when the number of SFT examples does. Eval is drawn first and reserved.
    def stream(name: str) -> random.Random:
        return random.Random(f"ppo-demo-{seed}-{name}")

    seen: set = set()
    splits = {"eval": _fresh_prompts(task, stream("eval"), n_eval, seen)}
    rng = stream("sft")
    splits["sft"] = [
        {"prompt": r["prompt"], "completion": task.demonstrate(r["prompt"], rng)}
        for r in _fresh_prompts(task, rng, n_sft, seen)
    ]
    rng, pairs = stream("preference"), []
    while len(pairs) < n_pref:
        (row,) = _fresh_prompts(task, rng, 1, seen)
        prompt = row["prompt"]
        # A few tries per prompt; prompts whose candidates never differ enough are dropped
        # (they stay in `seen`, which only costs a prompt).
        for _ in range(8):
            a = task.demonstrate(prompt, rng)
            b = task.demonstrate(prompt, rng) if rng.random() < 0.5 else _perturb(task, prompt, a, rng)
            ga, gb = task.gold_score(prompt, a), task.gold_score(prompt, b)
            if abs(ga - gb) >= task.pair_margin:
                chosen, rejected = (a, b) if ga > gb else (b, a)
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
                break
    splits["preference"] = pairs
    splits["ppo"] = _fresh_prompts(task, stream("ppo"), n_ppo, seen)
    return {k: splits[k] for k in ("sft", "preference", "ppo", "eval")}


def _completion_text(completion) -> str:
    # TRL's conversational format passes a list of {"role", "content"} messages.
    if isinstance(completion, (list, tuple)):
        return " ".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in completion)
    return str(completion)


def gold_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Reward-function convention of the HF ecosystem: called with keyword args prompts=,
    completions=, (completion_ids=, other columns) — returns gold scores for a default
    DemoTask(). Used only for evaluation, never for training."""
    task = DemoTask()
    return [task.gold_score(_completion_text(p), _completion_text(c)) for p, c in zip(prompts, completions)]


def describe(task: DemoTask) -> str:
    return (
        f"Task: the prompt gives a rule (above N / below N / even / odd) and {task.min_items}-"
        f"{task.max_items} distinct digits; the right answer lists the digits obeying the rule, in order.\n"
        "Oracle (hidden from training): gold = 100 x precision^2 x recall of the in-order matches "
        "with the right answer; 100 only for the exact answer, 0 for junk.\n"
        f"SFT learns from a sloppy demonstrator (fuzzy near the threshold, stops after "
        f"{task.lazy_keep} digits {task.lazy_rate:.0%} of the time); PPO must beat it."
    )
