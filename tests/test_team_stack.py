"""The team stack for real: `scripts/stack.py` starts PostgreSQL, a SeaweedFS S3 store and an
MLflow server (runs in the database, artifacts proxied into the store) in a temporary folder on
free loopback ports, and every test here works against those servers, as a team would:

- clone A runs the smoke pipeline into the server while the server is killed (restarted 20 s
  later) and the database is stopped and restarted: the run ends FINISHED with every point;
- what the run logged is checked in PostgreSQL's tables and the bucket's objects directly, and
  read back through the server (artifacts by sha256, the model, `models:/` for the CLI);
- clone A pushes its DVC data and models to the `team` remote; a fresh clone B pulls them:
  `dvc repro` there runs nothing and generates A's text exactly;
- A and B run queued sweeps at the same time into the one server: every run, every point;
- A and B run `make search` on one study in the database: every trial once, none lost;
- faults: the store down during `dvc push`, wrong secrets, a port already taken.

The stack is stopped at the end whatever happened, and no process of it may remain.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from test_mlflow_ui import REPORTS, check_run_page, chromium, open_browser  # noqa: F401 -- chromium: a fixture
from pipeline_helpers import (ROOT, SMOKE, clone_checkout, compose_smoke, env_for, git, ran_stages, run,
                              stage_runs, start_queue, wait_for_queue)

pytestmark = pytest.mark.slow

STACK = [sys.executable, str(ROOT / "scripts" / "stack.py")]
MODEL_NAME = "minigpt-team"
TRAIN_SECONDS = 45  # clone A's training: long enough to outlive both outages on any machine


class Stack:
    """A stack in `folder`, driven through the real script."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def cli(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*STACK, "--dir", str(self.folder), *args], capture_output=True, text=True,
                              timeout=600, env={**env_for(ROOT), **env})
        if check and proc.returncode != 0:
            raise AssertionError(f"stack.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                                 f"\n{self.logs()}")
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.folder / "logs").glob("*.log")))

    @property
    def ports(self) -> dict[str, int]:
        return json.loads((self.folder / "stack.json").read_text())["ports"]

    @property
    def secrets(self) -> dict[str, str]:
        return json.loads((self.folder / "secrets" / "secrets.json").read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    def pid(self, service: str) -> int:
        return int((self.folder / "run" / f"{service}.pid").read_text().split()[0])

    def db(self):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.ports["postgres"], user="minigpt", dbname="mlflow",
                               password=self.secrets["postgres_password"], connect_timeout=5, autocommit=True)

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.ports['s3']}", region_name="us-east-1",
                            aws_access_key_id=self.secrets["s3_access_key"],
                            aws_secret_access_key=self.secrets["s3_secret_key"])


def live_group_members(pgid: int) -> list[int]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


