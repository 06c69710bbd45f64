"""The `minigpt` console script, run as installed (`.venv/bin/minigpt`), on checkpoints written by
`save_checkpoint`: generated text equals the library's, `info` says what a checkpoint holds, and
every bad input is one line `minigpt: error: ...` with exit status 1. In-process: how the text
streams (a flush per piece, characters split across tokens kept whole)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import serving
from minigpt.checkpoint import save_checkpoint
from minigpt.cli import print_stream
from minigpt.config import ModelConfig
from minigpt.generate import generate
from minigpt.model import GPTModel
from minigpt.serving import load_language_model, stream_text
from minigpt.tasks.classification import SequenceClassifier
from minigpt.tokenizer import EOT_ID, N_VOCAB, RANKS_SHA256, get_tokenizer

CONSOLE_SCRIPT = Path(sys.executable).parent / "minigpt"
CFG = ModelConfig(vocab_size=N_VOCAB, context_length=32, emb_dim=16, n_heads=2, n_layers=1)
RUN_INFO = {"config": {"model": CFG.model_dump(), "train": {"lr": 0.003, "max_steps": 6}},
            "data_sha256": "d" * 64, "code_sha256": "c" * 64, "tokenizer_sha256": RANKS_SHA256,
            "mlflow_run_id": "0123abcd"}
STATE = {"step": 6, "tokens_seen": 768, "best_val_loss": 9.8765, "last_val_loss": 9.9, "run_info": RUN_INFO}


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} is missing: run `make setup` (pyproject.toml declares it)"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"OMP_NUM_THREADS": "1", **env}
    return subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minigpt: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    save_checkpoint(path, GPTModel(CFG), None, STATE)
    return path


def continuation(path: Path, prompt: str, max_new_tokens: int, precision: str = "fp32", **sampling) -> str:
    """What the library's `generate` continues `prompt` with, up to <|endoftext|>."""
    model, _ = load_language_model(path, precision=precision)
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode_ordinary(prompt)])
    seed = sampling.pop("seed", 0)
    new = generate(model, idx, max_new_tokens, eos_id=EOT_ID, generator=torch.Generator().manual_seed(seed),
                   **sampling)[0, idx.shape[1]:].tolist()
    return enc.decode(new[:new.index(EOT_ID)] if EOT_ID in new else new)


