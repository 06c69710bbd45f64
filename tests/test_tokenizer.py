"""Tests for the offline GPT-2 tokenizer (src/minigpt/tokenizer.py).

The good ranks file comes from the user's normal cache (``--prefetch`` in setup
fills it); every test that exercises cache logic works on a private copy in a
tmp dir, with the network-facing fetchers replaced so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from minigpt import fetch
from minigpt import tokenizer as tok
from minigpt.io import DataError


def _fail(*_args: object, **_kwargs: object) -> bytes:
    raise AssertionError("a download was attempted although the cache should have sufficed")


@pytest.fixture(scope="session")
def good_bytes() -> bytes:
    """The verified ranks file, from the real cache (fetched once if missing)."""
    data = tok.ensure_ranks_file().read_bytes()
    assert hashlib.sha256(data).hexdigest() == tok.RANKS_SHA256
    return data


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the cache at an empty tmp dir and forbid every real fetch."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tok, "_SOURCES", [("tiktoken cache", _fail), ("pypi", _fail)])
    tok.get_tokenizer.cache_clear()
    yield tmp_path / "cache" / "tokenizers" / "gpt2.tiktoken"
    tok.get_tokenizer.cache_clear()


# ------------------------------------------------------------------ encoding


def test_hello_world_ids(good_bytes: bytes) -> None:
    enc = tok.get_tokenizer()
    assert enc.encode("Hello, world") == [15496, 11, 995]
    assert enc.name == "gpt2"


def test_unicode_round_trip(good_bytes: bytes) -> None:
    enc = tok.get_tokenizer("gpt2")
    text = "Grüße, 世界! naïve café — 🚀🤖 e\u0301 Ωμέγα\n\ttabs  and   spaces 'll 're 123456"
    ids = enc.encode(text)
    assert all(0 <= i < tok.N_VOCAB for i in ids)
    assert enc.decode(ids) == text
    # Byte-level BPE must also round-trip arbitrary bytes split across tokens.
    assert enc.decode_bytes(enc.encode("🚀")) == "🚀".encode()


def test_special_token_and_vocab(good_bytes: bytes) -> None:
    enc = tok.get_tokenizer()
    assert enc.n_vocab == 50257 == tok.N_VOCAB
    assert enc.eot_token == 50256 == tok.EOT_ID
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    # Plain text containing the marker must not silently become the special token.
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")
    assert 50256 not in enc.encode_ordinary("<|endoftext|>")


def test_matches_tiktoken_builtin_when_cached(good_bytes: bytes) -> None:
    """Our Encoding and tiktoken's r50k_base agree on a mixed sample."""
    import tiktoken

    ranks = tok._parse_ranks(good_bytes)
    ref = tiktoken.Encoding(
        name="r50k_ref",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )
    sample = "It's 2024.  Don't   panic!\n\n  The quick brown fox — 😀 jumps; x+=1\t\n"
    assert tok.get_tokenizer().encode(sample) == ref.encode(sample)


def test_unknown_name_lists_supported() -> None:
    with pytest.raises(ValueError, match="supported: gpt2"):
        tok.get_tokenizer("cl100k_base")


def test_encoding_is_cached_per_process(good_bytes: bytes) -> None:
    assert tok.get_tokenizer() is tok.get_tokenizer("gpt2")


# ------------------------------------------------------------------ cache logic


