"""The GPT-2 tokenizer, loadable without internet access.

``tiktoken.get_encoding("gpt2")`` downloads ``vocab.bpe``/``encoder.json`` from
OpenAI's blob storage on first use, which fails (or hangs) on machines that can
only reach package registries. The GPT-2 encoding is, however, fully described by
three things:

* the ``r50k_base`` BPE ranks file (50,256 mergeable tokens, sha256 pinned below),
* the GPT-2 pre-tokenisation regex,
* one special token, ``<|endoftext|>`` = 50256.

This module keeps a verified copy of the ranks file in a local cache and builds
the ``tiktoken.Encoding`` from it. When the file is missing it is obtained, in
order, from:

1. tiktoken's own download cache (populated wherever tiktoken once had internet);
2. the PyPI source distribution ``openai-whisper==20250625``, fetched with pip
   (the ordinary, configured registry client), which ships a byte-identical copy
   at ``whisper/assets/gpt2.tiktoken``. Only that one member is read; whisper is
   never installed (it would drag in numba and triton).

Every byte that reaches the cache, or is read from it, is checked against a
pinned sha256, so a truncated download or a tampered archive can never silently
change token ids (which would invalidate every dataset and checkpoint).

CLI: ``python -m minigpt.tokenizer --prefetch`` makes sure the file is cached and
prints its path (used by ``scripts/setup.sh``).
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import tiktoken

from minigpt.fetch import PypiArchive, cache_dir, fetch_pypi, read_member
from minigpt.io import DataError, sha256_bytes, write_bytes_atomic

__all__ = [
    "EOT_ID",
    "EOT_TOKEN",
    "N_VOCAB",
    "SUPPORTED_TOKENIZERS",
    "TokenizerCacheWarning",
    "ensure_ranks_file",
    "get_tokenizer",
    "gpt2_vocabulary",
]

#: Id of ``<|endoftext|>``, used as document separator and end-of-sequence.
EOT_ID: int = 50256
EOT_TOKEN: str = "<|endoftext|>"
#: Vocabulary size of the GPT-2 encoding (50,256 BPE tokens + ``<|endoftext|>``).
N_VOCAB: int = 50257

SUPPORTED_TOKENIZERS: tuple[str, ...] = ("gpt2",)

#: sha256 of the r50k_base / GPT-2 ranks file (as published by tiktoken).
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
RANKS_FILENAME = "gpt2.tiktoken"

# The GPT-2 split regex in the form tiktoken uses (possessive quantifiers make it
# faster; it splits text exactly like the original GPT-2 pattern
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ ).
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# Where tiktoken itself would download r50k_base; its cache key is sha1(url).
_TIKTOKEN_R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"

# The PyPI sdist carrying a copy of the ranks file, and where in it.
WHISPER_SDIST = PypiArchive(
    "openai-whisper", "20250625", "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
)
_WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
_MAX_RANKS_BYTES = 16 * 1024 * 1024  # the real file is ~1.6 MB


class TokenizerCacheWarning(UserWarning):
    """A cached ranks file was found corrupt and is being replaced."""


def ranks_path() -> Path:
    """Where the verified GPT-2 ranks file lives in the cache."""
    return cache_dir() / "tokenizers" / RANKS_FILENAME


# --------------------------------------------------------------------------- sources


def _fetch_from_tiktoken_cache() -> bytes | None:
    """Return tiktoken's cached r50k_base file if present, else None.

    This never touches the network: tiktoken's downloader has no timeout and can
    hang on machines without internet, so we only reuse what it already cached.
    """
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        root = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        root = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        root = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not root:  # tiktoken treats "" as "caching disabled"
        return None
    candidate = Path(root) / hashlib.sha1(_TIKTOKEN_R50K_URL.encode()).hexdigest()
    try:
        return candidate.read_bytes()
    except OSError:
        return None


def _fetch_from_whisper_sdist() -> bytes:
    """The ranks file inside the pinned whisper sdist (whisper itself is never installed)."""
    return read_member(fetch_pypi(WHISPER_SDIST), _WHISPER_MEMBER, max_bytes=_MAX_RANKS_BYTES, sha256=RANKS_SHA256)


#: Ordered (description, fetcher) pairs tried when the cache is empty. A fetcher
#: returns the ranks bytes, None for "not available here", or raises.
_SOURCES: list[tuple[str, Callable[[], bytes | None]]] = [
    ("tiktoken cache", _fetch_from_tiktoken_cache),
    (f"PyPI sdist {WHISPER_SDIST.requirement}", _fetch_from_whisper_sdist),
]


# --------------------------------------------------------------------------- cache


def ensure_ranks_file() -> Path:
    """Return the path of a cached, sha256-verified GPT-2 ranks file.

    A cached file that fails verification is deleted (with a warning) before any
    refetch, so it can never be used, even if the refetch then fails. Failing that,
    a one-line `DataError` names the file and what each source said.
    """
    path = ranks_path()
    if path.exists():
        actual = sha256_bytes(path.read_bytes())
        if actual == RANKS_SHA256:
            return path
        warnings.warn(
            f"cached tokenizer file {path} failed sha256 verification "
            f"(got {actual}, expected {RANKS_SHA256}); deleting and re-fetching it",
            TokenizerCacheWarning,
            stacklevel=2,
        )
        path.unlink(missing_ok=True)

    errors: list[str] = []
    for label, fetch in _SOURCES:
        try:
            data = fetch()
        except Exception as exc:  # noqa: BLE001 - collected into one clear message below
            errors.append(f"{label}: {exc}")
            continue
        if data is None:
            errors.append(f"{label}: not available")
            continue
        if (actual := sha256_bytes(data)) != RANKS_SHA256:
            errors.append(
                f"{label}: sha256 mismatch for {RANKS_FILENAME} (expected {RANKS_SHA256}, got {actual}); refused"
            )
            continue
        write_bytes_atomic(path, data)
        return path
    raise DataError(f"could not obtain a verified {RANKS_FILENAME} for {path}: " + "; ".join(errors))


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse tiktoken's ranks format: one ``<base64 token> <rank>`` per line.

    Equivalent to ``tiktoken.load.load_tiktoken_bpe`` on a local path, but works
    on bytes we have already verified: the tiktoken loader would read the file a
    second time and also copy it into tiktoken's own cache under /tmp.
    """
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise DataError(f"malformed line {lineno} in {RANKS_FILENAME}: {exc}") from None
    return ranks


