"""Splitting a document table into train/val by whole documents (or one document by characters)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from minigpt.config import FilesSource
from minigpt.data.documents import iter_documents
from minigpt.data.sources import acquire
from minigpt.data.split import choose_val_documents, split_documents
from minigpt.io import DataError


def _texts(path) -> list[str]:
    return [doc["text"] for doc in iter_documents(path)]


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
