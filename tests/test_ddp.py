"""Distributed data parallel: `torchrun --nproc_per_node 2` on CPU (gloo) trains like one process.

Same global batch of 8 sequences: one process does 2 micro-batches of 4, each of two
DDP ranks does 1 micro-batch of 4 (its half of the same seeded permutation).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from minigpt.checkpoint import read_checkpoint
from train_helpers import MAX_LENGTH, base_config, make_corpus, run_training, tiny_model, windows_tokens

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

HELPER = Path(__file__).with_name("train_helpers.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    # Window counts divisible by 8: an epoch has the same steps on one rank of 8 or two of 4.
    return make_corpus(tmp_path_factory.mktemp("corpus"), windows_tokens(32), windows_tokens(16))


def _torchrun(corpus: Path, out: Path, cfg: dict, records: Path, *extra: str, timeout: float = 120) -> None:
    """Two CPU processes under torchrun; on a hang the whole process group is killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HELPER), "--data", str(corpus), "--out", str(out), "--cfg", json.dumps(cfg),
           "--records", str(records), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes x 1 thread on 2 cores
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill them one by one, then torchrun.
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s (a collective that one rank never joined?)\n{output[-3000:]}")
    assert proc.returncode == 0, output[-5000:]


def _rank(records: Path, rank: int) -> dict:
    return json.loads(records.with_name(f"{records.name}.rank{rank}").read_text())


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(corpus, tmp_path, optimizer):
    common = dict(global_batch_size=8, max_steps=6, eval_interval=3, lr=3e-3, optimizer=optimizer)
    # Summing the two ranks' gradients rounds differently from accumulating two micro-batches
    # (~1e-7). AdamW carries that through unchanged: weights agree element by element. Muon
    # orthogonalises in bf16 and blows up the gradient's near-zero singular directions, which
    # such noise turns: losses still agree to ~1e-4, and each matrix ends within a tenth of the
    # distance training moved it (measured up to 0.056 on 2026-12-06, where single elements
    # differed by 4.5e-3, a whole step's update, on some machines and not on others).
    rel = 1e-5 if optimizer == "adamw" else 1e-3
    single = run_training(corpus, tmp_path / "single", base_config(micro_batch_size=4, **common))

    ddp_cfg = base_config(micro_batch_size=4, **common)  # 4 per rank x 2 ranks: no accumulation
    out, records = tmp_path / "ddp", tmp_path / "records.json"
    _torchrun(corpus, out, ddp_cfg, records)
    rank0, rank1 = _rank(records, 0), _rank(records, 1)

    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["step"] == rank1["step"] == 6 and rank0["stop_reason"] == "max_steps"
    # Only rank 0 writes checkpoints and emits records.
    assert rank1["saves"] == [] and rank1["records"] == []
    assert "last.safetensors" in rank0["saves"] and "best.safetensors" in rank0["saves"]
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "last.safetensors"]

    def series(history: list[dict], key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in history if key in r]

    for key in ("train_loss", "val_loss", "grad_norm"):
        ddp, one = series(rank0["records"], key), series(single.history, key)
        assert [s for s, _ in ddp] == [s for s, _ in one]
        for (step, got), (_, want) in zip(ddp, one):
            assert got == pytest.approx(want, rel=rel), f"{key} at step {step}"
    assert [r["tokens"] for r in rank0["records"] if r["kind"] == "train"] == [
        s * 8 * MAX_LENGTH for s in range(1, 7)]

    ddp_tensors, one_tensors = read_checkpoint(out / "last.safetensors")[0], read_checkpoint(single.last_checkpoint)[0]
    start = {f"model.{k}": v for k, v in tiny_model().state_dict().items()}  # what both runs started from
    for name, tensor in one_tensors.items():
        if not name.startswith("model."):
            continue
        if optimizer == "adamw":
            torch.testing.assert_close(ddp_tensors[name], tensor, rtol=1e-4, atol=1e-5,
                                       msg=lambda detail, name=name: f"{name}: {detail}")
        else:
            moved, apart = (tensor - start[name]).norm().item(), (ddp_tensors[name] - tensor).norm().item()
            assert apart <= 0.1 * moved, f"{name}: the runs ended {apart:.3g} apart, training moved it {moved:.3g}"


def test_ranks_agree_when_to_stop_on_max_time(corpus, tmp_path):
    """Rank 1's clock runs 3x fast, so the ranks disagree about elapsed time: both must still
    stop after the same step (one that stopped alone would leave the other waiting forever)."""
    cfg = base_config(micro_batch_size=4, global_batch_size=8, max_steps=100_000, max_time=1.0,
                      eval_interval=100_000, log_interval=50)
    out, records = tmp_path / "ddp", tmp_path / "records.json"
    _torchrun(corpus, out, cfg, records, "--fast-clock-rank", "1", timeout=90)
    rank0, rank1 = _rank(records, 0), _rank(records, 1)
    assert rank0["stop_reason"] == rank1["stop_reason"] == "max_time"
    assert rank0["step"] == rank1["step"] > 1
    state = json.loads(read_checkpoint(out / "last.safetensors")[1]["state"])
    assert state["step"] == rank0["step"]
