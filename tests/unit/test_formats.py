"""ppo.formats: every source kind and stage format, built on the fly and read through load_dataset."""

from __future__ import annotations

import json
import warnings

import datasets
import pytest

from ppo.demo.tiny import build_tokenizer
from ppo.formats import (
    DataFormatError,
    load_preference_rows,
    load_prompt_rows,
    load_sft_rows,
    load_table,
    read_prompts_file,
)

WORDS = [f"w{i}" for i in range(30)] + ["user", "assistant", "system", ":", "Human", "Assistant"]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WORDS)


@pytest.fixture(autouse=True)
def _quiet():
    datasets.disable_progress_bars()
    yield


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PROMPT_ROWS = [{"prompt": "w1 w2", "answer": "5"}, {"prompt": "w3", "answer": "7"}]
MESSAGE_ROWS = [
    {"prompt": [user("w1 w2")], "answer": "5"},
    {"prompt": [{"role": "system", "content": "w9"}, user("w3")], "answer": "7"},
]


# ----------------------------------------------------------------------------- prompt sources


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "arrow", "saved", "dir", "dataset", "list"])
def test_prompt_rows_from_every_source_kind(tmp_path, kind):
    table = datasets.Dataset.from_list(PROMPT_ROWS)
    if kind == "jsonl":
        source = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS)
    elif kind == "json":  # one JSON array rather than lines
        source = tmp_path / "p.json"
        source.write_text(json.dumps(PROMPT_ROWS))
    elif kind == "csv":
        source = tmp_path / "p.csv"
        source.write_text("prompt,answer\nw1 w2,5\nw3,7\n")
    elif kind == "parquet":
        source = tmp_path / "p.parquet"
        table.to_parquet(str(source))
    elif kind in ("arrow", "saved"):
        table.save_to_disk(str(tmp_path / "saved"))
        source = tmp_path / "saved" if kind == "saved" else next((tmp_path / "saved").glob("*.arrow"))
    elif kind == "dir":
        source = tmp_path / "shards"
        source.mkdir()
        write_jsonl(source / "a.jsonl", PROMPT_ROWS[:1])
        write_jsonl(source / "b.jsonl", PROMPT_ROWS[1:])
        (source / "README.md").write_text("not data")
    else:
        source = table if kind == "dataset" else [dict(r) for r in PROMPT_ROWS]
    rows = load_prompt_rows(source if kind in ("dataset", "list") else str(source))
    assert [r["prompt"] for r in rows] == ["w1 w2", "w3"]
    assert [str(r["answer"]) for r in rows] == ["5", "7"]  # CSV infers integers
    assert len(load_table(source)) == 2


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "list"])
def test_message_prompts_are_kept_as_messages_and_render_later(tmp_path, tok, kind):
    if kind == "jsonl":
        source = write_jsonl(tmp_path / "m.jsonl", MESSAGE_ROWS)
    elif kind == "parquet":
        source = tmp_path / "m.parquet"
        datasets.Dataset.from_list(MESSAGE_ROWS).to_parquet(str(source))
    else:
        source = MESSAGE_ROWS
    rows = load_prompt_rows(source, tokenizer=tok)
    # Arrow unifies message dicts; the prompts must come back exactly as written.
    assert rows == [{"prompt": r["prompt"], "answer": r["answer"]} for r in MESSAGE_ROWS]
    from ppo.data import render_prompt

    assert render_prompt(tok, rows[1]["prompt"]) == "system : w9 user : w3 assistant : "


def test_messages_lose_arrow_none_fillers(tmp_path):
    source = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [user("w1")]}, {"prompt": [{**user("w2"), "name": "bob"}]}])
    rows = load_prompt_rows(source)
    assert rows[0]["prompt"] == [user("w1")]
    assert rows[1]["prompt"] == [{**user("w2"), "name": "bob"}]