@pytest.fixture(scope="module")
def stack():
    # Under /tmp, not pytest's 0700 folder: as root, PostgreSQL runs as the `postgres` user,
    # which must be able to pass through to its data.
    folder = Path(tempfile.mkdtemp(prefix="minigpt-stack-"))
    folder.chmod(0o711)
    s = Stack(folder)
    groups: list[int] = []
    try:
        started = time.time()
        s.cli("up", STACK_PG_PORT="0", STACK_S3_PORT="0", STACK_MLFLOW_PORT="0")
        print(f"\nstack cold start: {time.time() - started:.1f} s ({folder})")
        groups = [s.pid(name) for name in ("postgres", "s3", "mlflow")]
        yield s
    finally:
        groups += [s.pid(n) for n in ("postgres", "s3", "mlflow") if (folder / "run" / f"{n}.pid").exists()]
        down = s.cli("down", check=False)
        left = {pgid: live_group_members(pgid) for pgid in set(groups)}
        shutil.rmtree(folder, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert not any(left.values()), f"processes left behind by `stack.py down`: {left}"


def test_the_stack_starts_once_and_says_so(stack, tmp_path):
    pids = {n: stack.pid(n) for n in ("postgres", "s3", "mlflow")}
    again = stack.cli("up")
    for name, pid in pids.items():
        assert f"{name}: already running (pid {pid}" in again.stdout
        assert stack.pid(name) == pid
    assert f"export MLFLOW_TRACKING_URI={stack.url}" in again.stdout
    status = stack.cli("status")
    assert [line.split()[0] for line in status.stdout.splitlines()] == ["postgres", "s3", "mlflow"]
    assert status.stdout.count(" healthy") == 3
    # Secrets: generated, private.
    for path in (stack.folder / "secrets").iterdir():
        assert path.stat().st_mode & 0o077 == 0, path
    assert (stack.folder / "secrets").stat().st_mode & 0o077 == 0
    assert subprocess.run(["git", "check-ignore", "-q", ".stack/secrets/secrets.json"], cwd=ROOT).returncode == 0

    # A second stack that wants a port the first one holds starts nothing at all.
    other = Stack(tmp_path / "other")
    taken = other.cli("up", check=False, STACK_PG_PORT="0", STACK_S3_PORT="0",
                      STACK_MLFLOW_PORT=str(stack.ports["mlflow"]))
    assert taken.returncode == 1
    assert taken.stderr.strip().splitlines() == [
        f"stack: error: mlflow: port {stack.ports['mlflow']} on 127.0.0.1 is in use by another process; "
        f"free it or choose another (STACK_MLFLOW_PORT); nothing was started"]
    assert not list((tmp_path / "other").glob("run/*.pid"))


def test_wrong_secrets_are_named(stack, tmp_path):
    """A database password or S3 secret the servers refuse: one line that names the setting."""
    copy = tmp_path / "copy"
    shutil.copytree(stack.folder, copy, ignore=shutil.ignore_patterns("postgres", "s3", "logs"))
    secrets_file = copy / "secrets" / "secrets.json"
    wrong = {**stack.secrets, "postgres_password": "not-the-password", "s3_secret_key": "not-the-secret"}
    secrets_file.write_text(json.dumps(wrong))
    status = Stack(copy).cli("status", check=False)  # the copy's pid files point at the real servers
    assert status.returncode == 1
    lines = {line.split()[0]: line for line in status.stdout.splitlines()}
    assert f"it refuses the password in {secrets_file} (postgres_password) for user minigpt" in lines["postgres"]
    assert f"it refuses the key pair in {secrets_file} (s3_access_key/s3_secret_key)" in lines["s3"]
    assert lines["mlflow"].endswith(" healthy")


@pytest.fixture(scope="module")
def clone_a(stack, tmp_path_factory) -> dict:
    """Clone A runs the smoke pipeline (up to `sample`) into the server, for TRAIN_SECONDS of
    training; meanwhile the MLflow server is killed (-9) and started again 20 s later, then
    PostgreSQL is stopped and started again."""
    repo = clone_checkout(tmp_path_factory.mktemp("clone-a"))
    compose_smoke(repo, "train.max_steps=100000", f"train.max_time={TRAIN_SECONDS}", "train.eval_interval=10",
                  f"tracking.register_model={MODEL_NAME}")
    stack.cli("remote", "--repo", str(repo))
    proc = subprocess.Popen(["dvc", "repro", "evaluate", "sample"], cwd=repo, env=env_for(repo, MLFLOW_TRACKING_URI=stack.url),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        with stack.db() as db:  # the training's first points, in the database itself
            deadline = time.time() + 300
            while not db.execute("SELECT 1 FROM metrics WHERE key = 'train_loss' LIMIT 1").fetchone():
                assert proc.poll() is None and time.time() < deadline, "".join(output)
                time.sleep(0.5)
        os.killpg(stack.pid("mlflow"), signal.SIGKILL)
        killed = time.time()
        time.sleep(20)
        stack.cli("up", "mlflow")
        server_back = time.time() - killed
        stack.cli("down", "postgres")
        time.sleep(3)
        stack.cli("up", "postgres")
        assert proc.poll() is None, "training ended before the outages were over: raise TRAIN_SECONDS"
        assert proc.wait(timeout=600) == 0, "".join(output)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    text = "".join(output)
    print(f"\nMLflow server down for {server_back:.1f} s during training")
    assert ran_stages(text) == ["prepare", "split", "tokenize", "pretrain", "evaluate", "sample"]
    run_id = json.loads((repo / "reports/mlflow_run.json").read_text())["run_id"]
    return {"repo": repo, "run_id": run_id, "output": text}


def test_training_goes_on_through_outages_and_every_point_arrives(stack, clone_a):
    text = clone_a["output"]
    assert "has not taken metrics for" in text and "training goes on" in text
    assert "tracking: the MLflow server answers again" in text
    (pretrain,) = stage_runs(stack.url, "pretrain")
    assert pretrain.info.run_id == clone_a["run_id"] and pretrain.info.status == "FINISHED"
    repo = clone_a["repo"]
    train = json.loads((repo / "reports/train.json").read_text())
    assert train["stop_reason"] == "max_time"
    # Every curve point of the reports, once: as many points per series as the CSV has values.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.url)
    with (repo / "reports/train_curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    # On a busy machine 45 s can be under 50 steps (46 in one CI run): an evaluation every 10
    # steps makes sure the run has a best checkpoint for the tests below.
    assert len(rows) >= train["steps"] >= 10
    for key in ("train_loss", "val_loss", "lr", "tokens_per_s"):
        expected = [int(r["step"]) for r in rows if r[key] != ""]
        steps = [m.step for m in client.get_metric_history(clone_a["run_id"], key)]
        assert sorted(steps) == expected, key
    # ... and the same count in PostgreSQL's own table.
    with stack.db() as db:
        count = db.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train_loss'",
                           (clone_a["run_id"],)).fetchone()[0]
        status = db.execute("SELECT status FROM runs WHERE run_uuid = %s", (clone_a["run_id"],)).fetchone()[0]
    assert count == train["steps"] and status == "FINISHED"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_artifacts_are_objects_in_the_bucket_and_come_back_through_the_server(stack, clone_a, tmp_path):
    import mlflow

    repo, run_id = clone_a["repo"], clone_a["run_id"]
    local = {"eval.json": repo / "reports/eval.json", "train_curve.csv": repo / "reports/train_curve.csv",
             "samples.md": repo / "reports/samples.md",
             "checkpoint/best.safetensors": repo / "checkpoints/best.safetensors"}
    for artifact, path in local.items():
        downloaded = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                         dst_path=str(tmp_path), tracking_uri=stack.url)
        assert sha256(Path(downloaded)) == sha256(path), artifact
    # In the bucket itself, under the run (the server proxies; clients hold no S3 credentials).
    objects = {}
    for page in stack.s3().get_paginator("list_objects_v2").paginate(Bucket="minigpt-mlflow"):
        objects.update({o["Key"]: o for o in page.get("Contents", []) if f"/{run_id}/" in o["Key"]})
    key = next(k for k in objects if k.endswith("/artifacts/eval.json"))
    body = stack.s3().get_object(Bucket="minigpt-mlflow", Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256(local["eval.json"])
    assert any(k.endswith("/artifacts/checkpoint/best.safetensors") for k in objects)


def test_the_logged_and_registered_model_loads_and_generates(stack, clone_a):
    import mlflow
    import torch

    from minigpt.generate import generate
    from minigpt.model import GPTModel

    repo, run_id = clone_a["repo"], clone_a["run_id"]
    mlflow.set_tracking_uri(stack.url)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert isinstance(model, GPTModel)
    assert generate(model, torch.tensor([[464, 1110]]), 5).shape == (1, 7)
    with stack.db() as db:
        versions = db.execute("SELECT version, run_id FROM model_versions WHERE name = %s", (MODEL_NAME,)).fetchall()
    assert versions == [(1, run_id)]
    args = ["--max-new-tokens", "12", "ROMEO:"]
    from_file = run(repo, "minigpt", "generate", "--model", "checkpoints/best.safetensors", *args).stdout
    from_registry = run(repo, "minigpt", "generate", "--model", f"models:/{MODEL_NAME}/1", *args,
                        MLFLOW_TRACKING_URI=stack.url).stdout
    from_run = run(repo, "minigpt", "generate", "--model", f"runs:/{run_id}/generator", *args,
                   MLFLOW_TRACKING_URI=stack.url).stdout
    assert from_file.startswith("ROMEO:") and from_registry == from_file == from_run


@pytest.fixture(scope="module")
def clone_b(stack, clone_a, tmp_path_factory) -> Path:
    """A second machine: a fresh clone of A's commit that pulls what A pushed to the team remote."""
    repo_a = clone_a["repo"]
    git(repo_a, "add", "-A")
    git(repo_a, "commit", "-qm", "A's lock file", "--allow-empty")
    pushed = run(repo_a, "dvc", "push", "-r", "team")
    assert "pushed" in pushed.stdout
    repo_b = tmp_path_factory.mktemp("clone-b") / "repo"
    git(repo_a.parent, "clone", "-q", str(repo_a), str(repo_b))
    stack.cli("remote", "--repo", str(repo_b))
    run(repo_b, "dvc", "pull", "-r", "team", "--with-deps", "evaluate", "sample")  # what A ran
    return repo_b


def test_a_second_clone_pulls_and_reproduces_nothing(clone_a, clone_b):
    proc = run(clone_b, "dvc", "repro", "evaluate", "sample")
    assert ran_stages(proc.stdout) == [], proc.stdout
    args = ["--max-new-tokens", "16", "--temperature", "0", "ROMEO:"]
    a = run(clone_a["repo"], "minigpt", "generate", "--model", "checkpoints/best.safetensors", *args).stdout
    b = run(clone_b, "minigpt", "generate", "--model", "checkpoints/best.safetensors", *args).stdout
    assert a == b and a.startswith("ROMEO:")


def test_a_push_while_the_store_is_down_fails_clearly_and_the_next_one_completes(stack, clone_a):
    repo = clone_a["repo"]
    (repo / "extra.txt").write_text("one more file for the remote\n")
    run(repo, "dvc", "add", "extra.txt")
    stack.cli("down", "s3")
    try:
        started = time.time()
        failed = run(repo, "dvc", "push", "-r", "team", check=False)
        took = time.time() - started
    finally:
        stack.cli("up", "s3")
    assert failed.returncode != 0 and took < 120
    errors = [line for line in failed.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "Could not connect to the endpoint URL" in errors[0], failed.stderr
    assert "1 file pushed" in run(repo, "dvc", "push", "-r", "team").stdout


@pytest.fixture(scope="module")
def sweeps(stack, clone_a, clone_b) -> list:
    """A and B each queue a sweep of two learning rates and run it, at the same time, into the
    one server (one sweep tag for the four runs, as a team sweep would share)."""
    smoke = [arg for o in SMOKE for arg in ("-S", o)]
    lrs = {clone_a["repo"]: "train.lr=1e-3,2e-3", clone_b: "train.lr=3e-3,4e-3"}
    for repo, lr in lrs.items():
        run(repo, "dvc", "exp", "run", "--queue", "evaluate", *smoke, "-S", lr, "-S", "tracking.register_model=null",
            "-S", "tracking.log_model=false")  # models are checked on A's run; these need none
    before = {r.info.run_id for r in stage_runs(stack.url, "pretrain")}
    for repo in lrs:
        start_queue(repo, 2, MLFLOW_TRACKING_URI=stack.url, MINIGPT_SWEEP="team-sweep")
    deadline = time.time() + 600
    for repo in lrs:
        status = wait_for_queue(repo, deadline)
        assert status.count("Success") == 2, status
    return [r for r in stage_runs(stack.url, "pretrain") if r.info.run_id not in before]


def test_two_clones_sweeping_at_once_keep_every_run_and_point(stack, sweeps):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.url)
    assert len(sweeps) == 4 and {r.info.status for r in sweeps} == {"FINISHED"}
    assert sorted(r.data.params["train.lr"] for r in sweeps) == ["0.001", "0.002", "0.003", "0.004"]
    assert len({r.info.run_name for r in sweeps}) == 4
    assert len({r.data.tags["mlflow.runColor"] for r in sweeps}) == 4
    assert {r.data.tags["sweep"] for r in sweeps} == {"team-sweep"}
    for r in sweeps:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [3, 6]
        assert "val_bits_per_byte" in r.data.metrics


def test_compare_and_notebook_03_read_the_server(stack, clone_a, sweeps):
    repo = clone_a["repo"]
    proc = run(repo, sys.executable, "-m", "pipeline.compare", MLFLOW_TRACKING_URI=stack.url)
    table = (repo / "reports/compare.md").read_text()
    assert all(r.info.run_name in table for r in sweeps), proc.stdout
    sys.path.insert(0, str(ROOT / "notebooks"))
    import run_notebooks

    nb = run_notebooks.execute(repo / "notebooks" / "03_compare_runs.ipynb",
                               env=env_for(repo, MLFLOW_TRACKING_URI=stack.url), timeout=300, write=False)
    text = "\n".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []) if "text" in o)
    assert f"5 pretrain runs of experiment 'minigpt' in {stack.url}" in text  # A's and the sweeps'
    assert ("params that differ: tracking.log_model, tracking.register_model, train.eval_interval, train.lr, "
            "train.max_steps, train.max_time") in text  # A's run against the sweeps


