"""Document tables: the parquet format that the prepare and split stages write, and strict UTF-8.

A document table has one row per document with columns id, title, source, text,
chars and sha256 (of the UTF-8 text). It is written and read one bounded row group
at a time, so a corpus of any size costs a few MB of memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from minigpt.io import DataError, sha256_bytes

# pandas is imported inside the functions that use it: the tokenizer's worker
# processes import this module, and each would otherwise carry its ~40 MB.
if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DOC_SCHEMA",
    "DocumentWriter",
    "check_utf8_file",
    "decode_text",
    "iter_documents",
    "open_document_table",
    "read_document_index",
    "text_sha256",
]

DOC_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("title", pa.string()),
        ("source", pa.string()),
        ("text", pa.large_string()),
        ("chars", pa.int64()),
        ("sha256", pa.string()),
    ]
)
# Characters of text per parquet row group. Row groups are the tokenizer's unit
# of parallel work, and the most any reader holds in memory at once.
ROW_GROUP_CHARS = 2 * 2**20


def text_sha256(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


class DocumentWriter:
    """Append documents to a parquet document table, one bounded row group at a time."""

    def __init__(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, DOC_SCHEMA)
        self._rows: list[dict] = []
        self._buffered_chars = 0
        self.count = 0

    def add(self, doc_id: int, title: str, source: str, text: str) -> None:
        self._rows.append(
            dict(id=doc_id, title=title, source=source, text=text, chars=len(text), sha256=text_sha256(text))
        )
        self._buffered_chars += len(text)
        self.count += 1
        if self._buffered_chars >= ROW_GROUP_CHARS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=DOC_SCHEMA))
            self._rows, self._buffered_chars = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_document_table(path: str | Path) -> pq.ParquetFile:
    """Open a document table for reading, refusing a missing file or a foreign parquet."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: document table not found (run the acquire stage first)")
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in DOC_SCHEMA.names if c not in table.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: not a document table, missing columns {missing}")
    return table


def iter_documents(path: str | Path, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Yield the rows of a document table as dicts, reading one row group at a time."""
    table = open_document_table(path)
    for i in range(table.num_row_groups):
        yield from table.read_row_group(i, columns=list(columns) if columns else None).to_pylist()


def read_document_index(path: str | Path) -> pd.DataFrame:
    """Every column but the text: small enough to hold for any corpus."""
    table = open_document_table(path)
    return table.read(columns=["id", "title", "source", "chars", "sha256"]).to_pandas()


# --------------------------------------------------------------------------- decoding


def _not_utf8(name: str, byte: int, offset: int) -> DataError:
    return DataError(
        f"{name}: not UTF-8 text (byte 0x{byte:02x} at byte offset {offset}); re-save it as UTF-8"
    )


def decode_text(data: bytes, name: str) -> str:
    """Strict UTF-8 (a leading BOM is dropped: it marks the encoding, it is not text)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(name, data[exc.start], exc.start) from None
    return text.removeprefix("\ufeff")


def check_utf8_file(path: Path, block: int = 2**20) -> None:
    """Validate a file as UTF-8 block by block, so a huge table is never read whole."""
    offset, carry = 0, b""  # offset: file position of data[0]; carry: a character cut by the block edge
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            data = carry + chunk
            if not data:
                return
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as exc:
                if not (chunk and exc.reason == "unexpected end of data" and exc.end == len(data)):
                    raise _not_utf8(str(path), data[exc.start], offset + exc.start) from None
                carry = data[exc.start :]
            offset += len(data) - len(carry)
