"""Atomic writes, their leftovers after a kill -9, and the sha256 helpers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.io import (
    atomic_dir,
    atomic_path,
    is_temp_name,
    remove_stale_temp_files,
    sha256_bytes,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)


def test_atomic_path_replaces_the_file_readable_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "out" / "last.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.exists() and not target.exists()
        assert is_temp_name(tmp.name) and tmp.name.startswith(".last.") and tmp.suffix == ".safetensors"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644  # not the 0600 a private temp file would have
    assert os.listdir(target.parent) == ["last.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_matplotlib_can_save_to_the_temporary_path(tmp_path):
    """The temporary name keeps the suffix, from which savefig picks the format."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with atomic_path(tmp_path / "curve.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")


def test_text_and_json_writers(tmp_path):
    write_text_atomic(tmp_path / "a.md", "naïve ✓\n")
    write_json_atomic(tmp_path / "b.json", {"loss": 1.5, "steps": [1, 2]})
    assert (tmp_path / "a.md").read_text(encoding="utf-8") == "naïve ✓\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"loss": 1.5, "steps": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["a.md", "b.json"]


def test_atomic_dir_swaps_whole_directories(tmp_path):
    target = tmp_path / "tokens"
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    with atomic_dir(target) as tmp:
        (tmp / "b.bin").write_bytes(b"2")
    assert os.listdir(target) == ["b.bin"] and target.stat().st_mode & 0o777 == 0o755
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "c.bin").write_bytes(b"3")
        raise ValueError("tokenizer failed")
    assert os.listdir(target) == ["b.bin"]
    assert os.listdir(tmp_path) == ["tokens"]  # no temporary or moved-aside folder left


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from minigpt.io import atomic_dir, atomic_path
folder = Path(sys.argv[1])
with atomic_dir(folder / "train") as tmp_dir:
    (tmp_dir / "shard_000000.bin").write_bytes(b"x" * 1000)
    with atomic_path(folder / "last.safetensors") as tmp:
        tmp.write_bytes(b"x" * 1_000_000)
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_remove_stale_temp_files_after_a_kill_9(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    keep = ["best.safetensors", ".hidden", "notes.tmp", ".notes.tmp", ".x.12345678.tmp.bak.old"]
    for name in keep:
        (folder / name).write_text("mine")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(folder)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL

    leftovers = sorted(set(os.listdir(folder)) - set(keep))
    assert len(leftovers) == 2 and all(is_temp_name(name) for name in leftovers)  # what DVC would track
    assert [p.name for p in remove_stale_temp_files(folder)] == leftovers
    assert sorted(os.listdir(folder)) == sorted(keep)
    assert remove_stale_temp_files(folder) == [] and remove_stale_temp_files(tmp_path / "missing") == []


def test_sha256_helpers_agree_with_hashlib(tmp_path):
    data = os.urandom(3 * 2**20 + 5)  # several read chunks, the last one partial
    (tmp_path / "blob").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "blob") == sha256_bytes(data) == expected
    assert sha256_file(Path(tmp_path / "blob"), chunk_size=7) == expected