def test_offline_load_from_verified_cache(
    good_bytes: bytes, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolated_cache.parent.mkdir(parents=True)
    isolated_cache.write_bytes(good_bytes)
    # Belt and braces: even a direct call to the real fetchers would fail.
    monkeypatch.setattr(tok, "_fetch_from_whisper_sdist", _fail)
    monkeypatch.setattr(tok, "_fetch_from_tiktoken_cache", _fail)
    monkeypatch.setattr(fetch.subprocess, "run", _fail)
    enc = tok.get_tokenizer()
    assert enc.encode("Hello, world") == [15496, 11, 995]
    assert tok.ensure_ranks_file() == isolated_cache


@pytest.mark.parametrize("corruption", ["garbage", "flip_byte", "truncate"])
def test_corrupt_cache_is_replaced_never_used(
    good_bytes: bytes, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, corruption: str
) -> None:
    isolated_cache.parent.mkdir(parents=True)
    if corruption == "garbage":
        bad = b"not a ranks file\n" * 100
    elif corruption == "flip_byte":
        # A single flipped bit: the kind of damage only the hash check catches.
        buf = bytearray(good_bytes)
        buf[len(buf) // 2] ^= 0x01
        bad = bytes(buf)
    else:
        bad = good_bytes[: len(good_bytes) // 2]
    isolated_cache.write_bytes(bad)

    calls: list[str] = []

    def fetch_good() -> bytes:
        # The corrupt file must already be gone when the refetch starts.
        calls.append("fetch")
        assert not isolated_cache.exists()
        return good_bytes

    monkeypatch.setattr(tok, "_SOURCES", [("tiktoken cache", lambda: None), ("test", fetch_good)])
    with pytest.warns(tok.TokenizerCacheWarning, match="failed sha256 verification"):
        enc = tok.get_tokenizer()
    assert calls == ["fetch"]
    assert enc.encode("Hello, world") == [15496, 11, 995]
    assert isolated_cache.read_bytes() == good_bytes
    # No temp files left behind by the atomic write.
    assert sorted(p.name for p in isolated_cache.parent.iterdir()) == ["gpt2.tiktoken"]


def test_corrupt_cache_not_used_even_if_refetch_fails(
    isolated_cache: Path,
) -> None:
    isolated_cache.parent.mkdir(parents=True)
    isolated_cache.write_bytes(b"corrupt")
    with pytest.warns(tok.TokenizerCacheWarning), pytest.raises(DataError, match="could not obtain"):
        tok.get_tokenizer()
    assert not isolated_cache.exists()


def test_wrong_hash_source_is_refused(
    good_bytes: bytes, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil = good_bytes.replace(b" 995\n", b" 996\n", 1)  # one rank changed
    assert evil != good_bytes
    monkeypatch.setattr(tok, "_SOURCES", [("evil mirror", lambda: evil)])
    with pytest.raises(DataError) as info:
        tok.get_tokenizer()
    msg = str(info.value)
    assert "\n" not in msg
    assert "evil mirror" in msg and "gpt2.tiktoken" in msg
    assert tok.RANKS_SHA256 in msg and hashlib.sha256(evil).hexdigest() in msg
    assert not isolated_cache.exists()


def test_falls_through_to_next_source(
    good_bytes: bytes, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> bytes:
        raise RuntimeError("no network")

    monkeypatch.setattr(
        tok, "_SOURCES", [("a", lambda: None), ("b", broken), ("c", lambda: b"x"), ("d", lambda: good_bytes)]
    )
    assert tok.ensure_ranks_file() == isolated_cache
    assert isolated_cache.read_bytes() == good_bytes


def test_reuses_tiktoken_download_cache(
    good_bytes: bytes, isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tk_cache = tmp_path / "tiktoken-cache"
    tk_cache.mkdir()
    key = hashlib.sha1(
        b"https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    ).hexdigest()
    (tk_cache / key).write_bytes(good_bytes)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tk_cache))
    monkeypatch.setattr(
        tok, "_SOURCES", [("tiktoken cache", tok._fetch_from_tiktoken_cache), ("pypi", _fail)]
    )
    assert tok.ensure_ranks_file().read_bytes() == good_bytes


def test_ranks_file_lives_in_the_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path))
    assert tok.ranks_path() == tmp_path / "tokenizers" / "gpt2.tiktoken"


# ------------------------------------------------------------------ fetching and the CLI


@pytest.mark.slow
def test_real_pypi_fetch(isolated_cache: Path, good_bytes: bytes) -> None:
    """End-to-end: pip download of the pinned sdist yields the verified file."""
    assert tok._fetch_from_whisper_sdist() == good_bytes


def test_cli_prefetch(good_bytes: bytes, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(tok, "_SOURCES", [("test", lambda: good_bytes)])
    assert tok.main(["--prefetch"]) == 0
    assert capsys.readouterr().out.strip() == str(isolated_cache)
    assert isolated_cache.read_bytes() == good_bytes
    assert os.access(isolated_cache, os.R_OK)


def test_cli_prefetch_error_is_one_line(isolated_cache: Path, capsys) -> None:
    assert tok.main(["--prefetch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minigpt.tokenizer: error: ") and err.count("\n") == 1
