"""[1] The datasets users already have → normalized rows for each training stage.

Sources, read through `datasets.load_dataset` (the builder is picked from the file extension):
a `.jsonl`/`.json`/`.csv`/`.parquet`/`.arrow` file, a directory of such files (or a directory made
by `Dataset.save_to_disk`), a `.txt` file with one prompt per line, a `datasets.Dataset`, a Python
list of dicts, or a Hugging Face Hub name (any string that is not a local path).

Formats, one JSONL line each (`load_*_rows` picks the format from the columns present):

- Prompts, plain text (`load_prompt_rows`; extra columns such as `answer` pass through):
    {"prompt": "What is 2 + 3?", "answer": "5"}
- Prompts, chat messages (rendered later with the chat template and its generation prompt):
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}
- Prompts, text file: one prompt per line, empty lines skipped:
    What is 2 + 3?
- SFT, prompt + completion (either may be chat messages; a completion list holds the reply):
    {"prompt": "What is 2 + 3?", "completion": " 5"}
- SFT, conversation (the last assistant message is the completion, everything before is prompt):
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
- Preference, explicit prompt (`load_preference_rows`; chosen/rejected text or assistant messages):
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away."}
- Preference, conversational (two full conversations sharing all but the final assistant turn):
    {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello!"}], "rejected": [...]}
- Preference, hh-rlhf text (the prompt is everything up to the last "\\n\\nAssistant:"):
    {"chosen": "\\n\\nHuman: Say hi\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Say hi\\n\\nAssistant: No."}

Every problem raises `DataFormatError` naming the file, the 1-based row and the field; with
`skip_bad_rows=True` bad rows are dropped instead and one warning counts them. Texts produced from
chat messages include the template's own special tokens, so tokenize them without adding more;
plain-string completions are used verbatim (no EOS is appended here).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from typing import Any

# The readers live in ppo.tables; these names stay importable from here.
from ppo.tables import (  # noqa: F401
    DataFormatError,
    list_columns,
    load_table,
    preview,
    read_prompts_file,
    root_message,
    source_tables,
)

HH_MARKER = "\n\nAssistant:"
_SHOWN_ROWS = 10  # how many row numbers the skip warning lists


class _SamePair(Exception):
    """A preference row whose chosen and rejected replies are the same text: it teaches nothing
    (the Bradley-Terry loss is log 2 whatever the model does). A few are dropped with a warning;
    data where every row is one is refused - the columns are probably mixed up."""


class _BadField(Exception):
    """One row's field is unusable. `fatal` problems (no chat template, a template that is not
    prefix-consistent) concern the whole source, so `skip_bad_rows` does not hide them."""

    def __init__(self, field: str, value: Any, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.field, self.value, self.reason, self.fatal = field, value, reason, fatal


def _text_or_messages(row: dict, field: str) -> str | list[dict]:
    value = row.get(field)
    if isinstance(value, (list, tuple)):
        return _messages(value, field)
    if value is None:
        raise _BadField(field, value, "is missing (null)")
    if not isinstance(value, str):
        raise _BadField(field, value, f"must be a string or a list of chat messages, not {type(value).__name__}")
    if not value.strip():
        raise _BadField(field, value, "is empty")
    return value


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _BadField(field, value, "must be a non-empty list of {'role', 'content'} messages")
    messages = []
    for i, message in enumerate(value):
        ok = isinstance(message, dict) and isinstance(message.get("role"), str) and message["role"]
        if not ok or not isinstance(message.get("content"), str):
            raise _BadField(field, value, f"message {i} must be a dict with string 'role' and 'content'")
        # Arrow gives every message every key seen in the column (None where absent); templates
        # test `'key' in message`, so the None fillers must go.
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _render(tokenizer, messages: list[dict], field: str, generation_prompt: bool) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        reason = "is chat messages, which need a tokenizer with a chat template (pass one, or give text)"
        raise _BadField(field, messages, reason, fatal=True)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # e.g. a template that insists on alternating roles
        raise _BadField(
            field, messages, f"was refused by the chat template ({type(error).__name__}: {error})"
        ) from error


def _split_render(tokenizer, prompt: list[dict], reply: list[dict], field: str) -> tuple[str, str]:
    """(prompt text with generation prompt, rest of the full conversation's text)."""
    if reply[-1]["role"] != "assistant" or not reply[-1]["content"].strip():
        raise _BadField(field, reply, "must end with a non-empty assistant message")
    prompt_text = _render(tokenizer, prompt, field, generation_prompt=True)
    full_text = _render(tokenizer, prompt + reply, field, generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise _BadField(
            field,
            reply,
            (
                "cannot be split from its prompt: the chat template is not prefix-consistent (rendering the "
                "prompt with "
                "add_generation_prompt=True is not a prefix of rendering the whole conversation); fix the template or "
                "give prompt/completion as text"
            ),
            fatal=True,
        )
    return prompt_text, full_text[len(prompt_text) :]


def _prompt_and_reply(tokenizer, prompt, reply, field: str) -> tuple[str, str]:
    """Texts for a prompt (string or messages) and a reply (string or assistant messages)."""
    if isinstance(reply, str):
        return (prompt if isinstance(prompt, str) else _render(tokenizer, prompt, field, True)), reply
    if isinstance(prompt, str):
        if len(reply) != 1 or reply[0]["role"] != "assistant" or not reply[0]["content"].strip():
            raise _BadField(field, reply, "with a text prompt must be one non-empty assistant message")
        return prompt, reply[0]["content"]
    return _split_render(tokenizer, prompt, reply, field)


def _last_turn(messages: list[dict], field: str) -> tuple[list[dict], dict]:
    if messages[-1]["role"] != "assistant":
        raise _BadField(field, messages, "must end with the assistant message to learn from")
    if len(messages) < 2:
        raise _BadField(field, messages, "needs at least one message before the final assistant turn")
    return messages[:-1], messages[-1]


def _hh_split(text: str, field: str) -> tuple[str, str]:
    cut = text.rfind(HH_MARKER)
    if cut < 0:
        raise _BadField(field, text, f"has no {HH_MARKER!r} marker to split the prompt from the reply")
    end = cut + len(HH_MARKER)
    return text[:end], text[end:]


# --- One loader per training stage ---


def load_prompt_rows(
    source, tokenizer=None, prompt_column="prompt", skip_bad_rows=False, split: str = "train"
) -> list[dict]:
    """Rows `{"prompt": str | messages, <other columns unchanged>}` for PPO rollouts.

    Without a prompt column, a `chosen` column gives the prompt (preference data reused): hh-rlhf
    text up to and including the last "\\n\\nAssistant:", or the messages before its final turn. With
    a `tokenizer`, message prompts are test-rendered now so template problems surface at load time.
    """

    def plan(name: str, columns: list[str]) -> Callable[[dict], dict]:
        if prompt_column not in columns and not (prompt_column == "prompt" and "chosen" in columns):
            raise _missing(name, columns, [prompt_column], "pass prompt_column= to name the column holding the prompts")
        from_chosen = prompt_column not in columns

        def convert(row: dict) -> dict:
            field = "chosen" if from_chosen else prompt_column
            prompt = _text_or_messages(row, field)
            if from_chosen:
                prompt = _hh_split(prompt, field)[0] if isinstance(prompt, str) else _last_turn(prompt, field)[0]
            if isinstance(prompt, list) and tokenizer is not None:
                _render(tokenizer, prompt, field, generation_prompt=True)
            rest = {k: v for k, v in row.items() if k not in (prompt_column, "prompt")}
            return {"prompt": prompt, **rest}

        return convert

    return _collect(source, split, plan, skip_bad_rows)


def load_sft_rows(
    source,
    tokenizer,
    prompt_column="prompt",
    completion_column="completion",
    messages_column="messages",
    skip_bad_rows=False,
    split: str = "train",
) -> list[dict]:
    """Rows `{"prompt": str, "completion": str}` as text ready to tokenize, for supervised fine-tuning.

    Prompt/completion columns win when both exist; otherwise a messages column, which must end with
    an assistant message, is split there: prompt = template of the messages before it plus the
    generation prompt, completion = the rest of the full rendered conversation (including the
    template's end-of-turn tokens). Earlier assistant turns stay in the prompt, untrained.
    """

    def plan(name: str, columns: list[str]) -> Callable[[dict], dict]:
        if prompt_column in columns and completion_column in columns:

            def convert(row: dict) -> dict:
                prompt = _text_or_messages(row, prompt_column)
                reply = _text_or_messages(row, completion_column)
                prompt_text, completion_text = _prompt_and_reply(tokenizer, prompt, reply, completion_column)
                return {"prompt": prompt_text, "completion": completion_text}
        elif messages_column in columns:

            def convert(row: dict) -> dict:
                prefix, turn = _last_turn(_messages(row.get(messages_column), messages_column), messages_column)
                prompt_text, completion_text = _split_render(tokenizer, prefix, [turn], messages_column)
                return {"prompt": prompt_text, "completion": completion_text}
        else:
            wanted = [c for c in (prompt_column, completion_column) if c not in columns] + [messages_column]
            raise _missing(
                name,
                columns,
                wanted,
                f"SFT data needs {prompt_column!r} + {completion_column!r} columns, "
                f"or a {messages_column!r} column; pass the *_column= arguments to rename",
            )
        return convert

    return _collect(source, split, plan, skip_bad_rows)


def load_preference_rows(
    source,
    tokenizer=None,
    prompt_column="prompt",
    chosen_column="chosen",
    rejected_column="rejected",
    skip_bad_rows=False,
    split: str = "train",
) -> list[dict]:
    """Rows `{"prompt": str, "chosen": str, "rejected": str}` as text, for reward-model training.

    Per row: chosen/rejected given as full conversations (a non-assistant message in them) are
    split at their final assistant turn, which must follow identical messages; else a prompt column
    pairs with text or assistant-message replies; else hh-rlhf text is split at its last
    "\\n\\nAssistant:" (the replies keep their leading space, so prompt + chosen is the original).
    """

    def plan(name: str, columns: list[str]) -> Callable[[dict], dict]:
        missing = [c for c in (chosen_column, rejected_column) if c not in columns]
        if missing:
            raise _missing(name, columns, missing, "pass chosen_column= / rejected_column= to rename")
        has_prompt = prompt_column in columns

        def convert(row: dict) -> dict:
            pair = _pair(row)
            if pair["chosen"].strip() == pair["rejected"].strip():
                raise _SamePair()
            return pair

        def _pair(row: dict) -> dict:
            chosen = _text_or_messages(row, chosen_column)
            rejected = _text_or_messages(row, rejected_column)
            if isinstance(chosen, list) != isinstance(rejected, list):
                raise _BadField(
                    rejected_column, rejected, f"must have the same type as {chosen_column!r} (text or messages)"
                )
            conversations = isinstance(chosen, list) and any(m["role"] != "assistant" for m in chosen + rejected)
            if conversations:
                return _conversation_pair(chosen, rejected)
            if has_prompt:
                prompt = _text_or_messages(row, prompt_column)
                prompt_text, chosen_text = _prompt_and_reply(tokenizer, prompt, chosen, chosen_column)
                return {
                    "prompt": prompt_text,
                    "chosen": chosen_text,
                    "rejected": _prompt_and_reply(tokenizer, prompt, rejected, rejected_column)[1],
                }
            if isinstance(chosen, list):
                raise _BadField(
                    chosen_column, chosen, f"holds only assistant messages and there is no {prompt_column!r} column"
                )
            return _hh_pair(chosen, rejected)

        def _conversation_pair(chosen: list[dict], rejected: list[dict]) -> dict:
            prefix, chosen_turn = _last_turn(chosen, chosen_column)
            if _last_turn(rejected, rejected_column)[0] != prefix:
                reason = f"must repeat {chosen_column!r}'s messages before the final assistant turn"
                raise _BadField(rejected_column, rejected, reason)
            prompt_text, chosen_text = _split_render(tokenizer, prefix, [chosen_turn], chosen_column)
            rejected_text = _split_render(tokenizer, prefix, rejected[-1:], rejected_column)[1]
            return {"prompt": prompt_text, "chosen": chosen_text, "rejected": rejected_text}

        def _hh_pair(chosen: str, rejected: str) -> dict:
            prompt, chosen_text = _hh_split(chosen, chosen_column)
            rejected_prompt, rejected_text = _hh_split(rejected, rejected_column)
            if rejected_prompt != prompt:
                reason = f"does not share {chosen_column!r}'s text up to the last {HH_MARKER!r}"
                raise _BadField(rejected_column, rejected, reason)
            for field, text in ((chosen_column, chosen_text), (rejected_column, rejected_text)):
                if not text.strip():
                    raise _BadField(field, text, f"has no reply after the last {HH_MARKER!r}")
            return {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}

        return convert

    return _collect(source, split, plan, skip_bad_rows)


# --- Shared driver: plan per file, convert per row, skip or raise ---


def _collect(source, split: str, plan: Callable, skip_bad_rows: bool) -> list[dict]:
    """Convert every row; a bad row raises (or is counted and skipped with `skip_bad_rows`)."""
    rows, skipped, same, total, names = [], [], [], 0, []
    # Lists are used as given, not through arrow, which would fill absent keys with None.
    if isinstance(source, list):
        parts = [("<list>", source, list_columns(source))]
    else:
        parts = [(name, table, table.column_names) for name, table in source_tables(source, split)]
    for name, table, columns in parts:
        names.append(name)
        if len(table) == 0:
            continue  # reported below as "no usable rows", not as a missing column
        convert = plan(name, list(columns))
        for number, row in enumerate(table, start=1):
            total += 1
            try:
                rows.append(convert(row))
            except _SamePair:
                same.append((name, number))
            except _BadField as bad:
                error = DataFormatError(
                    f"{name} row {number}: field {bad.field!r} {bad.reason}; got {preview(bad.value)}",
                    source=name,
                    row=number,
                    field=bad.field,
                )
                if bad.fatal or not skip_bad_rows:
                    raise error from bad.__cause__
                skipped.append((name, number, error))
    where = names[0] if len(names) == 1 else f"{len(names)} files"
    if same:
        shown = ", ".join(f"{n} row {r}" if len(names) > 1 else str(r) for n, r in same[:_SHOWN_ROWS]) + (
            ", ..." if len(same) > _SHOWN_ROWS else ""
        )
        if not rows:
            raise DataFormatError(
                f"{where}: chosen equals rejected in all {len(same)} usable rows (rows {shown}): such pairs teach "
                "nothing; check chosen_column / rejected_column",
                source=where,
                row=same[0][1],
                field="rejected",
            )
        warnings.warn(
            f"dropped {len(same)} of {total} rows of {where} whose chosen equals rejected (rows {shown}): they "
            "teach nothing",
            stacklevel=3,
        )
    if skipped:
        shown = ", ".join(f"{n} row {r}" if len(names) > 1 else str(r) for n, r, _ in skipped[:_SHOWN_ROWS])
        more = ", ..." if len(skipped) > _SHOWN_ROWS else ""
        warnings.warn(
            f"skipped {len(skipped)} of {total} rows of {where} with unusable fields (rows {shown}{more}); "
            f"first problem: {skipped[0][2]}",
            stacklevel=3,
        )
    if not rows:
        detail = f"; all {total} rows were bad, first: {skipped[0][2]}" if skipped else " (it is empty)"
        raise DataFormatError(f"{where} has no usable rows{detail}", source=where)
    return rows


def _missing(name: str, columns: list[str], wanted: list[str], hint: str) -> DataFormatError:
    """The missing-column error: what is wanted, the closest present name, and what is there."""
    asked = []
    for column in wanted:
        close = difflib.get_close_matches(column, columns, n=1, cutoff=0.6)
        close = close or [c for c in columns if c.lower() == column.lower()]
        asked.append(repr(column) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return DataFormatError(
        f"{name} has no column {' or '.join(asked)}; columns present: {columns}. Hint: {hint}", source=name
    )