def test_custom_prompt_column_and_extra_columns_pass_through(tmp_path):
    source = write_jsonl(tmp_path / "q.jsonl", [{"question": "w1", "id": 3, "meta": {"k": [1, 2]}}])
    assert load_prompt_rows(source, prompt_column="question") == [{"prompt": "w1", "id": 3, "meta": {"k": [1, 2]}}]


def test_prompts_from_hh_rlhf_chosen_column():
    rows = load_prompt_rows(
        [{"chosen": "\n\nHuman: w1\n\nAssistant: w2\n\nHuman: w3\n\nAssistant: w4", "rejected": "x"}]
    )
    assert rows[0]["prompt"] == "\n\nHuman: w1\n\nAssistant: w2\n\nHuman: w3\n\nAssistant:"
    assert rows[0]["rejected"] == "x"
    conversational = load_prompt_rows([{"chosen": [user("w1"), bot("w2")]}])
    assert conversational[0]["prompt"] == [user("w1")]


def test_message_prompts_without_chat_template_fail_at_load():
    plain = build_tokenizer(WORDS, chat_template=False)
    with pytest.raises(DataFormatError, match="chat template"):
        load_prompt_rows([{"prompt": [user("w1")]}], tokenizer=plain, skip_bad_rows=True)


def test_table_edges(tmp_path):
    # A list keeps every key seen in any row (Dataset.from_list alone keeps only the first row's).
    assert load_table([{"prompt": "w1"}, {"prompt": "w2", "id": 2}])[:] == {"prompt": ["w1", "w2"], "id": [None, 2]}
    train, test = datasets.Dataset.from_list(PROMPT_ROWS), datasets.Dataset.from_list(PROMPT_ROWS[:1])
    both = datasets.DatasetDict({"train": train, "test": test})
    assert len(load_prompt_rows(both)) == 2 and len(load_table(both, split="test")) == 1
    with pytest.raises(DataFormatError, match="no split 'dev'"):
        load_table(both, split="dev")
    with pytest.raises(DataFormatError, match="<list> row 2 must be a dict"):
        load_prompt_rows([{"prompt": "w1"}, "w2"])
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(DataFormatError, match="unsupported file type '.xlsx'"):
        load_table(str(tmp_path / "p.xlsx"))
    write_jsonl(tmp_path / "a.jsonl", PROMPT_ROWS)
    (tmp_path / "b.csv").write_text("prompt\nw1\n")
    with pytest.raises(DataFormatError, match="mixes file types"):
        load_table(str(tmp_path))


# ----------------------------------------------------------------------------- .txt prompts


def test_txt_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("w1 w2\n\n   \nw3  \r\n", encoding="utf-8")
    assert read_prompts_file(path) == ["w1 w2", "w3"]
    assert load_prompt_rows(str(path)) == [{"prompt": "w1 w2"}, {"prompt": "w3"}]


def test_txt_empty_and_non_utf8_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt.*no prompts"):
        read_prompts_file(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(DataFormatError, match=r"latin.txt is not UTF-8.*line 2"):
        load_prompt_rows(str(latin))


def test_non_utf8_jsonl_names_the_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match="bad.jsonl is not UTF-8"):
        load_prompt_rows(str(path))


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_table(str(tmp_path / "nope.jsonl"))


# ----------------------------------------------------------------------------- SFT


def test_sft_prompt_completion_text_and_messages(tok):
    rows = load_sft_rows(
        [
            {"prompt": "w1", "completion": " w2"},
            {"prompt": [user("w1")], "completion": [bot("w2")]},
            {"prompt": [user("w1")], "completion": "w2"},
            {"prompt": "w1", "completion": [bot("w2")]},
        ],
        tok,
    )
    assert rows == [
        {"prompt": "w1", "completion": " w2"},
        {"prompt": "user : w1 assistant : ", "completion": "w2 <eos> "},
        {"prompt": "user : w1 assistant : ", "completion": "w2"},
        {"prompt": "w1", "completion": "w2"},
    ]