def test_the_ui_shows_a_run_of_the_server_with_its_artifacts_from_the_store(stack, sweeps, chromium, tmp_path):  # noqa: F811
    run_ = next(r for r in sweeps if r.data.params["train.lr"] == "0.002")
    with open_browser(chromium) as page:
        check_run_page(page, stack.url, run_.info.experiment_id, run_, tmp_path, overrides="train.lr=0.002",
                       artifacts=tuple(a for a in REPORTS if not a.startswith("samples")))  # swept to evaluate


def test_a_server_down_past_the_wait_fails_in_one_line_and_a_rerun_completes_the_run(stack, clone_a):
    """Down for longer than `tracking.outage_wait` when training ends: the stage fails with one
    line (in bounded time), the checkpoints stay, and the re-run completes the same run with
    every point, none twice (README: the Resume table)."""
    repo = clone_a["repo"]
    compose_smoke(repo, "train.max_steps=60", "tracking.outage_wait=3", "tracking.log_model=false")
    proc = subprocess.Popen(["dvc", "repro", "pretrain"], cwd=repo, env=env_for(repo, MLFLOW_TRACKING_URI=stack.url),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with stack.db() as db:
            known = {row[0] for row in db.execute("SELECT run_uuid FROM runs")}
            deadline = time.time() + 300
            while not db.execute("SELECT 1 FROM metrics WHERE key = 'train_loss' AND NOT run_uuid = ANY(%s) LIMIT 1",
                                 (list(known),)).fetchone():
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.2)
        os.killpg(stack.pid("mlflow"), signal.SIGKILL)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        stack.cli("up", "mlflow")
    errors = [line for line in output.splitlines() if line.startswith("pretrain: error")]
    assert proc.returncode != 0 and len(errors) == 1, output
    assert "metric points of run" in errors[0] and "not delivered" in errors[0] and "within 3 s" in errors[0]
    assert (repo / "checkpoints/last.safetensors").is_file()

    again = run(repo, "dvc", "repro", "pretrain", MLFLOW_TRACKING_URI=stack.url)
    assert "resuming from" in again.stdout
    from mlflow.tracking import MlflowClient

    run_id = json.loads((repo / "reports/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(stack.url)
    assert client.get_run(run_id).info.status == "FINISHED" and run_id in errors[0]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == list(range(1, 61))


def test_two_machines_search_one_study_in_the_stack_database(stack, clone_a, clone_b, monkeypatch):
    """`make search` on A and on B at once, one study in the stack's PostgreSQL (the OPTUNA_STORAGE
    that `make stack` prints), its trials tracked in the server: every trial ran once, on one
    machine or the other, and none was lost."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from pipeline.trial import open_storage

    exports = dict(assignment.split("=", 1) for line in stack.cli("env").stdout.splitlines()
                   if line.startswith("export OPTUNA_STORAGE=") for assignment in line.split()[1:])
    assert exports["OPTUNA_STORAGE"].startswith("postgresql://minigpt@127.0.0.1:") and len(exports) == 2
    spec = {"study": "team", "trials": 4, "budget": {"train.max_steps": 4},
            "fixed": {"train": "smoke", "data": "shakespeare-mini", "eval.val_batches": 4, "eval.train_batches": 2,
                      "eval.batch_size": 4, "tracking.log_model": False},
            "params": {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}}, "pruner": {"kind": "none"}}
    repos = {"a": clone_a["repo"], "b": clone_b}
    workers = {}
    for name, repo in repos.items():
        (repo / "team.yaml").write_text(json.dumps(spec))  # YAML's subset
        with open(repo / "search.log", "w") as out:
            workers[name] = subprocess.Popen([sys.executable, "-m", "pipeline.search", "team.yaml"], cwd=repo,
                                             env=env_for(repo, MLFLOW_TRACKING_URI=stack.url, **exports),
                                             stdout=out, stderr=subprocess.STDOUT)
    try:
        codes = {name: proc.wait(timeout=900) for name, proc in workers.items()}
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.kill()
    logs = {name: (repo / "search.log").read_text() for name, repo in repos.items()}
    assert codes == {"a": 0, "b": 0}, logs

    monkeypatch.setenv("PGPASSFILE", exports["PGPASSFILE"])  # this process reads the study too
    study = optuna.load_study(study_name="team", storage=open_storage(exports["OPTUNA_STORAGE"]))
    ran = [t for t in study.get_trials() if not t.user_attrs.get("not_run")]
    assert [t.state for t in ran] == [TrialState.COMPLETE] * 4, [(t.number, t.state) for t in study.get_trials()]
    by_machine = {name: [t.number for t in ran if f"search: trial {t.number} (team-t{t.number})" in log]
                  for name, log in logs.items()}
    assert sorted(by_machine["a"] + by_machine["b"]) == [t.number for t in ran] and all(by_machine.values())
    assert len({t.user_attrs["worker"] for t in ran}) == 2 and len({t.params["train.lr"] for t in ran}) == 4

    experiment_id = MlflowClient(stack.url).get_experiment_by_name("minigpt").experiment_id
    runs = MlflowClient(stack.url).search_runs([experiment_id], filter_string="tags.search = 'team'")
    assert sorted(int(r.data.tags["trial"]) for r in runs) == sorted(t.number for t in ran)  # one run a trial
    for trial in ran:
        (run_,) = [r for r in runs if r.data.tags["trial"] == str(trial.number)]
        assert run_.info.status == "FINISHED" and run_.data.metrics["val_bits_per_byte"] == trial.value
        assert run_.info.run_id == trial.user_attrs["mlflow_run"]
    for name, repo in repos.items():
        experiments = set(run(repo, "dvc", "exp", "list", "--all-commits", "--name-only").stdout.split())
        assert {f"team-t{n}" for n in by_machine[name]} <= experiments
        assert "Best: trial" in (repo / "reports/search/team.md").read_text()
