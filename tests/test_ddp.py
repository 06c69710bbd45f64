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
import time
from pathlib import Path

import psutil
import pytest
import torch

from minigpt.checkpoint import read_checkpoint
from minigpt.sharded_checkpoint import read_any_state
from train_helpers import MAX_LENGTH, base_config, make_corpus, run_training, tiny_model, windows_tokens

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

HELPER = Path(__file__).with_name("train_helpers.py")
ROOT = HELPER.parents[1]  # where `python -m pipeline.launch` finds the package


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    # Window counts divisible by 8: an epoch has the same steps on one rank of 8 or two of 4.
    return make_corpus(tmp_path_factory.mktemp("corpus"), windows_tokens(32), windows_tokens(16))


def _torchrun(corpus: Path, out: Path, cfg: dict, records: Path, *extra: str, timeout: float = 120,
              exit_code: int = 0) -> None:
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
    assert proc.returncode == exit_code, output[-5000:]


def _rank(records: Path, rank: int) -> dict:
    return json.loads(records.with_name(f"{records.name}.rank{rank}").read_text())


@pytest.mark.parametrize(("strategy", "optimizer"), [("ddp", "adamw"), ("ddp", "muon"), ("fsdp", "adamw")])
def test_two_processes_match_one_process_with_the_same_global_batch(corpus, tmp_path, strategy, optimizer):
    """Under FSDP too: a gradient reduced as a sum where a mean was meant (pytorch#162338, gloo's
    AVG under FSDP2) would double every grad norm, and the weights would drift from step 1."""
    common = dict(global_batch_size=8, max_steps=6, eval_interval=3, lr=3e-3, optimizer=optimizer)
    # Summing the two ranks' gradients rounds differently from accumulating two micro-batches
    # (~1e-7). AdamW carries that through unchanged: weights agree element by element. Muon
    # orthogonalises in bf16 and blows up the gradient's near-zero singular directions, which
    # such noise turns: losses still agree to ~1e-4, and each matrix ends within a tenth of the
    # distance training moved it (measured up to 0.056 on 2026-12-06, where single elements
    # differed by 4.5e-3, a whole step's update, on some machines and not on others).
    rel = 1e-5 if optimizer == "adamw" else 1e-3
    single = run_training(corpus, tmp_path / "single", base_config(micro_batch_size=4, **common))

    ddp_cfg = base_config(micro_batch_size=4, strategy=strategy, **common)  # 4 per rank x 2 ranks: no accumulation
    out, records = tmp_path / "ddp", tmp_path / "records.json"
    _torchrun(corpus, out, ddp_cfg, records)
    rank0, rank1 = _rank(records, 0), _rank(records, 1)

    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["step"] == rank1["step"] == 6 and rank0["stop_reason"] == "max_steps"
    # Only rank 0 emits records and (DDP) writes checkpoints; FSDP's shards are consolidated
    # into the same two files when training ends.
    assert rank1["saves"] == [] and rank1["records"] == []
    if strategy == "ddp":
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


# `last` at steps 2, 4 and 6; a run "killed" after its second save continues from step 4.
RESUME = dict(micro_batch_size=4, global_batch_size=8, max_steps=6, eval_interval=2, lr=3e-3, resume="auto")
DROPOUT = json.dumps({"dropout": 0.1})  # each rank draws its own masks: each rank's RNG must come back