def test_sft_messages_column_splits_at_last_assistant_turn(tmp_path, tok):
    conversation = [{"role": "system", "content": "w0"}, user("w1"), bot("w2"), user("w3"), bot("w4 w5")]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation, "id": 1}])
    assert load_sft_rows(str(source), tok) == [
        {"prompt": "system : w0 user : w1 assistant : w2 <eos> user : w3 assistant : ", "completion": "w4 w5 <eos> "}
    ]


def test_sft_custom_columns(tok):
    rows = load_sft_rows([{"q": "w1", "a": "w2"}], tok, prompt_column="q", completion_column="a")
    assert rows == [{"prompt": "w1", "completion": "w2"}]
    rows = load_sft_rows([{"conv": [user("w1"), bot("w2")]}], tok, messages_column="conv")
    assert rows == [{"prompt": "user : w1 assistant : ", "completion": "w2 <eos> "}]


def test_sft_template_that_is_not_prefix_consistent_is_refused():
    odd = build_tokenizer(WORDS)
    # The generation prompt says "w9" where the rendered assistant turn says "assistant".
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}w9 : {% endif %}"
    )
    with pytest.raises(DataFormatError, match="not prefix-consistent"):
        load_sft_rows([{"messages": [user("w1"), bot("w2")]}], odd, skip_bad_rows=True)


def test_sft_messages_must_end_with_assistant(tok):
    with pytest.raises(DataFormatError, match="row 1: field 'messages' must end with the assistant"):
        load_sft_rows([{"messages": [user("w1")]}], tok)
    with pytest.raises(DataFormatError, match="row 1: field 'messages' must end with the assistant"):
        load_sft_rows([{"messages": [user("w1"), bot("w2"), user("w3")]}], tok)


# ----------------------------------------------------------------------------- preference


def test_preference_plain_text():
    rows = load_preference_rows([{"prompt": "w1", "chosen": "w2", "rejected": "w3", "score": 1}])
    assert rows == [{"prompt": "w1", "chosen": "w2", "rejected": "w3"}]


def test_preference_prompt_messages_with_assistant_replies(tmp_path, tok):
    row = {"prompt": [user("w1")], "chosen": [bot("w2")], "rejected": [bot("w3")]}
    rows = load_preference_rows(str(write_jsonl(tmp_path / "p.jsonl", [row])), tok)
    assert rows == [{"prompt": "user : w1 assistant : ", "chosen": "w2 <eos> ", "rejected": "w3 <eos> "}]


def test_preference_conversational_without_and_with_prompt(tok):
    chosen, rejected = [user("w1"), bot("w2"), user("w3"), bot("w4")], [user("w1"), bot("w2"), user("w3"), bot("w5")]
    expected = {
        "prompt": "user : w1 assistant : w2 <eos> user : w3 assistant : ",
        "chosen": "w4 <eos> ",
        "rejected": "w5 <eos> ",
    }
    assert load_preference_rows([{"chosen": chosen, "rejected": rejected}], tok) == [expected]
    # ultrafeedback_binarized style: a prompt column beside full conversations.
    assert load_preference_rows([{"prompt": "w3", "chosen": chosen, "rejected": rejected}], tok) == [expected]


def test_preference_conversations_must_share_their_prefix(tok):
    with pytest.raises(DataFormatError, match="row 1: field 'rejected' must repeat"):
        load_preference_rows([{"chosen": [user("w1"), bot("w2")], "rejected": [user("w9"), bot("w3")]}], tok)


def test_preference_hh_rlhf_text(tmp_path):
    prompt = "\n\nHuman: w1\n\nAssistant: w2\n\nHuman: w3\n\nAssistant:"
    source = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": prompt + " w4", "rejected": prompt + " w5 w6"}])
    assert load_preference_rows(str(source)) == [{"prompt": prompt, "chosen": " w4", "rejected": " w5 w6"}]


