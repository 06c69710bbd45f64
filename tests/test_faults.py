"""Faults and bad input, through the real entry points: `dvc repro` killed with SIGKILL at
chosen moments, then run again; `python -m pipeline.<stage>` given broken params, a dead
tracking server, a full disk, an unwritable report. Each asserts what the user sees (one
line naming the key or file, a non-zero exit), what DVC records (no temporary file in an
output) and what MLflow shows (no run left RUNNING, no finished run turned FAILED).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.tracking import store_creation_lock
from pipeline_helpers import all_runs, compose_smoke, copy_repo, env_for, run

pytestmark = pytest.mark.slow

PY = sys.executable


@pytest.fixture
def project(tokenized_template, tmp_path) -> Path:
    """A clone whose data stages have run (smoke params), this test's own."""
    return copy_repo(tokenized_template, tmp_path / "project")


def store(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


def statuses(repo: Path) -> dict[str, str]:
    """Polled while a stage runs: the store is opened under the stages' lock, so this reader
    does not create the store's schema at the same time as the stage does."""
    with store_creation_lock(store(repo)):
        return {r.info.run_id: r.info.status for r in all_runs(store(repo))}


def temp_files(folder: Path) -> list[str]:
    """Hidden names in a DVC output folder: only interrupted writes make them."""
    return sorted(name for name in os.listdir(folder) if name.startswith(".")) if folder.is_dir() else []


def start(repo: Path, *cmd: str) -> subprocess.Popen:
    """`cmd` in its own process group, so a kill reaches DVC and the stage it runs."""
    return subprocess.Popen(cmd, cwd=repo, env=env_for(repo), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 300) -> bool:
    """SIGKILL the whole group as soon as `condition()` holds; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return False


def stage(repo: Path, name: str, *, limit_file_bytes: int | None = None, **env: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.<name>` run directly (not through DVC), as a user may."""

    def limit() -> None:  # in the child: writes past the limit fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run([PY, "-m", f"pipeline.{name}"], cwd=repo, env=env_for(repo, **env), capture_output=True,
                          text=True, timeout=600, preexec_fn=limit if limit_file_bytes else None)


def one_error_line(proc: subprocess.CompletedProcess, stage_name: str) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{stage_name}: error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


def train_rows(repo: Path) -> list[str]:
    return [line for line in (repo / "reports/train_curve.csv").read_text().splitlines()[1:] if line.split(",")[1]]


# --------------------------------------------------------------------------- kills
def test_a_kill_inside_a_checkpoint_write_leaves_no_temp_file_in_the_dvc_output(project):
    """Issue 9.1: the leftovers of a killed write are removed before training writes again,
    so DVC never records, caches or pushes them."""
    compose_smoke(project, "train.max_steps=30", "train.checkpoint_interval=1", "train.eval_interval=15")
    checkpoints = project / "checkpoints"
    for _ in range(5):  # the kill may land just after a rename; try again until it lands inside a write
        # Once a first checkpoint exists, so the re-run resumes (and adopts the killed run).
        kill_when(start(project, "dvc", "repro", "pretrain"),
                  lambda: (checkpoints / "last.safetensors").exists() and bool(temp_files(checkpoints)))
        if temp_files(checkpoints):
            break
    leftovers = temp_files(checkpoints)
    assert leftovers, "no kill landed inside a checkpoint write"
    proc = run(project, "dvc", "repro", "pretrain")
    assert "left by an interrupted checkpoint write" in proc.stdout
    assert temp_files(checkpoints) == []
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    (entry,) = [o for o in lock["stages"]["pretrain"]["outs"] if o["path"] == "checkpoints"]
    assert entry["nfiles"] == 2  # last and best, nothing else
    assert json.loads((project / "reports/train.json").read_text())["steps"] == 30
    assert sorted(statuses(project).values()) == ["FINISHED"]  # the killed run was adopted and finished