def _weights_and_moments(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_checkpoint(path)[0].items() if k.startswith(("model.", "optim."))}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_process_run_killed_after_a_checkpoint_resumes_bit_exactly(corpus, tmp_path, strategy):
    cfg = base_config(strategy=strategy, **RESUME)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _torchrun(corpus, whole, cfg, tmp_path / "whole.json", "--model", DROPOUT)
    _torchrun(corpus, cut, cfg, tmp_path / "cut.json", "--model", DROPOUT, "--exit-after-saves", "2", exit_code=1)
    # FSDP's `last` is the folder of shards until the run ends; DDP's is the file rank 0 writes.
    held = cut / ("last.dcp" if strategy == "fsdp" else "last.safetensors")
    assert read_any_state(held)["step"] == 4

    _torchrun(corpus, cut, cfg, tmp_path / "resumed.json", "--model", DROPOUT)
    trained = [r["step"] for r in _rank(tmp_path / "resumed.json", 0)["records"] if r["kind"] == "train"]
    assert trained == [5, 6]
    assert sorted(p.name for p in cut.iterdir()) == ["best.safetensors", "last.safetensors"]
    whole_state, cut_state = _weights_and_moments(whole / "last.safetensors"), _weights_and_moments(cut / "last.safetensors")
    assert whole_state.keys() == cut_state.keys() and any(k.startswith("optim.") for k in whole_state)
    for name, tensor in whole_state.items():
        assert torch.equal(tensor, cut_state[name]), name


class _Killed(Exception):
    pass


def test_checkpoints_resume_at_another_world_size_through_the_shards_or_the_file(corpus, tmp_path):
    """2 -> 1: one plain process loads the shards two FSDP processes left (DCP reshards).
    1 -> 2: FSDP shards a one-process checkpoint file. Both end where one uninterrupted process
    does, within the tolerance of two processes summing gradients in another order."""
    cfg = base_config(strategy="fsdp", **RESUME)
    single = run_training(corpus, tmp_path / "single", cfg)  # one process: the strategy does not apply
    want = _weights_and_moments(single.last_checkpoint)

    two_to_one = tmp_path / "two-to-one"
    _torchrun(corpus, two_to_one, cfg, tmp_path / "cut.json", "--exit-after-saves", "2", exit_code=1)
    resumed = run_training(corpus, two_to_one, cfg)
    assert [r["step"] for r in resumed.history if r["kind"] == "train"] == list(range(1, 7))  # the whole curve
    assert not (two_to_one / "last.dcp").exists()  # the file now holds a newer step than the folder did

    one_to_two = tmp_path / "one-to-two"

    def killed_at_5(record: dict) -> None:
        if record["kind"] == "train" and record["step"] == 5:
            raise _Killed

    with pytest.raises(_Killed):
        run_training(corpus, one_to_two, cfg, callbacks=(killed_at_5,))
    _torchrun(corpus, one_to_two, cfg, tmp_path / "one-to-two.json")
    assert [r["step"] for r in _rank(tmp_path / "one-to-two.json", 0)["records"] if r["kind"] == "train"] == [5, 6]

    for out in (two_to_one, one_to_two):
        got = _weights_and_moments(out / "last.safetensors")
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5,
                                       msg=lambda detail, name=name, out=out: f"{out.name} {name}: {detail}")


