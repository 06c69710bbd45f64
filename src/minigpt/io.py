"""File plumbing for every stage: atomic writes, sha256, and the data error type.

Imports no torch: the data stages (prepare, split, tokenize) use it and stay light.

Atomic writes go through a temporary name beside the target, renamed onto it only
when the write has succeeded, so a reader (or DVC) sees the old output or the
complete new one. A process killed with SIGKILL cannot clean up, though, and its
temporary file stays behind. DVC ignores nothing by default (no `.dvcignore` rule
covers these names unless someone adds one), so a checkpoint-sized leftover inside
an output folder would be hashed, cached and pushed with it. Temporary names
therefore follow one recognisable pattern, `.<stem>.<8 hex>.tmp<suffix>`, and
`remove_stale_temp_files` deletes exactly those from a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DataError",
    "atomic_dir",
    "atomic_path",
    "is_temp_name",
    "remove_stale_temp_files",
    "sha256_bytes",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


class DataError(ValueError):
    """Bad data or data config; the message is one line naming the file or field."""


# The target's suffix comes last so that writers which pick a format from the file
# name (matplotlib's savefig, pandas) still recognise it on the temporary name.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[^.]+)?$")


def _temp_sibling(path: Path) -> Path:
    """A fresh temporary name in `path`'s folder: `.<stem>.<8 hex>.tmp<suffix>`."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


def is_temp_name(name: str) -> bool:
    """Whether `name` is a temporary name made by this module's atomic writers."""
    return bool(_TEMP_NAME.match(name))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary file beside `path`; on success it replaces `path` (mode 0644).

    On an exception the temporary file is removed and `path` is left as it was. The
    temporary name keeps `path`'s suffix, so `fig.savefig(tmp)` or `save_file(..., tmp)`
    write the right format. No fsync: callers here write large files (checkpoints,
    tables) whose loss in a power cut costs a re-run, not correctness.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    # O_EXCL: never adopt a file someone else created under the same random name.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        yield tmp
        # Readable like any output (the writer may also have recreated it with its own mode).
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like `atomic_path` for a directory of outputs (shards, splits): yield an empty folder.

    A directory cannot be renamed onto a non-empty one, so an existing `path` is first
    moved aside (under a temporary name, so a crash leaves nothing unrecognisable) and
    deleted after the swap: a reader may briefly find no directory, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = _temp_sibling(path)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically, synced to disk before the rename (small files)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files and folders that interrupted atomic writes left in `directory`.

    Only names of this module's pattern are touched, and only directly in `directory`
    (not below it). Call it when no other process writes there, e.g. before a stage
    starts writing its own output folder: a live writer's temporary file would go too.
    Returns what was removed; a missing `directory` has nothing to remove.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if not is_temp_name(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so a large file is never held whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