def test_generate_prints_the_prompt_and_the_greedy_continuation(checkpoint):
    proc = cli("generate", "--model", str(checkpoint), "ROMEO:", "--max-new-tokens", "12", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ROMEO:" + continuation(checkpoint, "ROMEO:", 12) + "\n"


def test_bf16_weights_decode_as_the_library_does_in_bf16(checkpoint):
    proc = cli("generate", "--model", str(checkpoint), "ROMEO:", "--max-new-tokens", "12", "--precision", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ROMEO:" + continuation(checkpoint, "ROMEO:", 12, precision="bf16") + "\n"
    model, _ = load_language_model(checkpoint, precision="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="expected fp32 or bf16"):
        load_language_model(checkpoint, precision="fp16")


def test_seeded_sampling_is_the_library_s_and_reproducible(checkpoint):
    args = ("generate", "--model", str(checkpoint), "To be", "--max-new-tokens", "10", "--temperature", "1.5",
            "--top-k", "50", "--top-p", "0.95")
    a, b, c = cli(*args, "--seed", "3"), cli(*args, "--seed", "3"), cli(*args, "--seed", "4")
    expected = continuation(checkpoint, "To be", 10, temperature=1.5, top_k=50, top_p=0.95, seed=3)
    assert a.stdout == b.stdout == "To be" + expected + "\n"
    assert c.stdout != a.stdout


def test_a_finetune_checkpoint_generates_from_its_model_config(tmp_path, checkpoint):
    """An instruction finetune keeps the backbone's config as run_info.model_config."""
    model, _ = load_language_model(checkpoint)
    path = tmp_path / "finetuned.safetensors"
    info = {"config": {"finetune": {"task": "instruction"}}, "model_config": CFG.model_dump()}
    save_checkpoint(path, model, None, {"step": 4, "run_info": info})
    proc = cli("generate", "--model", str(path), "Hi", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hi" + continuation(checkpoint, "Hi", 5) + "\n"


def summary(out: str) -> dict[str, str]:
    """The `key: value` lines that `minigpt info` prints before the config."""
    head = out.split("\nconfig:\n")[0].splitlines()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in head)}


def test_info_says_what_the_checkpoint_holds(checkpoint):
    proc = cli("info", str(checkpoint))
    assert proc.returncode == 0, proc.stderr
    assert summary(proc.stdout) == {
        "checkpoint": str(checkpoint), "stage": "pretrain", "step": "6", "tokens seen": "768",
        "best val loss": "9.8765", "last val loss": "9.9000",
        "model": "vocab_size=50257 context_length=32 emb_dim=16 n_heads=2 n_layers=1 dropout=0.0 qkv_bias=False "
                 "tie_weights=True",
        "data sha256": "d" * 64, "code sha256": "c" * 64, "tokenizer sha256": RANKS_SHA256, "mlflow run": "0123abcd"}
    assert "\nconfig:\n  model:\n    vocab_size: 50257\n" in proc.stdout
    assert "  train:\n    lr: 0.003\n    max_steps: 6\n" in proc.stdout


def test_a_classifier_is_refused_for_generate_but_described(tmp_path):
    path = tmp_path / "classifier.safetensors"
    info = {"config": {"finetune": {"task": "classification"}}, "model_config": CFG.model_dump()}
    save_checkpoint(path, SequenceClassifier(GPTModel(CFG), 2), None, {"step": 4, "run_info": info})
    assert_one_line_error(cli("generate", "--model", str(path), "Hi"), "a classifier", "predicts classes, not text")
    assert summary(cli("info", str(path)).stdout)["stage"] == "finetune (classification)"


def test_bad_files_are_one_line_errors(tmp_path):
    assert_one_line_error(cli("generate", "--model", str(tmp_path / "nope.safetensors"), "Hi"), "no such file")
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    assert_one_line_error(cli("generate", "--model", str(pickled), "Hi"), "not a readable safetensors file")
    assert_one_line_error(cli("info", str(pickled)), "not a readable safetensors file")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert_one_line_error(cli("generate", "--model", str(foreign), "Hi"), "not a minigpt checkpoint")
    no_config = tmp_path / "no_config.safetensors"
    save_checkpoint(no_config, GPTModel(CFG), None, {"step": 1})
    assert_one_line_error(cli("generate", "--model", str(no_config), "Hi"), "holds no model config")


def test_bad_settings_are_one_line_errors_before_any_text(checkpoint):
    assert_one_line_error(cli("generate", "--model", str(checkpoint), "Hi", "--temperature", "-1"),
                          "temperature must be >= 0")
    assert_one_line_error(cli("generate", "--model", str(checkpoint), "Hi", "--temperature", "1", "--top-p", "1.5"),
                          "top_p must be in (0, 1]")
    assert_one_line_error(cli("generate", "--model", str(checkpoint), "Hi", "--max-new-tokens", "-2"),
                          "max_new_tokens must be >= 0")
    assert_one_line_error(cli("generate", "--model", str(checkpoint), "Hi", "--device", "tpu"), "device 'tpu'")


def test_bad_uris_are_one_line_errors(tmp_path):
    assert_one_line_error(cli("generate", "--model", "runs:/abc", "Hi", cwd=tmp_path), "expected runs:/<run id>/")
    # No store in this folder and no MLFLOW_TRACKING_URI: MLflow would create an empty one.
    assert_one_line_error(cli("info", "runs:/abc/checkpoint", cwd=tmp_path), "no MLflow store here")
    assert not (tmp_path / "mlflow.db").exists()
    assert_one_line_error(cli("generate", "--model", "models:/minigpt", "Hi", cwd=tmp_path),
                          "expected models:/<name>/<version>")


def test_print_stream_flushes_every_piece():
    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.flushed: list[str] = []

        def flush(self) -> None:
            self.flushed.append(self.getvalue())

    out = Recorder()
    print_stream("Hi", iter([" there", ",", " you"]), out)
    assert out.flushed == ["Hi there", "Hi there,", "Hi there, you"] and out.getvalue() == "Hi there, you\n"


def test_stream_text_keeps_characters_whole_across_tokens(monkeypatch, checkpoint):
    """'é' is two bytes; as two byte tokens, the piece comes whole with the second. An invalid
    byte becomes U+FFFD as in `enc.decode`, and <|endoftext|> ends the text."""
    enc = get_tokenizer()
    tokens = [enc.encode_single_token(b) for b in (b"\xc3", b"\xa9", b" ok", b"\xff", b"!")] + [EOT_ID, 13]
    monkeypatch.setattr(serving, "stream_tokens", lambda *args, **kwargs: iter(tokens))
    model, _ = load_language_model(checkpoint)
    pieces = list(stream_text(model, "x", max_new_tokens=9, temperature=0.0, top_k=0, top_p=1.0, seed=0))
    assert pieces == ["é", " ok", "\ufffd", "!"]
    assert "".join(pieces) == enc.decode(tokens[:5])
