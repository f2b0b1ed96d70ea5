"""Built-in reward functions, usable by name in YAML or on the command line."""

from __future__ import annotations

import re


def _normalise(text: str) -> str:
    return " ".join(str(text).strip().lower().split())


def exact_match(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion equals the `answer` column (case and whitespace folded), else 0.0."""
    return [float(_normalise(c) == _normalise(a)) for c, a in zip(completions, answer)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> float | None:
    # GSM8K answers end with "#### 42"; otherwise the last number in the text counts.
    text = str(text)
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def final_number(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion's final number equals the `answer` column's (GSM8K style), else 0.0."""
    scores = []
    for completion, reference in zip(completions, answer):
        got, want = _last_number(completion), _last_number(reference)
        scores.append(float(got is not None and want is not None and abs(got - want) < 1e-6))
    return scores


def make_regex_reward(pattern: str) -> callable:
    """A reward of 1.0 for completions that match `pattern` (re.search), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def regex_match(completions: list[str], **kwargs) -> list[float]:
        return [float(bool(compiled.search(c))) for c in completions]

    regex_match.__name__ = f"regex_match({pattern})"
    return regex_match


def think_answer_format(completions: list[str], **kwargs) -> list[float]:
    """1.0 for completions of the form `<think>...</think> <answer>...</answer>`."""
    return make_regex_reward(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$")(completions)


def length_penalty(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """Minus the response length in tokens divided by 100: a gentle push towards brevity."""
    return [-len(ids) / 100.0 for ids in completion_ids]


BUILTIN_REWARDS = {
    "exact_match": exact_match,
    "final_number": final_number,
    "think_answer_format": think_answer_format,
    "length_penalty": length_penalty,
}
