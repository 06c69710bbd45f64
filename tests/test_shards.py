"""Token shards: exact round trip through the tokenizer, and a reader that refuses bad files."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest

from minigpt.config import ShakespeareSource
from minigpt.data import documents
from minigpt.data.documents import DocumentWriter, iter_documents
from minigpt.data.shards import (
    HEADER_BYTES,
    load_manifest,
    load_tokens,
    open_shards,
    read_header,
    tokenize_split,
    verify_shards,
    write_shards,
)
from minigpt.data.sources import acquire
from minigpt.data.split import split_documents
from minigpt.io import DataError
from minigpt.tokenizer import EOT_TOKEN, get_tokenizer

DOCS = [
    "Hello, world",
    "naïve café — ünïcode ✓ 日本語 🎭",
    "A document that mentions <|endoftext|> as plain text.",
    "  leading and trailing whitespace \n\n",
    "x",
]


def _docs_table(path, texts):
    with DocumentWriter(path) as writer:
        for i, text in enumerate(texts):
            writer.add(i, f"doc{i}", "test", text)
    return path


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("gpt2")


@pytest.mark.parametrize("num_proc", [1, 2])
def test_decode_of_shards_reproduces_documents_with_eot_separators(tmp_path, monkeypatch, enc, num_proc):
    monkeypatch.setattr(
        documents, "ROW_GROUP_CHARS", 40
    )  # several row groups: the parallel path has work to share
    docs = _docs_table(tmp_path / "docs.parquet", DOCS * 3)
    assert pq.ParquetFile(docs).num_row_groups > 1
    manifest = tokenize_split(docs, tmp_path / "tokens", shard_tokens=7, num_proc=num_proc, progress=False)

    tokens = load_tokens(tmp_path / "tokens")
    assert enc.decode(tokens.tolist()) == EOT_TOKEN.join(DOCS * 3)
    # Exactly one real EOT between consecutive documents; the literal text is encoded as text.
    assert (tokens == enc.eot_token).sum() == len(DOCS) * 3 - 1
    expected = []
    for i, text in enumerate(DOCS * 3):
        expected += ([enc.eot_token] if i else []) + enc.encode_ordinary(text)
    assert tokens.tolist() == expected

    assert manifest["tokens"] == len(tokens) and manifest["documents"] == len(DOCS) * 3
    assert [s["tokens"] for s in manifest["shards"]][:-1] == [7] * (len(manifest["shards"]) - 1)
    assert len(manifest["shards"]) == -(-len(tokens) // 7)
    for shard in manifest["shards"]:
        data = (tmp_path / "tokens" / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert read_header(tmp_path / "tokens" / shard["name"]).tokenizer == "gpt2"
    assert load_manifest(tmp_path / "tokens") == manifest
    verify_shards(tmp_path / "tokens")


def test_default_corpus_round_trip(tmp_path, enc):
    acquire(ShakespeareSource(), tmp_path / "docs.parquet")
    split_documents(tmp_path / "docs.parquet", tmp_path / "split", val_fraction=0.1, seed=1337)
    val = tmp_path / "split" / "val.parquet"
    manifest = tokenize_split(val, tmp_path / "val", num_proc=1, progress=False)
    texts = [doc["text"] for doc in iter_documents(val)]
    assert enc.decode(load_tokens(tmp_path / "val").tolist()) == EOT_TOKEN.join(texts)
    assert manifest["chars"] == sum(map(len, texts))
    assert 0.2 < manifest["tokens"] / manifest["chars"] < 0.4  # English prose: ~3-4 characters per token


def test_rewriting_replaces_the_whole_directory(tmp_path):
    write_shards(
        tmp_path / "t", [np.arange(10, dtype=np.uint16)], tokenizer="gpt2", vocab_size=50257, shard_tokens=3
    )
    write_shards(
        tmp_path / "t", [np.arange(5, dtype=np.uint16)], tokenizer="gpt2", vocab_size=50257, shard_tokens=10
    )
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["manifest.json", "shard_000000.bin"]
    assert load_tokens(tmp_path / "t").tolist() == list(range(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temp or old directories left


@pytest.fixture
def shard_dir(tmp_path):
    write_shards(
        tmp_path / "t", [np.arange(100, dtype=np.uint16)], tokenizer="gpt2", vocab_size=50257, shard_tokens=60
    )
    return tmp_path / "t"


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_header_rejects_foreign_file(shard_dir):
    _patch(shard_dir / "shard_000000.bin", 0, b"NOTMINE!")
    with pytest.raises(DataError, match=r"shard_000000\.bin: not a minigpt token shard"):
        open_shards(shard_dir)


def test_header_rejects_unknown_version(shard_dir):
    _patch(shard_dir / "shard_000000.bin", 8, struct.pack("<I", 99))
    with pytest.raises(DataError, match="format version 99"):
        open_shards(shard_dir)


def test_header_rejects_truncated_body(shard_dir):
    path = shard_dir / "shard_000001.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(
        DataError, match=r"shard_000001\.bin: .*40 tokens need 144 bytes, file has 143 \(truncated\)"
    ):
        open_shards(shard_dir)


def test_header_rejects_truncated_header(shard_dir):
    path = shard_dir / "shard_000000.bin"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DataError, match=f"truncated shard header \\(10 of {HEADER_BYTES} bytes\\)"):
        read_header(path)


def test_header_must_agree_with_manifest(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["shards"][0]["tokens"] = 61
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="disagrees with manifest.json"):
        open_shards(shard_dir)


def test_verify_detects_changed_tokens(shard_dir):
    _patch(shard_dir / "shard_000000.bin", HEADER_BYTES, b"\xff\xff")
    open_shards(shard_dir)  # the header cannot see it ...
    with pytest.raises(DataError, match="sha256 .* does not match"):
        verify_shards(shard_dir)  # ... the checksum can


def test_missing_directory_and_bad_tokenizer(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        open_shards(tmp_path)
    docs = _docs_table(tmp_path / "docs.parquet", ["text"])
    with pytest.raises(DataError, match="data.tokenizer: unknown tokenizer 'bpe9'"):
        tokenize_split(docs, tmp_path / "tokens", tokenizer="bpe9", progress=False)
    assert not (tmp_path / "tokens").exists()


def test_benchmark_measures_the_stage_in_a_subprocess(tmp_path):
    from benchmarks.data import build_repeated_corpus, measure_loader, measure_tokenize

    docs = _docs_table(tmp_path / "docs.parquet", [t * 2000 for t in DOCS])
    size = build_repeated_corpus(docs, tmp_path / "big.parquet", target_bytes=1_000_000)
    assert size >= 1_000_000
    metrics = measure_tokenize(tmp_path / "big.parquet", tmp_path / "tokens")
    assert metrics["tokenize.corpus_mb"] == pytest.approx(size / 1e6, abs=0.01)  # UTF-8 bytes
    assert metrics["tokenize.mb_per_s"] > 0 and 50 < metrics["tokenize.peak_rss_mb"] < 2048
    assert metrics["tokenize.tokens"] == load_manifest(tmp_path / "tokens")["tokens"]
    assert measure_loader(tmp_path / "tokens", batches=10, max_length=16) > 0


def _rewrite_manifest(shard_dir, change) -> None:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    change(manifest)
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../val/shard_000000.bin", "/abs/shard.bin", "..", "", "sub\\shard.bin"])
def test_manifest_may_only_name_files_in_its_own_folder(tmp_path, name):
    """A train manifest pointing into ../val would silently train on the validation split."""
    for split in ("train", "val"):
        write_shards(tmp_path / split, [np.arange(100, dtype=np.uint16)], tokenizer="gpt2", vocab_size=50257,
                     shard_tokens=100)  # fmt: skip
    _rewrite_manifest(tmp_path / "train", lambda m: m["shards"][0].update(name=name))
    with pytest.raises(DataError, match=r"train/manifest\.json: shard name .* is not a file name inside"):
        open_shards(tmp_path / "train")


def test_manifest_without_shard_entries_is_refused(shard_dir):
    _rewrite_manifest(shard_dir, lambda m: m["shards"][1].pop("sha256"))
    with pytest.raises(DataError, match=r"`shards` must be a list of entries with \['name', 'sha256', 'tokens'\]"):
        open_shards(shard_dir)
    _rewrite_manifest(shard_dir, lambda m: m.pop("vocab_size"))
    with pytest.raises(DataError, match="no 'vocab_size' field"):
        open_shards(shard_dir)


def test_shards_of_a_larger_vocabulary_than_the_model_are_refused(shard_dir):
    open_shards(shard_dir, vocab_size=50304)  # a model may round its vocabulary up
    with pytest.raises(DataError, match=r"shard_000000\.bin: tokenizer gpt2 has 50257 token ids, more than the "
                                        r"model's vocab_size 256"):  # fmt: skip
        verify_shards(shard_dir, vocab_size=256)


def test_verify_refuses_token_ids_beyond_the_vocabulary(tmp_path):
    """Ids the header does not allow (a bug in a tokenizer, not damage: the sha256 matches)."""
    write_shards(tmp_path / "t", [np.array([1, 2, 300, 4], dtype=np.uint16)], tokenizer="bytes", vocab_size=256,
                 shard_tokens=10)  # fmt: skip
    open_shards(tmp_path / "t", vocab_size=256)  # the header check cannot see it ...
    with pytest.raises(DataError, match=r"t/shard_000000\.bin: token id 300 is not below the vocab_size 256"):
        verify_shards(tmp_path / "t", vocab_size=256)  # ... reading the ids can