def test_a_kill_before_the_first_checkpoint_closes_the_orphaned_run(project):
    """Issue 9.5: the run a killed process left RUNNING is marked KILLED by the next run."""
    compose_smoke(project, "train.max_steps=400", "train.eval_interval=400")  # no checkpoint before the end
    assert kill_when(start(project, "dvc", "repro", "pretrain"), lambda: "RUNNING" in statuses(project).values())
    assert not (project / "checkpoints/last.safetensors").exists()
    (orphan,) = statuses(project)
    compose_smoke(project)  # six steps: the re-run need not be long to clean up
    proc = run(project, "dvc", "repro", "pretrain")
    assert f"run {orphan} was left RUNNING by a process that is gone" in proc.stdout
    after = statuses(project)
    assert after.pop(orphan) == "KILLED" and list(after.values()) == ["FINISHED"]


def test_a_kill_after_training_then_a_rerun_completes_the_same_run_and_whole_reports(project):
    """Issue 9.2: training ended, the kill landed while MLflow logging ran; the re-run trains
    nothing, finishes that run, and reports the whole curve. Forced once more, it leaves the
    finished run alone and still writes complete reports."""
    compose_smoke(project)
    assert kill_when(start(project, "dvc", "repro", "pretrain"),
                     lambda: (project / "reports/train.json").exists())
    (killed,) = statuses(project)
    proc = run(project, "dvc", "repro", "pretrain")
    assert "resuming" in proc.stdout
    assert statuses(project) == {killed: "FINISHED"}
    assert len(train_rows(project)) == 6
    assert json.loads((project / "reports/train.json").read_text())["train_loss"] is not None

    proc = run(project, "dvc", "repro", "--force", "--single-item", "pretrain")
    assert "already holds the finished run" in proc.stdout
    assert statuses(project) == {killed: "FINISHED"}
    train = json.loads((project / "reports/train.json").read_text())
    assert train["steps"] == 6 and train["train_loss"] is not None and len(train_rows(project)) == 6
    assert json.loads((project / "reports/mlflow_run.json").read_text())["run_id"] == killed


def test_a_corrupted_checkpoint_starts_afresh_and_the_finished_run_stays_finished(project):
    """Issue 9.7: the earlier run finished; a byte flipped in its checkpoint must not turn it FAILED."""
    compose_smoke(project)
    run(project, "dvc", "repro", "pretrain")
    (finished,) = statuses(project)
    last = project / "checkpoints/last.safetensors"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01
    last.write_bytes(bytes(data))
    proc = run(project, "dvc", "repro", "pretrain")
    assert "not resuming" in proc.stdout and "sha256" in proc.stdout
    after = statuses(project)
    assert after.pop(finished) == "FINISHED" and list(after.values()) == ["FINISHED"]


# --------------------------------------------------------------------------- bad input
def test_a_budget_cut_starts_afresh(project):
    """Issue 9.3: after six steps, max_steps=3 must give a three-step model, not keep the six."""
    compose_smoke(project)
    run(project, "dvc", "repro", "pretrain")
    compose_smoke(project, "train.max_steps=3")
    proc = stage(project, "pretrain")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train.max_steps was cut (6 -> 3)" in proc.stdout
    assert json.loads((project / "reports/train.json").read_text())["steps"] == 3


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "params.yaml: train.lr: Input should be greater than 0"),
    ("train.device=banana", "params.yaml: train.device: expected auto, cpu, cuda, cuda:N or mps, got 'banana'"),
    ("train.device=cuda", "params.yaml: train.device: device 'cuda': this machine has no CUDA device (use auto or cpu)"),
])
def test_bad_params_give_one_line_named_after_the_stage(project, override, message):
    """Issue 9.4 and 9.6: `pretrain: error: ...`, also under `python -m` (not `__main__: error:`)."""
    if override == "train.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    compose_smoke(project, override)
    assert one_error_line(stage(project, "pretrain"), "pretrain") == f"pretrain: error: {message}"
    assert statuses(project) == {}  # failed before any run was opened


def test_a_dead_tracking_server_fails_in_seconds_before_training(project):
    started = time.time()
    line = one_error_line(stage(project, "pretrain", MLFLOW_TRACKING_URI="http://127.0.0.1:9"), "pretrain")
    assert time.time() - started < 60  # MLflow's own retries took 253 s
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:9: no MLflow server answers there" in line
    assert not (project / "checkpoints/last.safetensors").exists()


