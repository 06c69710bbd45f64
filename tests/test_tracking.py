"""The metric sender against a tracking server that is not there (a real refused connection on
a free port): the loop never waits, points go out on time even when few, and a wait for the
server is told in one line, during training or while the stage waits for its last points.
The whole outage-and-return story against a real server is `test_team_stack`."""

from __future__ import annotations

import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.common import StageError
from pipeline.tracking import MetricLogger
from pipeline_helpers import free_port


@pytest.fixture
def down_server(monkeypatch):
    """The URI of a port nothing listens on; MLflow's client gives up on a request at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(before)


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
