"""The metric sender against a tracking server that is not there (a real refused connection on
a free port): the loop never waits, points go out on time even when few, and a wait for the
server is told in one line, during training or while the stage waits for its last points.
The whole outage-and-return story against a real server is `test_team_stack`. And the local
store: processes that start together create it one at a time."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.common import StageError
from pipeline.tracking import MetricLogger
from pipeline_helpers import ROOT, env_for, free_port


@pytest.fixture
def down_server(monkeypatch):
    """The URI of a port nothing listens on; MLflow's client gives up on a request at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow.set_tracking_uri sets it too; restored after
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def quick_logger(uri: str) -> MetricLogger:
    logger = MetricLogger(MlflowClient(uri), "0" * 32)
    logger.STALL_SECONDS, logger.RETRY_SECONDS, logger.FLUSH_SECONDS = 0.5, 0.1, 0.2
    return logger


def test_a_few_points_go_out_on_time_and_a_wait_at_the_end_is_told(down_server, capsys):
    logger = quick_logger(down_server)
    started = time.monotonic()
    logger({"kind": "train", "step": 1, "train_loss": 3.0, "lr": 1e-3})
    assert logger.buffer and not logger.pending  # fewer than flush_every points, and no time has passed
    time.sleep(0.3)
    logger({"kind": "train", "step": 2, "train_loss": 2.9, "lr": 1e-3})
    assert time.monotonic() - started < 0.5, "the loop waited for the server"
    assert not logger.buffer  # handed to the sender on time, though only 4 points
    with pytest.raises(StageError, match=rf"^tracking: 4 metric points of run 0{{32}} not delivered to "
                                         rf"{down_server} within 2 s \(.+\); the checkpoints are kept"):
        logger.close(timeout=2)
    told = [line for line in capsys.readouterr().out.splitlines() if "has not taken metrics" in line]
    assert len(told) == 1 and told[0].startswith(f"tracking: the MLflow server at {down_server} has not taken")
    assert told[0].endswith("training goes on, 4 points wait and are sent when it answers")


def test_an_outage_during_training_is_told_once(down_server, capsys):
    logger = quick_logger(down_server)
    for step in range(12):  # ~1.2 s of "training": the batch goes unanswered past STALL_SECONDS
        logger({"kind": "train", "step": step, "train_loss": 3.0})
        time.sleep(0.1)
    assert capsys.readouterr().out.count("has not taken metrics for") == 1
    with pytest.raises(StageError, match="12 metric points"):
        logger.close(timeout=0.5)
    assert "has not taken" not in capsys.readouterr().out  # told once per outage


OPEN_THE_STORE = """
import sys, time
from pathlib import Path
from pipeline.tracking import ensure_experiment
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
print(ensure_experiment("minigpt", Path(sys.argv[1])))
"""


def test_processes_creating_one_local_store_at_once_all_get_a_whole_store(tmp_path):
    """Three stages starting together on a fresh clone (a queue of three): without the lock, MLflow's
    68 migrations interleave, and the store was broken for good in 2 of 4 such races."""
    start = time.time() + 8  # after the three interpreters have imported MLflow
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_THE_STORE, str(tmp_path), str(start)], cwd=ROOT,
                              env=env_for(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err[-500:] for _, err in results]
    assert len({out for out, _ in results}) == 1  # one experiment
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "minigpt"]


def test_a_store_lock_held_too_long_is_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "STORE_LOCK_SECONDS", 0.5)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # restored after the test (ensure_experiment sets it)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the local store
    lock = tmp_path / "mlflow.db.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another process would, stuck while opening the store
        with pytest.raises(StageError) as err:
            tracking.ensure_experiment("minigpt", tmp_path)
    assert str(err.value) == (f"tracking: another process has held {lock} for 0.5 s while opening the MLflow "
                              f"store; if none is running, delete that file")
    assert not (tmp_path / "mlflow.db").exists()
    mlflow.set_tracking_uri(None)
