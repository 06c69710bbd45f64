"""Checkpoints: exact round trip; corrupted, foreign and code-running files are refused."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minigpt.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from minigpt.config import ModelConfig
from minigpt.model import GPTModel

TINY = dict(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1)
STATE = {"step": 7, "tokens_seen": 448, "best_val_loss": float("inf"), "train_loader": {"epoch": 1, "position": 2}}


def _trained(tie_weights: bool = True) -> tuple[GPTModel, torch.optim.AdamW]:
    """A model and optimizer after two steps, so the AdamW moments are not zero."""
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**TINY, tie_weights=tie_weights))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        x = torch.randint(0, 64, (2, 8))  # (batch, seq)
        model(x, x).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model, optimizer = _trained()
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, optimizer, STATE)
    return path


@pytest.mark.parametrize("tie_weights", [True, False])
def test_round_trip_restores_weights_optimizer_state_and_rng(tmp_path, tie_weights):
    model, optimizer = _trained(tie_weights)
    torch.manual_seed(123)
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, optimizer, STATE)
    expected_draw = torch.rand(5)  # what the RNG gives right after saving

    torch.manual_seed(0)
    fresh = GPTModel(ModelConfig(**TINY, tie_weights=tie_weights))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = load_checkpoint(path, fresh, fresh_opt, restore_rng=True)

    assert state == STATE  # including inf, which JSON cannot spell
    assert torch.equal(torch.rand(5), expected_draw)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert (fresh.out_head.weight is fresh.tok_emb.weight) == tie_weights
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    # JSON has no tuples: betas come back as a list, which AdamW unpacks just the same.
    assert [{**g, "betas": tuple(g["betas"])} for g in loaded["param_groups"]] == saved["param_groups"]
    for pid, pstate in saved["state"].items():
        for key, value in pstate.items():
            assert torch.equal(value, loaded["state"][pid][key]), (pid, key)


def test_tied_head_is_stored_once(checkpoint):
    tensors, _ = read_checkpoint(checkpoint)
    assert "model.tok_emb.weight" in tensors and "model.out_head.weight" not in tensors


def test_checkpoint_of_another_model_size_is_refused(checkpoint):
    bigger = GPTModel(ModelConfig(**{**TINY, "emb_dim": 32}))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(checkpoint, bigger)
    untied = GPTModel(ModelConfig(**TINY, tie_weights=False))
    with pytest.raises(CheckpointError, match=r"missing \['out_head.weight'\]"):
        load_checkpoint(checkpoint, untied)


def _flip(path: Path, offset: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01  # one bit: the smallest possible corruption
    path.write_bytes(bytes(data))
    return bytes(data)


def _regions(path: Path) -> dict[str, int]:
    """Byte offsets of named places inside a safetensors file (8-byte length, JSON header, tensor data)."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + header_len]
    return {
        "header length": 0,
        "tensor table": 8 + header.index(b'"model.tok_emb.weight"') + 3,
        "step in state": 8 + header.index(b'step') + 9,
        "optimizer lr": 8 + header.index(b'lr') + 6,
        "python rng": 8 + header.index(b'python') + 20,
        "payload sha256": 8 + header.index(b'payload_sha256') + 30,
        "first tensor byte": 8 + header_len,
        "middle tensor byte": 8 + header_len + (len(raw) - 8 - header_len) // 2,
        "last byte": len(raw) - 1,
    }


def test_every_single_bit_flip_is_detected(checkpoint, tmp_path):
    """Corruption anywhere, tensor bytes or metadata (step, lr, RNG), is an error, never a silent change."""
    pristine = checkpoint.read_bytes()
    model = GPTModel(ModelConfig(**TINY))
    regions = _regions(checkpoint)
    # Named places plus an even sweep through the whole file.
    offsets = sorted(set(regions.values()) | set(range(0, len(pristine), max(1, len(pristine) // 150))))
    for offset in offsets:
        checkpoint.write_bytes(pristine)
        _flip(checkpoint, offset)
        with pytest.raises(CheckpointError, match=str(checkpoint)):
            load_checkpoint(checkpoint, model, restore_rng=True)


def test_truncated_checkpoint_is_refused(checkpoint):
    data = checkpoint.read_bytes()
    model = GPTModel(ModelConfig(**TINY))
    for keep in (0, 4, 100, len(data) // 2, len(data) - 1):
        checkpoint.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_checkpoint(checkpoint, model)


def test_foreign_safetensors_without_our_metadata_is_refused(tmp_path):
    model = GPTModel(ModelConfig(**TINY))
    plain = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "out_head.weight"}, str(plain))
    with pytest.raises(CheckpointError, match="not a minigpt checkpoint"):
        load_checkpoint(plain, model)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a minigpt checkpoint"):
        load_checkpoint(other, model)


def test_random_bytes_and_missing_file_are_refused(tmp_path):
    model = GPTModel(ModelConfig(**TINY))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(junk, model)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.safetensors", model)


class _RunsCode:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_pickle(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / f"{name}.pwned"
    path = tmp_path / name
    torch.save({"model": _RunsCode(marker), "weights": torch.zeros(3)}, path)
    return path, marker


def test_the_malicious_pickle_really_runs_code_when_unpickled(tmp_path):
    """The control: plain unpickling (in another process) does create the marker."""
    path, marker = _malicious_pickle(tmp_path, "control.pt")
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True)
    assert marker.exists()


def test_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    model = GPTModel(ModelConfig(**TINY))
    for name in ("last.safetensors", "ckpt.pt"):
        path, marker = _malicious_pickle(tmp_path, name)
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_checkpoint(path, model)
        assert not marker.exists()


def test_pickled_hf_weights_are_refused_without_running_them(tmp_path):
    path, marker = _malicious_pickle(tmp_path, "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        GPTModel.from_hf_gpt2(path)
    assert not marker.exists()


def test_save_is_atomic_and_leaves_no_temporary_files(checkpoint):
    model, optimizer = _trained()
    save_checkpoint(checkpoint, model, optimizer, {**STATE, "step": 8})  # overwrite in place
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.safetensors"]
    assert load_checkpoint(checkpoint, GPTModel(ModelConfig(**TINY)))["step"] == 8


def test_header_only_state_read(checkpoint, tmp_path):
    """What the pipeline reads to decide whether to resume: refuses foreign, old and broken files."""
    assert read_checkpoint_state(checkpoint) == STATE
    old = tmp_path / "old.safetensors"
    save_file({"w": torch.zeros(2)}, str(old), metadata={"format": "minigpt-checkpoint", "version": "1", "state": "{}"})
    for reader in (read_checkpoint_state, lambda p: load_checkpoint(p, GPTModel(ModelConfig(**TINY)))):
        with pytest.raises(CheckpointError, match="format version '1', expected '2'"):
            reader(old)
    broken = tmp_path / "broken.safetensors"
    raw = checkpoint.read_bytes()
    start = raw.index(b'"state":"') + len(b'"state":"')
    broken.write_bytes(raw[:start] + b"[" + raw[start + 1:])  # the state is no longer JSON
    with pytest.raises(CheckpointError, match="unreadable state"):
        read_checkpoint_state(broken)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint_state(junk)
