"""Acquiring raw text into a document table, and splitting it into train/val."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading

import numpy as np
import pandas as pd
import pytest

from minigpt.config import FilesSource, ShakespeareSource, TableSource, UrlSource
from minigpt.corpus import (
    DataError,
    acquire,
    choose_val_documents,
    iter_documents,
    read_document_index,
    split_documents,
)


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


def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        acquire(FilesSource(kind="files", path=str(src)), tmp_path / "out" / "docs.parquet")
    assert _no_leftovers(tmp_path / "out")


def test_non_utf8_file_names_file_and_offset_and_leaves_no_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_good.txt").write_text("fine")
    (src / "b_latin1.txt").write_bytes("café".encode("latin-1"))  # é = 0xe9 at byte 3
    with pytest.raises(DataError, match=r"b_latin1\.txt: not UTF-8 .*0xe9 at byte offset 3"):
        acquire(FilesSource(kind="files", path=str(src)), tmp_path / "out" / "docs.parquet")
    assert _no_leftovers(tmp_path / "out")


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


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(path))
    return path


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
        DataError, match=r"source.sha256: .*tiny\.txt has sha256 [0-9a-f]{64}, expected 0{64}"
    ):
        acquire(
            UrlSource(kind="url", url=f"{base}/tiny.txt", sha256=wrong), tmp_path / "out" / "docs.parquet"
        )
    assert _no_leftovers(tmp_path / "out")
    assert _no_leftovers(cache / "downloads")  # the bad bytes are not kept either


def test_url_source_http_error(http_server, cache, tmp_path):
    _, base = http_server
    with pytest.raises(DataError, match=r"source.url: could not download .*missing\.txt.*404"):
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


# --------------------------------------------------------------------------- split


def _write_corpus(tmp_path, texts: list[str]):
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(texts):
        (src / f"doc{i:03d}.txt").write_text(text)
    docs = tmp_path / "docs.parquet"
    acquire(FilesSource(kind="files", path=str(src)), docs)
    return docs


def test_split_is_deterministic_disjoint_complete_and_faithful(tmp_path):
    rng = np.random.default_rng(0)
    texts = [f"doc {i}: " + "word " * int(rng.integers(10, 200)) for i in range(60)]
    docs = _write_corpus(tmp_path, texts)

    a = split_documents(docs, tmp_path / "a", val_fraction=0.2, seed=7)
    b = split_documents(docs, tmp_path / "b", val_fraction=0.2, seed=7)
    c = split_documents(docs, tmp_path / "c", val_fraction=0.2, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    assert set(a.loc[a.split == "val", "id"]) != set(c.loc[c.split == "val", "id"])

    train_ids, val_ids = (set(a.loc[a.split == s, "id"]) for s in ("train", "val"))
    assert not train_ids & val_ids and train_ids | val_ids == set(range(60))
    # Each split file holds exactly its documents, unchanged.
    for split, ids in (("train", train_ids), ("val", val_ids)):
        assert _texts(tmp_path / "a" / f"{split}.parquet") == [texts[i] for i in sorted(ids)]
    saved = pd.read_csv(tmp_path / "a" / "manifest.csv")
    assert list(saved.columns) == ["id", "title", "split", "char_start", "char_end", "chars", "sha256"]


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5])
def test_split_fraction_is_respected_within_half_a_document(fraction):
    chars = np.random.default_rng(1).integers(100, 5000, size=200)
    is_val = choose_val_documents(chars, fraction, seed=3)
    target = fraction * chars.sum()
    assert abs(chars[is_val].sum() - target) <= chars.max() / 2
    assert 0 < is_val.sum() < len(chars)


def test_split_keeps_one_document_on_each_side():
    assert choose_val_documents([10, 1000], 0.01, seed=0).sum() == 1  # fraction rounds to zero docs
    assert choose_val_documents([1000, 10], 0.99, seed=0).sum() == 1  # or to all of them


def test_single_document_is_split_contiguously_by_characters(tmp_path):
    text = "".join(f"line {i} of the only document\n" for i in range(1000))
    docs = _write_corpus(tmp_path, [text])
    manifest = split_documents(docs, tmp_path / "split", val_fraction=0.1, seed=0)

    train, val = _texts(tmp_path / "split" / "train.parquet"), _texts(tmp_path / "split" / "val.parquet")
    assert train[0] + val[0] == text
    assert len(val[0]) == round(0.1 * len(text))
    assert manifest[["split", "char_start", "char_end"]].values.tolist() == [
        ["train", 0, len(train[0])],
        ["val", len(train[0]), len(text)],
    ]


def test_split_errors(tmp_path):
    docs = _write_corpus(tmp_path, ["x"])
    with pytest.raises(DataError, match="too short to split"):
        split_documents(docs, tmp_path / "split", val_fraction=0.1, seed=0)
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(docs, tmp_path / "split", val_fraction=1.0, seed=0)
    with pytest.raises(DataError, match="document table not found"):
        split_documents(tmp_path / "nope.parquet", tmp_path / "split", val_fraction=0.1, seed=0)
    assert not (tmp_path / "split").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