def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """Return the GPT-2 ``tiktoken.Encoding``, built once per process.

    Identical to ``tiktoken.get_encoding("gpt2")`` (same ranks, regex and
    ``<|endoftext|>`` = 50256, n_vocab 50257) but needs no internet once the
    ranks file is cached. ``get_tokenizer()`` and ``get_tokenizer("gpt2")``
    return the same object (a bare ``lru_cache`` would key them differently).
    ``get_tokenizer.cache_clear()`` forgets it, e.g. after changing
    ``MINIGPT_CACHE_DIR`` in tests.
    """
    if name not in SUPPORTED_TOKENIZERS:
        raise ValueError(
            f"unknown tokenizer {name!r}; supported: {', '.join(SUPPORTED_TOKENIZERS)}"
        )
    return _load_encoding(name)


@functools.lru_cache(maxsize=None)
def _verified_ranks() -> dict[bytes, int]:
    path = ensure_ranks_file()
    data = path.read_bytes()
    # Re-verify what we actually parse: the file could change between the checks.
    if (actual := sha256_bytes(data)) != RANKS_SHA256:
        raise DataError(f"{path}: sha256 {actual} is not the pinned {RANKS_SHA256}; refusing it")
    return _parse_ranks(data)


@functools.lru_cache(maxsize=None)
def _load_encoding(name: str) -> tiktoken.Encoding:
    enc = tiktoken.Encoding(
        name=name,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=_verified_ranks(),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )
    if enc.eot_token != EOT_ID or enc.n_vocab != N_VOCAB:  # pragma: no cover - guarded by hash
        raise RuntimeError(
            f"built tokenizer is inconsistent: eot={enc.eot_token}, n_vocab={enc.n_vocab}"
        )
    return enc


def _clear_caches() -> None:
    _load_encoding.cache_clear()
    _verified_ranks.cache_clear()


get_tokenizer.cache_clear = _clear_caches  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- GPT-2's own files
def _byte_spelling() -> list[str]:
    """How GPT-2's vocab.json spells each byte: printable Latin-1 bytes as themselves, the
    other 68 (controls, space, 0x7f-0xa0, 0xad) as the code points from 256 on, in byte
    order, so that every token is a string of visible characters."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, hidden = {}, 0
    for byte in range(256):
        if byte in visible:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + hidden)
            hidden += 1
    return [spelling[byte] for byte in range(256)]


@functools.lru_cache(maxsize=None)
def gpt2_vocabulary() -> tuple[list[str], list[tuple[str, str]]]:
    """GPT-2's vocabulary as its original files spell it: the token strings by id (vocab.json,
    `<|endoftext|>` last) and the merges in rank order (merges.txt), which GGUF and Hugging
    Face tokenizers need and tiktoken's ranks file leaves implicit.

    Each multi-byte token's merge is recovered by running BPE on its bytes with the merges
    of lower rank only: the last two parts left are the pair whose merge made it.
    """
    ranks = _verified_ranks()
    spell = _byte_spelling()
    tokens = [""] * len(ranks)
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        tokens[rank] = "".join(spell[b] for b in token)
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                raise DataError(f"{RANKS_FILENAME}: token {rank} cannot be built from lower-ranked merges")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(tuple("".join(spell[b] for b in part) for part in parts))
    return [*tokens, EOT_TOKEN], merges


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m minigpt.tokenizer",
        description="Offline GPT-2 tokenizer: cache and inspect its verified ranks file.",
    )
    parser.add_argument(
        "--prefetch",
        action="store_true",
        help="make sure the verified ranks file is cached (fetching it if needed) and print its path",
    )
    parser.add_argument("--encode", metavar="TEXT", help="print the token ids of TEXT")
    args = parser.parse_args(argv)
    if not (args.prefetch or args.encode is not None):
        parser.print_help()
        return 2
    try:
        if args.prefetch:
            path = ensure_ranks_file()
            enc = get_tokenizer("gpt2")
            check = enc.encode("Hello, world")
            if check != [15496, 11, 995]:
                raise DataError(f"self-check failed: 'Hello, world' -> {check}")
            print(path)
        if args.encode is not None:
            print(get_tokenizer("gpt2").encode(args.encode, allowed_special="all"))
    except (DataError, OSError) as exc:
        print(f"minigpt.tokenizer: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
