"""Acquiring raw text into a document table: every source, and the errors of bad input."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from minigpt.config import FilesSource, ShakespeareSource, TableSource, UrlSource
from minigpt.data.documents import iter_documents, read_document_index
from minigpt.data.sources import acquire
from minigpt.io import DataError


def _texts(path) -> list[str]:
    return [doc["text"] for doc in iter_documents(path)]


def _no_leftovers(folder) -> bool:
    """Nothing was written: no output, no temp file."""
    return not folder.exists() or not any(folder.iterdir())


# --------------------------------------------------------------------------- local files


def test_folder_source_reads_txt_and_md_recursively_in_order(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "b.md").write_text("# Bee\nsecond")
    (src / "a.txt").write_text("first document\n")
    (src / "nested" / "c.txt").write_text("naïve café — ünïcode ✓")
    (src / "table.csv").write_text("text\nnot a text file\n")
    out = tmp_path / "docs.parquet"

    assert acquire(FilesSource(kind="files", path=str(src)), out) == 3

    index = read_document_index(out)
    assert index["id"].tolist() == [0, 1, 2]
    assert index["title"].tolist() == ["a", "b", "c"]
    texts = _texts(out)
    assert texts == ["first document\n", "# Bee\nsecond", "naïve café — ünïcode ✓"]
    assert index["chars"].tolist() == [len(t) for t in texts]
    assert index["sha256"].tolist() == [hashlib.sha256(t.encode()).hexdigest() for t in texts]


def test_glob_and_single_file_sources(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    out = tmp_path / "out" / "docs.parquet"
    acquire(FilesSource(kind="files", path=str(tmp_path / "x*.txt")), out)
    assert _texts(out) == ["x1.txt", "x2.txt"]
    acquire(FilesSource(kind="files", path=str(tmp_path / "y.txt")), out)
    assert _texts(out) == ["y.txt"]


def test_bom_is_dropped(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    out = tmp_path / "docs.parquet"
    acquire(FilesSource(kind="files", path=str(tmp_path / "bom.txt")), out)
    assert _texts(out) == ["hello"]


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"source.path: .*nowhere.* does not exist"):
        acquire(FilesSource(kind="files", path=str(tmp_path / "nowhere")), tmp_path / "out" / "docs.parquet")
    assert _no_leftovers(tmp_path / "out")


def _assert_files_refused(tmp_path, files: dict[str, bytes], match: str) -> None:
    """Acquiring a folder of these files fails with `match` and writes nothing."""
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    with pytest.raises(DataError, match=match):
        acquire(FilesSource(kind="files", path=str(src)), tmp_path / "out" / "docs.parquet")
    assert _no_leftovers(tmp_path / "out")


def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path):
    _assert_files_refused(tmp_path, {"empty.txt": b""}, "empty corpus")


def test_non_utf8_file_names_file_and_offset_and_leaves_no_output(tmp_path):
    files = {"a_good.txt": b"fine", "b_latin1.txt": "café".encode("latin-1")}  # é = 0xe9 at byte 3
    _assert_files_refused(tmp_path, files, r"b_latin1\.txt: not UTF-8 .*0xe9 at byte offset 3")


def test_nul_characters_are_refused_naming_the_document(tmp_path):
    """NUL is valid UTF-8 but never text: a binary or zero-filled file read as a corpus."""
    files = {"a.txt": b"fine", "b.txt": b"text\x00\x00 more"}
    _assert_files_refused(tmp_path, files, r"b\.txt: a NUL character at character 4; this is binary data, not text")
    table = tmp_path / "rows.jsonl"
    table.write_text('{"text": "ok"}\n{"text": "bad\\u0000"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: a NUL character at character 3"):
        acquire(TableSource(kind="table", path=str(table)), tmp_path / "out" / "docs.parquet")


# --------------------------------------------------------------------------- tables

ROWS = [
    {"body": "first row text", "name": "one"},
    {"body": "second — row ✓", "name": "two"},
    {"body": "", "name": "skipped: empty"},
    {"body": "third", "name": ""},
]


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_table_sources_read_the_named_columns(tmp_path, suffix):
    path = tmp_path / f"rows.{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    elif suffix == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    out = tmp_path / "docs.parquet"
    source = TableSource(kind="table", path=str(path), text_column="body", title_column="name")

    assert acquire(source, out) == 3
    assert _texts(out) == ["first row text", "second — row ✓", "third"]
    assert read_document_index(out)["title"].tolist() == ["one", "two", "rows:4"]


def test_table_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "rows.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"rows\.csv: no column .text.*\['body', 'name'\]"):
        acquire(TableSource(kind="table", path=str(path)), tmp_path / "docs.parquet")


def test_table_non_utf8_offset_is_exact_beyond_the_first_block(tmp_path):
    # Multi-byte characters straddle the 1 MiB read blocks; the bad byte comes after them.
    good = ("text\n" + "é" * 700_000 + "\n").encode()
    path = tmp_path / "big.csv"
    path.write_bytes(good + b"caf\xe9\n")
    with pytest.raises(DataError, match=rf"big\.csv: not UTF-8 .*byte offset {len(good) + 3}\b"):
        acquire(TableSource(kind="table", path=str(path)), tmp_path / "docs.parquet")


# --------------------------------------------------------------------------- URL






def test_url_source_downloads_verifies_and_caches(http_server, cache, tmp_path):
    root, base = http_server
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (root / "tiny.txt").write_text(text)
    sha = hashlib.sha256(text.encode()).hexdigest()
    out = tmp_path / "docs.parquet"

    acquire(UrlSource(kind="url", url=f"{base}/tiny.txt", sha256=sha), out)
    assert _texts(out) == [text]
    assert read_document_index(out)["title"].tolist() == ["tiny.txt"]
    assert (cache / "downloads" / sha).read_text() == text

    (root / "tiny.txt").unlink()  # served from the verified cache from now on
    acquire(UrlSource(kind="url", url=f"{base}/tiny.txt", sha256=sha, title="Tiny"), out)
    assert read_document_index(out)["title"].tolist() == ["Tiny"]


def test_url_source_rejects_wrong_sha256(http_server, cache, tmp_path):
    root, base = http_server
    (root / "tiny.txt").write_text("tampered")
    wrong = "0" * 64
    with pytest.raises(
        DataError, match=r"data.source: .*tiny\.txt has sha256 [0-9a-f]{64}, expected 0{64}"
    ):
        acquire(
            UrlSource(kind="url", url=f"{base}/tiny.txt", sha256=wrong), tmp_path / "out" / "docs.parquet"
        )
    assert _no_leftovers(tmp_path / "out")
    assert _no_leftovers(cache / "downloads")  # the bad bytes are not kept either


def test_url_source_http_error(http_server, cache, tmp_path):
    _, base = http_server
    with pytest.raises(DataError, match=r"data.source: could not download .*missing\.txt.*404"):
        acquire(UrlSource(kind="url", url=f"{base}/missing.txt", sha256="0" * 64), tmp_path / "docs.parquet")


# --------------------------------------------------------------------------- default corpus


def test_default_corpus_is_shakespeare_42_works_with_titles(tmp_path):
    out = tmp_path / "docs.parquet"
    assert acquire(ShakespeareSource(), out) == 42
    index = read_document_index(out)
    assert index["chars"].sum() == 5_057_198  # the 42 *_gut.txt files (pure ASCII, so chars = bytes)
    assert {"Hamlet", "King Lear", "Sonnets", "The Tempest"} <= set(index["title"])
    assert not index["source"].str.contains("_gut_f").any()  # folio duplicates excluded
    assert index["sha256"].is_unique

    assert acquire(ShakespeareSource(max_documents=3), out) == 3  # quick runs: the first texts by file name
    assert read_document_index(out)["title"].tolist() == index["title"].tolist()[:3]
