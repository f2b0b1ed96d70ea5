"""Bad data files and misbehaving reward functions, without a model: each refused with a message
naming the file and row, or the function and sample."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
import torch

from ppo.formats import DataFormatError, load_preference_rows, load_prompt_rows
from ppo.rewards import RewardFunctionError, call_reward_function

# (file name, content, fragments of the error)
BAD_FILES = [
    ("empty.jsonl", "", ["empty.jsonl is empty"]),
    ("blank.jsonl", "  \n\n", ["blank.jsonl is empty"]),
    ("empty.csv", "", ["empty.csv is empty"]),
    (
        "trailing.jsonl",
        '{"prompt": "a"}\n{"prompt": "b"} x\n',
        ["trailing.jsonl row 2:", "not valid JSON", '\'{"prompt": "b"} x\''],
    ),
    ("gap.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n', ["gap.jsonl row 2 (line 3):", "not valid JSON"]),
    ("list.jsonl", '{"prompt": "a"}\n[1, 2]\n', ["list.jsonl row 2:", "a JSON list, not an object"]),
    ("array.json", '[{"prompt": "a"},\n {"prompt": "b"', ["array.json line 2:", "not valid JSON"]),
    ("nocol.jsonl", '{"question": "a"}\n', ["nocol.jsonl has no column 'prompt'", "question"]),
    ("nullrow.jsonl", '{"prompt": "a"}\n{"prompt": null}\n', ["nullrow.jsonl row 2: field 'prompt' is missing"]),
]


@pytest.mark.parametrize(("name", "content", "fragments"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_prompt_files_name_file_and_row(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFormatError) as caught:
        load_prompt_rows(str(path))
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))


def test_a_broken_line_error_carries_the_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"} x\n')
    with pytest.raises(DataFormatError) as caught:
        load_prompt_rows(str(path))
    assert (caught.value.row, caught.value.source) == (3, str(path))


def test_identical_pairs_dropped_with_a_warning_or_refused_when_all(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "c", "rejected": " c "}\n'
        '{"prompt": "r", "chosen": "d", "rejected": "e"}\n'
    )
    with pytest.warns(
        UserWarning, match=r"dropped 1 of 3 rows of .*pairs.jsonl whose chosen equals rejected \(rows 2\)"
    ):
        rows = load_preference_rows(str(path))
    assert [r["prompt"] for r in rows] == ["p", "r"]
    path.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "a"}\n{"prompt": "q", "chosen": "c", "rejected": "c"}\n'
    )
    with pytest.raises(
        DataFormatError, match=r"pairs.jsonl: chosen equals rejected in all 2 usable rows \(rows 1, 2\)"
    ):
        load_preference_rows(str(path))
    # hh-rlhf text: the same whole text twice is the same reply
    text = "\n\nHuman: hi\n\nAssistant: hello"
    with pytest.raises(DataFormatError, match="chosen equals rejected"):
        load_preference_rows([{"chosen": text, "rejected": text}])


def call(func, timeout_s=None, max_abs=None, n=2):
    prompts = [f"p{i}" for i in range(n)]
    return call_reward_function(
        func, prompts, [f"c{i}" for i in range(n)], [[i] for i in range(n)], {}, timeout_s, max_abs
    )


def named(name, body):
    body.__name__ = name
    return body


# (reward function, max_abs, fragments of the error)
BAD_REWARDS = [
    (
        named("numeric_strings", lambda completions, **k: ["0.5", "1"]),
        None,
        ["'numeric_strings'", "'0.5'", "sample 0", "prompt 'p0'"],
    ),
    (named("as_bytes", lambda completions, **k: [0.0, b"1"]), None, ["'as_bytes'", "b'1'", "sample 1"]),
    (named("objects", lambda completions, **k: [0.0, object()]), None, ["'objects'", "sample 1", "not a number"]),
    (named("huge", lambda completions, **k: [0.0, 1e30]), 1e4, ["'huge'", "1e+30", "sample 1", "reward_max_abs=10000"]),
    (named("just_over", lambda completions, **k: [-10.5, 0.0]), 10.0, ["'just_over'", "-10.5", "reward_max_abs=10"]),
    (named("nan", lambda completions, **k: [float("nan"), 0.0]), None, ["'nan'", "nan", "sample 0"]),
    (named("all_none", lambda completions, **k: [None, None]), None, ["'all_none'", "None for all 2"]),
    (named("one_string", lambda completions, **k: "0.5 0.5"), None, ["'one_string'", "list of floats, got str"]),
    (named("a_dict", lambda completions, **k: {"a": 1, "b": 2}), None, ["'a_dict'", "got dict"]),
    (named("short", lambda completions, **k: [1.0]), None, ["'short'", "1 values for 2"]),
    (named("exits", lambda completions, **k: sys.exit(2)), None, ["'exits'", "sys.exit(2)"]),
    (named("raises", lambda completions, **k: {}["answer"]), None, ["'raises'", "KeyError"]),
]


@pytest.mark.parametrize("timeout_s", [None, 5.0], ids=["same-thread", "worker-thread"])
@pytest.mark.parametrize(("func", "max_abs", "fragments"), BAD_REWARDS, ids=[b[0].__name__ for b in BAD_REWARDS])
def test_bad_reward_functions_are_named(func, max_abs, fragments, timeout_s):
    with pytest.raises(RewardFunctionError) as caught:
        call(func, timeout_s=timeout_s, max_abs=max_abs)
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))


@pytest.mark.parametrize(
    "values", [[True, 0], [np.float32(0.5), np.int64(2)], torch.tensor([0.5, 2.0]), (1, 2.5), [None, 3.0]]
)
def test_numbers_of_any_kind_are_accepted(values):
    expected = [float(v) if v is not None else 0.0 for v in values]
    if any(v is None for v in values):
        with pytest.warns(UserWarning, match="None for 1 of 2"):
            assert call(lambda completions, **k: values) == expected
    else:
        assert call(lambda completions, **k: values, timeout_s=5.0, max_abs=3.0) == expected


def test_a_hanging_function_times_out_naming_it_and_the_limit():
    release = threading.Event()

    def stuck(completions, **kwargs):
        release.wait(30)
        return [0.0] * len(completions)

    start = time.perf_counter()
    try:
        with pytest.raises(
            RewardFunctionError, match=r"'stuck' did not return within reward_timeout_s=0.2 s.*cannot be killed"
        ):
            call(stuck, timeout_s=0.2)
    finally:
        release.set()
    assert time.perf_counter() - start < 5


def test_the_worker_thread_keeps_the_callers_grad_and_inference_modes():
    seen = []

    def probe(completions, **kwargs):
        seen.append(
            (
                threading.current_thread() is threading.main_thread(),
                torch.is_grad_enabled(),
                torch.is_inference_mode_enabled(),
            )
        )
        return [0.0] * len(completions)

    with torch.inference_mode():
        call(probe, timeout_s=5.0)
    with torch.no_grad():
        call(probe, timeout_s=5.0)
    call(probe, timeout_s=0)  # no limit: called right here
    assert seen == [(False, False, True), (False, False, False), (True, True, False)]


def needs_answer(completions, answer, *, tolerance=0.0, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]


def test_a_function_needing_a_column_the_prompts_lack_says_which_and_what_they_have():
    prompts, completions, ids = ["p0", "p1"], ["4", "5"], [[1], [2]]
    with pytest.raises(RewardFunctionError) as caught:
        call_reward_function(needs_answer, prompts, completions, ids, {"source": ["a", "b"]})
    message = str(caught.value)
    for fragment in ("'needs_answer'", "column(s) 'answer'", "they give: source", "JSONL"):
        assert fragment in message, (fragment, message)
    with pytest.raises(RewardFunctionError, match="no column besides the prompt"):
        call_reward_function(needs_answer, prompts, completions, ids, {})
    # given the column it runs; a parameter with a default and **kwargs are never required
    assert call_reward_function(needs_answer, prompts, completions, ids, {"answer": ["4", "6"]}) == [1.0, 0.0]
