"""Reading a data source into `datasets` tables: a file, a directory of files, a saved dataset, a
`datasets.Dataset`, a list of dicts or a Hub name (the formats of the rows are `ppo.formats`').

Every problem raises `DataFormatError` naming the source and, where it applies, the row and field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "txt"}


class DataFormatError(ValueError):
    """A data source that cannot be used: the message names the source ("<list>" / "<dataset>" for
    in-memory data), the 1-based row, the field and the offending value where they apply."""

    def __init__(self, message: str, source: str | None = None, row: int | None = None, field: str | None = None):
        super().__init__(message)
        self.source, self.row, self.field = source, row, field


def read_prompts_file(path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines are skipped, lines are stripped."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a BOM written by some editors is not part of line 1
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path} is not UTF-8 text (bad byte at line {line}); save it as UTF-8", source=str(path)
        ) from None
    # split("\n") rather than splitlines(): the latter also splits on form feeds and U+2028.
    prompts = [line.strip() for line in text.split("\n") if line.strip()]
    if not prompts:
        raise DataFormatError(f"{path} holds no prompts: it is empty or has only blank lines", source=str(path))
    return prompts


def load_table(source, split: str = "train") -> datasets.Dataset:
    """Any supported source (see the module docstring) as one `datasets.Dataset`."""
    if isinstance(source, list):
        columns = list_columns(source)
        # from_list keeps only the first row's keys, so give every row every column explicitly.
        try:
            return datasets.Dataset.from_list([{c: row.get(c) for c in columns} for row in source])
        except Exception as error:  # pyarrow refuses e.g. a column mixing strings and lists
            raise DataFormatError(
                f"<list> cannot be made into a table: {root_message(error)}", source="<list>"
            ) from error
    tables = [table for _, table in source_tables(source, split)]
    try:
        return tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    except Exception as error:
        message = f"the files in {source} do not share one schema: {root_message(error)}"
        raise DataFormatError(message, source=str(source)) from error


def source_tables(source, split: str) -> list[tuple[str, datasets.Dataset]]:
    """(name, table) per file, so that row errors can name the file and count rows within it."""
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return [("<dataset>", _pick_split(source, split, "<dataset>"))]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"a data source is a path, hub name, list of dicts or datasets.Dataset, not {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():  # Dataset.save_to_disk
        return [(str(path), _pick_split(datasets.load_from_disk(str(path)), split, str(path)))]
    if path.is_dir():
        return [(str(f), _load_file(f, split)) for f in _data_files(path)]
    if path.is_file():
        return [(str(path), _load_file(path, split))]
    # A missing path meant as a file gets a plain error, rather than a confusing Hub lookup.
    if str(source).startswith((".", "/", "~")) or "\\" in str(source) or path.suffix.lower() in _BUILDERS:
        raise FileNotFoundError(f"no such data file or directory: {source}")
    return [(str(source), datasets.load_dataset(str(source), split=split))]  # a Hub dataset name


def _load_file(path: Path, split: str) -> datasets.Dataset:
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataFormatError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_BUILDERS)}", source=str(path)
        )
    if builder == "txt":
        return datasets.Dataset.from_dict({"prompt": read_prompts_file(path)})
    if _is_blank(path):  # datasets would say StopIteration or "corresponds to no data"
        raise DataFormatError(f"{path} is empty: it holds no rows", source=str(path))
    try:
        table = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        table.data.validate(full=True)  # pyarrow's JSON reader lets invalid UTF-8 through to row reads
        return table
    except Exception as error:
        if any(isinstance(e, UnicodeDecodeError) or "Invalid UTF8" in str(e) for e in _chain(error)):
            raise DataFormatError(f"{path} is not UTF-8 text; save it as UTF-8", source=str(path)) from error
        bad_line = _first_bad_json_line(path) if builder == "json" else None
        if bad_line is not None:  # pyarrow names a byte position; people look for a line
            row, reason, text = bad_line
            raise DataFormatError(f"{path} {reason}; got {preview(text)}", source=str(path), row=row) from error
        raise DataFormatError(f"could not read {path} as {builder}: {root_message(error)}", source=str(path)) from error


def _is_blank(path: Path, sniff: int = 1 << 16) -> bool:
    """True for a file of zero bytes or (if small) only whitespace."""
    size = path.stat().st_size
    return size == 0 or (size <= sniff and not path.read_bytes().strip())


def _first_bad_json_line(path: Path) -> tuple[int, str, str] | None:
    """(1-based row, where and what is wrong, the line) of the first line of a JSON-lines file that
    is not a JSON object; None when every line is one, or when the file is one JSON document (an
    array: then the error is its own, and the decoder's line and column are reported)."""
    import json

    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return (
                err.lineno,
                f"line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})",
                text.split("\n")[err.lineno - 1],
            )
        return None
    row = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines are no rows
        row += 1
        where = f"row {row}" + (f" (line {number})" if row != number else "")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return (
                row,
                f"{where}: not valid JSON ({err.msg}, column {err.colno}); each line must be one JSON object",
                line,
            )
        if not isinstance(value, dict):
            return (
                row,
                f"{where}: a JSON {type(value).__name__}, not an object; each line must be one JSON object",
                line,
            )
    return None


def _data_files(directory: Path) -> list[Path]:
    """The data files under a directory, all of one kind (hidden files and others are ignored)."""
    files = sorted(
        f
        for f in directory.rglob("*")
        if f.is_file()
        and f.suffix.lower() in _BUILDERS
        and not any(p.startswith(".") for p in f.relative_to(directory).parts)
    )
    if not files:
        raise DataFormatError(
            f"{directory} holds no data files ({', '.join(sorted(_BUILDERS))})", source=str(directory)
        )
    kinds = {_BUILDERS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise DataFormatError(
            f"{directory} mixes file types {sorted(kinds)}; keep one kind per directory", source=str(directory)
        )
    return files


def _pick_split(table, split: str, name: str) -> datasets.Dataset:
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise DataFormatError(f"{name} has no split {split!r}; splits present: {sorted(table)}", source=name)
        return table[split]
    return table


def list_columns(rows: list) -> list[str]:
    columns: dict[str, None] = {}  # a dict keeps first-seen order
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataFormatError(
                f"<list> row {number} must be a dict, not {type(row).__name__}: {preview(row)}",
                source="<list>",
                row=number,
            )
        columns.update(dict.fromkeys(row))
    return list(columns)


def _chain(error: BaseException | None) -> list[BaseException]:
    """An exception and its causes: datasets wraps builder errors in a generic
    DatasetGenerationError, and only the root says what broke."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def root_message(error: BaseException) -> str:
    root = _chain(error)[-1]
    return f"{type(root).__name__}: {root}"


def preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- Field checks and chat-template rendering ---
