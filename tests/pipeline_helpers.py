"""Shared by the pipeline tests: a temporary git clone of this checkout, the smoke params,
and running real commands (dvc, python -m pipeline.*) in it with a clean environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["train=smoke", "data=shakespeare-mini", "eval.val_batches=4", "eval.train_batches=2",
         "eval.batch_size=4", "sample.max_new_tokens=8", "sample.prompts=[ROMEO:]",
         # the finetune stages: four steps (not five epochs) on the default spam task
         "finetune.epochs=null", "finetune.train.max_steps=4"]
# dvc.yaml's stages in the order a first `dvc repro` runs them
STAGES = ["prepare", "split", "tokenize", "pretrain", "evaluate", "sample", "finetune_prepare", "finetune",
          "finetune_evaluate"]


def clone_checkout(dest: Path) -> Path:
    """Copy the files git would ship (tracked + untracked-not-ignored) into a new repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if name.startswith("reports/") or name == "dvc.lock" or not (ROOT / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "clone for the end-to-end test")
    return dest


def copy_repo(template: Path, dest: Path) -> Path:
    """A copy of a clone, its git history, DVC cache and outputs included (nothing in them
    holds an absolute path until an MLflow store is made)."""
    return Path(shutil.copytree(template, dest, symlinks=True))


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                          cwd=repo, check=True, capture_output=True, text=True).stdout


# Under `make test` (pytest-xdist, 2 processes on 2 cores) a torch process with 2 threads shares its
# cores with the other worker's: two gpt2-tiny trainings at once took 991 ms a step each with 2
# threads, 473 ms with 1 (282 ms alone with 2). One pytest alone keeps both threads.
THREADS = "1" if "PYTEST_XDIST_WORKER" in os.environ else "2"


def env_for(repo: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(repo / "src"),  # the clone's library, not this checkout's
        DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        OMP_NUM_THREADS=THREADS,
    )
    env.update(extra)
    return env


def run(repo: Path, *cmd: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env_for(repo, **env), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start_queue(repo: Path, jobs: int = 2, **env: str) -> None:
    """`dvc queue start -j jobs`, returning once the workers are started. Its workers are forked
    with the caller's stdout and stderr, so with `run`'s pipes the call would not return before the
    whole queue is done (two clones' queues would run one after the other); a file does not hold it."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=env_for(repo, **env),
                              stdout=out, stderr=subprocess.STDOUT, text=True, timeout=120)
        out.seek(0)
        assert proc.returncode == 0, f"dvc queue start failed ({proc.returncode}):\n{out.read()[-3000:]}"


def compose_smoke(repo: Path, *extra: str) -> None:
    run(repo, sys.executable, "-m", "pipeline.compose", *SMOKE, *extra)
    git(repo, "commit", "-q", "--allow-empty", "-am", "smoke params")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_runs(uri: str):
    c = client(uri)
    exp = c.get_experiment_by_name("minigpt")
    return [] if exp is None else c.search_runs([exp.experiment_id])


def stage_runs(uri: str, stage: str) -> list:
    """The runs of one training stage (tag `stage`: pretrain or finetune), newest first."""
    return [r for r in all_runs(uri) if r.data.tags.get("stage") == stage]


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def wait_for_queue(repo: Path, deadline: float) -> str:
    """Poll `dvc queue status` in `repo` until nothing is queued or running (or the `deadline`,
    a time.time(), passes); the last status."""
    import time

    while True:
        status = run(repo, "dvc", "queue", "status").stdout
        if ("Queued" not in status and "Running" not in status) or time.time() > deadline:
            return status
        time.sleep(3)


def free_port() -> int:
    """A free TCP port on loopback, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, *, log: Path | None = None, timeout: float = 120) -> float:
    """Poll `url` until it answers 200 (seconds it took); fail, with the tail of the server's
    `log`, when the server exits or `timeout` seconds pass first."""
    import time
    import urllib.request

    started = time.time()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.time() - started
        except OSError:
            pass
        if server.poll() is not None or time.time() - started > timeout:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"{' '.join(map(str, server.args))} did not answer {url}:\n{tail}")
        time.sleep(0.5)