def test_a_full_disk_while_saving_a_checkpoint_fails_cleanly(project):
    """Writes past 20 MB fail (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) and the
    87 MB checkpoint cannot be written: one line, the run FAILED, nothing half-written."""
    proc = stage(project, "pretrain", limit_file_bytes=20 * 2**20)
    line = one_error_line(proc, "pretrain")
    assert "checkpoint checkpoints/best.safetensors: could not be written" in line and "File too large" in line
    assert list(statuses(project).values()) == ["FAILED"]
    assert temp_files(project / "checkpoints") == []
    assert not (project / "checkpoints/best.safetensors").exists()


def test_an_unwritable_report_fails_the_stage_and_its_run(project):
    """The report path is taken by a folder (root ignores a read-only mode; this fails for everyone)."""
    (project / "reports/train.json").mkdir(parents=True)
    line = one_error_line(stage(project, "pretrain"), "pretrain")
    assert line == "pretrain: error: reports/train.json: Is a directory"
    assert list(statuses(project).values()) == ["FAILED"]
    assert temp_files(project / "reports") == []


def test_token_ids_beyond_the_vocabulary_stop_training_before_it_starts(project):
    """A shard whose ids exceed its vocab_size (here: rewritten with a consistent manifest,
    so only reading the tokens finds it) would fail deep inside the embedding."""
    import numpy as np

    from minigpt.data.shards import write_shards

    train = project / "data/tokens/train"
    tokens = np.array([1, 2, 60_000, 3] * 1000, dtype=np.uint16)
    write_shards(train, [tokens], tokenizer="gpt2", vocab_size=50257, shard_tokens=10_000)
    line = one_error_line(stage(project, "pretrain"), "pretrain")
    assert line == "pretrain: error: data/tokens/train/shard_000000.bin: token id 60000 is not below the vocab_size 50257"
    assert statuses(project) == {}


def test_a_manifest_pointing_outside_its_folder_is_refused(project):
    """Before: a shard list naming `../val/...` trained on the validation split, silently."""
    manifest_path = project / "data/tokens/train/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    val = json.loads((project / "data/tokens/val/manifest.json").read_text())
    manifest["shards"] = [{**entry, "name": f"../val/{entry['name']}"} for entry in val["shards"]]
    manifest_path.write_text(json.dumps(manifest))
    line = one_error_line(stage(project, "pretrain"), "pretrain")
    assert "../val/shard_000000.bin" in line and "data/tokens/train" in line


def test_a_worker_killed_under_torchrun_restarts_the_group_into_the_same_run(project, tmp_path):
    """Issue 21: `torchrun --max-restarts 1 -m pipeline.pretrain` on 2 processes, the rank-1 worker
    SIGKILLed once `last` exists: torchrun restarts both, training continues from `last` in the
    same MLflow run, which ends FINISHED with each step logged once and the restart counted."""
    import psutil

    compose_smoke(project, "train.max_steps=30", "train.eval_interval=10")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "--monitor-interval", "0.5", "-m", "pipeline.pretrain"]
    log = tmp_path / "torchrun.log"  # a file, not a pipe: nobody reads while the test waits
    with log.open("w") as out:
        env = env_for(project, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # as the README says
        proc = subprocess.Popen(cmd, cwd=project, env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)

    def rank1_worker() -> psutil.Process | None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.environ().get("RANK") == "1" and "pipeline.pretrain" in " ".join(child.cmdline()):
                    return child
        return None

    try:
        killed = kill_when_found(proc, lambda: (project / "checkpoints/last.safetensors").exists() and rank1_worker())
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):  # workers: sessions of their own
                child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert killed, f"training ended before a worker could be killed:\n{output[-3000:]}"
    assert proc.returncode == 0, output[-3000:]
    assert "resuming from" in output
    ((run_id, status),) = statuses(project).items()  # one run, not a second one after the restart
    assert status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store(project))
    assert client.get_run(run_id).data.tags["torchelastic.restarts"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(1, 31))
    assert json.loads((project / "reports/train.json").read_text())["steps"] == 30


def kill_when_found(proc: subprocess.Popen, find: Callable[[], object], timeout: float = 300) -> bool:
    """SIGKILL the process `find()` returns as soon as it returns one; False if `proc` ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        target = find()
        if target:
            target.kill()
            return True
        time.sleep(0.01)
    return False