def test_preference_hh_rlhf_with_different_prompts_is_a_bad_row():
    row = {"chosen": "\n\nHuman: w1\n\nAssistant: w2", "rejected": "\n\nHuman: w9\n\nAssistant: w3"}
    with pytest.raises(DataFormatError, match="row 1: field 'rejected' does not share"):
        load_preference_rows([row])


# ----------------------------------------------------------------------------- bad rows and columns


def test_bad_row_error_names_file_row_field_and_value(tmp_path):
    good = {"prompt": "w1"}
    source = write_jsonl(tmp_path / "data.jsonl", [good, good, {"prompt": ""}, good])
    with pytest.raises(DataFormatError, match=r"data\.jsonl row 3: field 'prompt' is empty; got ''") as info:
        load_prompt_rows(str(source))
    assert (info.value.row, info.value.field) == (3, "prompt")
    with pytest.raises(DataFormatError, match=r"<list> row 4: field 'prompt' is missing \(null\)"):
        load_prompt_rows([good] * 3 + [{"prompt": None}])
    with pytest.raises(
        DataFormatError, match=r"<list> row 5: field 'prompt' must be a string or a list of .*, not int; got 5"
    ):
        load_prompt_rows([good] * 4 + [{"prompt": 5}])
    with pytest.raises(DataFormatError, match=r"row 1: field 'prompt' message 0 must be a dict with string 'role'"):
        load_prompt_rows([{"prompt": [{"role": "user", "content": 3}]}])


def test_long_bad_values_are_truncated():
    with pytest.raises(DataFormatError) as info:
        load_prompt_rows([{"prompt": ["x" * 500]}])
    assert "..." in str(info.value) and len(str(info.value)) < 300


def test_bad_row_in_directory_names_the_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "w1"}, {"prompt": "w2"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "w3"}, {"prompt": None}])
    with pytest.raises(DataFormatError, match=r"b\.jsonl row 2: field 'prompt'"):
        load_prompt_rows(str(tmp_path))


def test_skip_bad_rows_skips_and_warns_once(tmp_path):
    rows = [{"prompt": "w1"}, {"prompt": None}, {"prompt": "w3"}, {"prompt": "  "}, {"prompt": "w5"}]
    source = write_jsonl(tmp_path / "data.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = load_prompt_rows(str(source), skip_bad_rows=True)
    assert [r["prompt"] for r in kept] == ["w1", "w3", "w5"]
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and "skipped 2 of 5 rows" in messages[0] and "rows 2, 4" in messages[0]


def test_skip_bad_rows_in_preference_data(tok):
    rows = [
        {"prompt": "w1", "chosen": "w2", "rejected": "w3"},
        {"prompt": "w1", "chosen": "w2", "rejected": [bot("w3")]},
    ]
    with pytest.warns(UserWarning, match="skipped 1 of 2 rows"):
        assert load_preference_rows(rows, tok, skip_bad_rows=True) == rows[:1]


def test_zero_usable_rows_is_an_error(tmp_path):
    with pytest.raises(DataFormatError, match="no usable rows; all 1 rows were bad"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_prompt_rows([{"prompt": None}], skip_bad_rows=True)
    with pytest.raises(DataFormatError, match="no usable rows"):
        load_prompt_rows([])


def test_missing_column_lists_columns_and_close_match(tmp_path):
    source = write_jsonl(tmp_path / "data.jsonl", [{"prompts": "w1", "answer": "5"}])
    expected = (
        r"data\.jsonl has no column 'prompt' \(did you mean 'prompts'\?\); columns present: \['prompts', 'answer'\]"
    )
    with pytest.raises(DataFormatError, match=expected):
        load_prompt_rows(str(source))
    with pytest.raises(
        DataFormatError, match=r"has no column 'completion' \(did you mean 'completions'\?\) or 'messages'"
    ):
        load_sft_rows([{"prompt": "w1", "completions": "w2"}], None)
    with pytest.raises(DataFormatError, match=r"has no column 'rejected' \(did you mean 'Rejected'\?\)"):
        load_preference_rows([{"chosen": "w1", "Rejected": "w2"}])
