"""Crash-safe directories: what checkpoints need so that a kill (SIGKILL, power loss, a full disk)
at any moment leaves either the previous state or the new one on disk, never a mix.

- A directory is written under a temporary name, every file in it fsynced, then a manifest (every
  file's name, size and sha256) is written last: a directory whose manifest checks out is complete.
- It is published by one rename (atomic on POSIX); the parent directory is fsynced so that the
  rename itself survives a power loss.
- A directory is removed (replaced or pruned) by first renaming it out of sight (`.trash-*`), so a
  kill half-way through the deletion never leaves a half-deleted directory under its real name.
- Small pointer files (`latest`) are replaced by write-fsync-rename.

Every file-system step goes through a function of this module, so that the fault-injection tests
can stop the process between any two of them (tests/integration/test_faults.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = "manifest.json"
TMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new names, renames) durable; a no-op where directories cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def files_under(root: Path) -> list[Path]:
    """Every regular file below `root`, as sorted relative paths (the manifest excluded)."""
    found = [p.relative_to(root) for p in Path(root).rglob("*") if p.is_file()]
    return sorted(p for p in found if p.as_posix() != MANIFEST)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal(root: Path) -> None:
    """Fsync every file of `root`, then write and fsync the manifest (last), then the directories."""
    root = Path(root)
    entries = {}
    for rel in files_under(root):
        fsync_file(root / rel)
        entries[rel.as_posix()] = {"size": (root / rel).stat().st_size, "sha256": sha256(root / rel)}
    manifest = root / MANIFEST
    manifest.write_text(json.dumps({"format": 1, "files": entries}, indent=1), encoding="utf-8")
    fsync_file(manifest)
    for directory in sorted({(root / rel).parent for rel in entries} | {root}, key=lambda p: -len(p.parts)):
        fsync_dir(directory)


def problem(root: Path) -> str | None:
    """What is wrong with a sealed directory (a missing, truncated or altered file, no manifest),
    or None when every file matches its manifest."""
    root = Path(root)
    if not root.is_dir():
        return "it does not exist"
    if not (root / MANIFEST).is_file():
        return f"{MANIFEST} is missing (the directory was not completely written)"
    try:
        files = json.loads((root / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is damaged ({err})"
    for name, want in files.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is truncated or altered ({size} bytes, the manifest says {want['size']})"
        if sha256(path) != want["sha256"]:
            return f"{name} is corrupt (its sha256 differs from the manifest)"
    return None


def fresh_tmp(parent: Path, name: str) -> Path:
    """An empty `parent/.tmp-name` to write into (a leftover of an earlier crash is removed)."""
    tmp = Path(parent) / f"{TMP_PREFIX}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`, replacing (out of sight first) an existing `final`."""
    old = _out_of_sight(final) if final.exists() else None
    rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        remove_tree(old)


def remove(path: Path) -> None:
    """Delete a directory such that a kill half-way never leaves part of it under its name."""
    remove_tree(_out_of_sight(path))


def _out_of_sight(path: Path) -> Path:
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{time.time_ns()}"
    rename(path, trash)
    fsync_dir(path.parent)
    return trash


def remove_tree(path: Path) -> None:
    shutil.rmtree(path)


def clean_leftovers(parent: Path) -> None:
    """Remove what a crashed save left behind: `.tmp-*` and `.trash-*` directories."""
    for leftover in Path(parent).glob(".*"):
        if leftover.is_dir() and leftover.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(leftover, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Replace a small file atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    fsync_file(tmp)
    rename(tmp, path)
    fsync_dir(path.parent)