# --------------------------------------------------------------------------- several nodes
def _agent(node: int, port: int, args: list[str], log: Path, *, join_timeout: int = 60, nnodes: int = 2,
           read_timeout: int = 60) -> subprocess.Popen:
    """One torchrun agent of a 2-node job on loopback (node 0 hosts the rendezvous store), as
    the README's multi-node recipe starts one per machine (through `pipeline.launch`, torchrun
    with one-line rendezvous errors); it restarts its worker once."""
    cmd = [sys.executable, "-m", "pipeline.launch", "--nnodes", str(nnodes), "--nproc-per-node", "1",
           "--max-restarts", "1", "--monitor-interval", "0.5", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "minigpt-two-nodes",
           "--rdzv-conf", f"join_timeout={join_timeout},read_timeout={read_timeout},"
                          f"is_host={'true' if node == 0 else 'false'}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as the README says
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(agents: list[subprocess.Popen], timeout: float) -> list[int]:
    """The agents' exit codes; on a hang every process they started is killed and the test fails."""
    try:
        return [agent.wait(timeout=timeout) for agent in agents]
    except subprocess.TimeoutExpired:
        for agent in agents:
            for child in psutil.Process(agent.pid).children(recursive=True):
                child.kill()
            os.killpg(agent.pid, signal.SIGKILL)
        pytest.fail(f"torchrun agents still running after {timeout} s")


def test_two_nodes_train_like_one_and_a_killed_worker_restarts_the_group_bit_exactly(corpus, tmp_path):
    """Two torchrun agents joined through a c10d rendezvous (two machines' worth of launchers,
    one process each) train exactly as two processes on one node do, and survive a SIGKILL of
    one worker: torchrun restarts both, they continue from `last` and end bit-identical."""
    from pipeline_helpers import free_port

    cfg = base_config(micro_batch_size=4, global_batch_size=8, max_steps=8, eval_interval=2, lr=3e-3, resume="auto")
    one_node = tmp_path / "one-node"
    _torchrun(corpus, one_node, cfg, tmp_path / "one-node.json", "--model", DROPOUT)

    out, records, port = tmp_path / "two-nodes", tmp_path / "two-nodes.json", free_port()
    args = [str(HELPER), "--data", str(corpus), "--out", str(out), "--cfg", json.dumps(cfg), "--records", str(records),
            "--model", DROPOUT, "--exit-after-saves", "2", "--kill-rank", "1"]
    logs = [tmp_path / f"agent{node}.log" for node in (0, 1)]
    agents = [_agent(node, port, args, logs[node]) for node in (0, 1)]
    codes = _wait(agents, timeout=180)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    rank0, rank1 = _rank(records, 0), _rank(records, 1)
    # One restart of the whole group: each rank reports the group's count (the agents' own counts
    # differ: the one whose worker was killed counts it, the other may restart without counting).
    assert rank0["restarts"] == rank1["restarts"] == 1
    assert [r["step"] for r in rank0["records"] if r["kind"] == "train"] == [5, 6, 7, 8]  # from `last` at 4
    assert rank1["saves"] == [] and rank1["records"] == []  # only global rank 0 writes and reports
    want, got = _weights_and_moments(one_node / "last.safetensors"), _weights_and_moments(out / "last.safetensors")
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name


def test_a_rendezvous_that_cannot_complete_fails_in_one_line_within_its_timeout(corpus, tmp_path):
    """No hang, no traceback: one node of two gives up after `join_timeout`; a node whose
    endpoint nobody hosts, after `read_timeout`; nodes that disagree on --nnodes (2 and 3)
    both end. No worker ever starts."""
    from pipeline_helpers import free_port

    def job(name: str, node: int, port: int, **settings) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        args = [str(HELPER), "--data", str(corpus), "--out", str(tmp_path / "out"),
                "--cfg", json.dumps(base_config()), "--records", str(tmp_path / f"{name}.json")]
        return _agent(node, port, args, log, **settings), log

    started = time.monotonic()
    mismatched = free_port()
    agents = [job("lonely", 0, free_port(), join_timeout=5), job("unhosted", 1, free_port(), read_timeout=3),
              job("two-nodes", 0, mismatched, join_timeout=8), job("three-nodes", 1, mismatched, join_timeout=8,
                                                                   nnodes=3)]
    assert _wait([agent for agent, _ in agents], timeout=120) == [1, 1, 1, 1]
    assert time.monotonic() - started < 90
    lines = {log.stem: log.read_text().strip().splitlines() for _, log in agents}
    for name in ("lonely", "unhosted", "two-nodes"):
        assert len(lines[name]) == 1 and lines[name][0].startswith("launch: error: "), lines[name]
    assert "did not complete within join_timeout=5 s" in lines["lonely"][0]
    assert "cannot reach the rendezvous endpoint 127.0.0.1:" in lines["unhosted"][0] and "read_timeout=3" in lines["unhosted"][0]
    assert "check --nnodes on each node" in lines["two-nodes"][0]
    assert lines["three-nodes"][-1].startswith("launch: error: "), "\n".join(lines["three-nodes"])
    assert not (tmp_path / "out").exists()
