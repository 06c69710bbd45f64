"""MLflow tracking: where the store lives, one run per pipeline execution, batched metrics.

The training loop knows nothing of MLflow; `MetricLogger` is the callback that
turns its records into batched `log_batch` calls (one SQLite write per batch,
not per value: a single write costs 20-35 ms here).

Every run a stage opens carries the host and process that hold it
(`minigpt.host`, `minigpt.pid`, `minigpt.pid_started`): a process killed with -9
cannot close its run, so the next stage to open a run closes (marks KILLED) any
RUNNING run of this host whose process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import psutil
import torch
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.common import StageError

# MLflow caps a param value at 6000 characters and a batch at 100 params / 1000 metrics.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI if set (a team server), else a SQLite store in `root` (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def artifact_root(root: Path) -> str:
    return (root.resolve() / "mlartifacts").as_uri()


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the URI, when an http(s) tracking server does not answer.

    MLflow's own client retries a dead server for minutes (253 s measured) before it
    raises a traceback; one look at `/health` before any work says it at once.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (OSError, ValueError) as err:  # refused, timed out, DNS, HTTP errors, a malformed URL
        reason = getattr(err, "reason", None) or err
        raise StageError(f"MLFLOW_TRACKING_URI={uri}: no MLflow server answers there ({reason}); "
                         f"start it or unset MLFLOW_TRACKING_URI to use the local store") from None


STORE_LOCK_SECONDS = 120  # creating a store took 1.4 s here: a holder this long is stuck


@contextlib.contextmanager
def store_creation_lock(uri: str) -> Iterator[None]:
    """Held while a process opens (and so may create) a local SQLite store.

    MLflow 3.17 migrates a new SQLite file in 68 steps. Two processes doing it at once (a
    queue of two on a fresh clone; two search workers; `mlflow ui` beside a stage) interleave
    them, and the loser fails with "duplicate column name" or "table _alembic_tmp_params already
    exists"; in 2 of 4 three-way races the store stayed broken for good. The lock is a file of
    its own beside the store: closing a descriptor of the database file itself would drop the
    POSIX locks SQLite holds in this process.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    with open(lock, "a") as handle:
        deadline = time.monotonic() + STORE_LOCK_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StageError(f"tracking: another process has held {lock} for {STORE_LOCK_SECONDS} s while "
                                     f"opening the MLflow store; if none is running, delete that file") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(name: str, root: Path) -> str:
    """Create (once) the store and the experiment; return the experiment id.

    A local store is opened under `store_creation_lock`. Two clients creating the
    experiment on a server at once race on its name ("already exists"): we retry.
    """
    uri = tracking_uri(root)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    with store_creation_lock(uri):  # MlflowClient opens the store, and creates it when new
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
    for attempt in range(5):
        try:
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            # A local store gets an absolute artifact location; a server decides its own. The
            # kind tag says "model training, not GenAI" to UIs that read it (3.17's does not:
            # see pipeline.run.runs_url).
            location = artifact_root(root) if uri.startswith("sqlite:") else None
            return client.create_experiment(name, artifact_location=location,
                                            tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException as err:
            if attempt == 4 or "already exists" not in str(err):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise RuntimeError("unreachable")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'n_layers': 4}} -> {'model.n_layers': 4}"""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# Files whose change a run's own params explain: a queued experiment's composed params.yaml
# (its -S overrides, logged as params) and DVC's lock file. They do not make the code dirty.
_PARAM_FILES = ("params.yaml", "dvc.lock")


def _git(checkout: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None  # not strip(): status lines start with a space


def git_tags(checkout: Path) -> dict[str, str]:
    """Commit and dirty flag of the code in `checkout`: dirty when a tracked file other than
    the params (params.yaml, dvc.lock) differs from the commit."""
    commit = _git(checkout, "rev-parse", "HEAD")
    if not commit:
        return {}
    changed = [line[3:] for line in (_git(checkout, "status", "--porcelain", "--untracked-files=no") or "").splitlines()]
    dirty = any(path not in _PARAM_FILES for path in changed)
    return {"mlflow.source.git.commit": commit, "git.commit": commit, "git.dirty": str(dirty).lower()}


def committed_params(checkout: Path) -> dict[str, Any] | None:
    """params.yaml as the checkout's commit has it (None outside git): in a queued experiment,
    the baseline that its -S overrides were applied to."""
    text = _git(checkout, "show", "HEAD:params.yaml")
    loaded = yaml.safe_load(text) if text else None
    return loaded if isinstance(loaded, dict) else None


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + _MAX_PARAMS_PER_BATCH])


def log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_results(scores: Mapping[str, Any], counts: Mapping[str, Any]) -> None:
    """A stage's final numbers on the active run: `scores` as top-level metrics the runs table
    sorts by (no prefix, the same keys in every run), `counts` (steps, tokens, bytes, sizes)
    as tags, so the UI's metric charts and parallel coordinates lead with the scores."""
    mlflow.log_metrics({k: float(v) for k, v in scores.items()})
    log_tags(MlflowClient(), mlflow.active_run().info.run_id, {k: str(v) for k, v in counts.items()})


class MetricLogger:
    """Training-loop callback: buffers records and sends them in batches from a thread of its own.

    Each key is one series over `step`. Counts and quantities a chart of the loss does not
    need are left out (`tokens` grows with the step; `best_val_loss` and `val_perplexity`
    restate `val_loss`): one val-loss series, so the UI's charts lead with the losses.

    Sending never blocks the loop: a tracking server that is down for a while (restarted, or
    its database restarting) delays the points, it does not stop training. MLflow's client
    retries each request with backoff for minutes; past that the sender tries again itself, and
    `close` waits a bounded time for the last points. A batch sent twice (its answer lost with
    the server) is harmless: the store drops identical points. `skip` holds the (key, step)
    points the run already has (a reopened run): they are not sent again.
    """

    SKIPPED = ("kind", "step", "tokens", "best_val_loss", "val_perplexity")
    STALL_SECONDS = 10  # a batch unanswered this long is an outage worth a line
    RETRY_SECONDS = 8  # between the sender's own tries, once MLflow's client has given up
    # At most this long between batches: on a slow model (or a busy machine) 200 points can
    # take minutes, and the UI's charts would lag that far behind the loop.
    FLUSH_SECONDS = 5.0

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 200,
                 skip: set[tuple[str, int]] | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_every = flush_every
        self.skip = skip or set()
        self.buffer: list[Metric] = []
        self.pending: list[Metric] = []  # handed to the sender, not yet delivered
        self.error: Exception | None = None  # the last failure, until a batch gets through
        self.fatal: Exception | None = None  # a refusal that retrying cannot fix
        self.outage_since: float | None = None  # when the unanswered batch was first sent
        self.outage_told = False
        self.flushed_at = time.monotonic()
        self._lock = threading.Condition()
        self._closing = False
        self._sender = threading.Thread(target=self._send_forever, name="mlflow-metrics", daemon=True)
        self._sender.start()

    def __call__(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        now = int(time.time() * 1000)
        for key, value in record.items():
            if key in self.SKIPPED or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if (key, step) not in self.skip:
                self.buffer.append(Metric(key, float(value), now, step))
        if (len(self.buffer) >= self.flush_every or record.get("kind") == "eval"
                or time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS):
            self.flush()
        self._tell_outage()

    def replay(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Log records of an earlier execution: a run continued in a new MLflow run (so its charts
        show the whole training), or the points a reopened run lacks (sent while its server was
        down when that execution ended)."""
        for record in history:
            self(record)
        self.flush()

    def flush(self) -> None:
        """Hand the buffer to the sender (returns at once)."""
        self.flushed_at = time.monotonic()
        with self._lock:
            self.pending.extend(self.buffer)
            self.buffer = []
            self._lock.notify()

    def close(self, timeout: float) -> None:
        """Deliver what is left, waiting at most `timeout` seconds; a StageError if it could not."""
        self.flush()
        with self._lock:
            self._closing = True
            self._lock.notify()
        deadline = time.monotonic() + timeout
        while self._sender.is_alive() and time.monotonic() < deadline:  # in slices: an outage gets its line here too
            self._sender.join(min(1.0, max(0.0, deadline - time.monotonic())))
            self._tell_outage()
        with self._lock:
            left, error = len(self.pending), self.fatal or self.error or "no answer"
        if left or self.fatal:
            raise StageError(f"tracking: {left} metric points of run {self.run_id} not delivered to "
                             f"{mlflow.get_tracking_uri()} within {timeout:.0f} s ({_one_line(error)}); the "
                             f"checkpoints are kept: re-run the stage once the server answers, and it logs what is missing")

    def _tell_outage(self) -> None:
        """One line when a batch has gone unanswered for STALL_SECONDS (called by the loop and `close`)."""
        since = self.outage_since
        if since is not None and not self.outage_told and time.time() - since > self.STALL_SECONDS:
            self.outage_told = True
            why = f": {_one_line(self.error)}" if self.error else ""
            print(f"tracking: the MLflow server at {mlflow.get_tracking_uri()} has not taken metrics for "
                  f"{time.time() - since:.0f} s{why}; training goes on, {len(self.pending)} points wait "
                  f"and are sent when it answers", flush=True)

    def _send_forever(self) -> None:
        while True:
            with self._lock:
                while not self.pending and not self._closing:
                    self._lock.wait()
                if not self.pending:
                    return  # closing, everything delivered
                chunk = self.pending[:_MAX_METRICS_PER_BATCH]
            if self.outage_since is None:
                self.outage_since = time.time()
            try:
                self.client.log_batch(self.run_id, metrics=chunk)  # MLflow's client retries, for minutes
            except Exception as err:  # noqa: BLE001 -- any failure: the points stay pending
                if _permanent(err):
                    self.fatal = err
                    return
                self.error = err
                time.sleep(self.RETRY_SECONDS)
                continue
            with self._lock:
                del self.pending[:len(chunk)]
            if self.outage_told:
                print(f"tracking: the MLflow server answers again after {time.time() - self.outage_since:.0f} s; "
                      f"the delayed points are delivered", flush=True)
            self.outage_since, self.outage_told, self.error = None, False, None


def _permanent(err: Exception) -> bool:
    """A refusal of the batch itself (4xx: a bad value, a deleted run), not an outage."""
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return False


def _one_line(err: BaseException | None) -> str:
    text = str(err or "unknown error").strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def logged_points(client: MlflowClient, run_id: str, keys: Iterable[str]) -> set[tuple[str, int]]:
    """The (key, step) points `run_id` already holds for `keys`."""
    return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}


def process_tags() -> dict[str, str]:
    """Who holds a run open: this host and process (its start time guards against pid reuse)."""
    return {"minigpt.host": socket.gethostname(), "minigpt.pid": str(os.getpid()),
            "minigpt.pid_started": f"{psutil.Process().create_time():.3f}"}


def _process_alive(tags: Mapping[str, str]) -> bool:
    try:
        process = psutil.Process(int(tags["minigpt.pid"]))
        return f"{process.create_time():.3f}" == tags.get("minigpt.pid_started")
    except (KeyError, ValueError, psutil.Error):
        return False


def close_orphaned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs that a dead process of this host left behind.

    Runs of other hosts (a shared server) and of live processes (a parallel sweep)
    are left alone. Returns the ids of the runs closed.
    """
    host = socket.gethostname().replace("'", "")
    orphans = [run for run in client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`minigpt.host` = '{host}'")
        if not _process_alive(run.data.tags)]
    for run in orphans:
        client.set_terminated(run.info.run_id, status="KILLED")
        print(f"tracking: run {run.info.run_id} was left RUNNING by a process that is gone; marked it KILLED")
    return [run.info.run_id for run in orphans]


def run_status(run_id: str) -> str | None:
    """FINISHED, FAILED, KILLED or RUNNING; None if the store does not hold the run."""
    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def open_run(root: Path, experiment: str, *, run_id: str | None = None, run_name: str | None = None,
             tags: Mapping[str, str] | None = None) -> mlflow.ActiveRun:
    """Start a run, or reopen `run_id` (a resumed training, or a later stage of the same execution).

    Used as a context manager: leaving it normally marks the run FINISHED, leaving it
    with an exception marks it FAILED, so a broken stage never looks successful.
    """
    experiment_id = ensure_experiment(experiment, root)
    close_orphaned_runs(MlflowClient(), experiment_id)
    tags = {**(tags or {}), **process_tags()}
    if run_id is not None and run_status(run_id) is not None:
        return mlflow.start_run(run_id=run_id, tags=tags)
    # No run to reopen (or the store was reset since): record a new one.
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)


def log_config(run_id: str, config: Mapping[str, Any]) -> None:
    """The flattened config as params; keys already logged with another value (a resumed run
    whose budget grew) become `changed.<key>` tags, since MLflow params are immutable."""
    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    new, changed = {}, {}
    for key, value in flatten(config).items():
        text = str(value)[:6000]
        if key not in existing:
            new[key] = text
        elif existing[key] != text:
            changed[f"changed.{key}"] = text
    log_params(client, run_id, new)
    if changed:
        log_tags(client, run_id, changed)


def log_model(model: torch.nn.Module, registered_name: str | None = None) -> None:
    """Log the model so that `mlflow.pytorch.load_model(uri)` returns a usable `GPTModel`.

    Pickle format keeps the class and its methods (`generate` works on it); the
    default `pt2` format would freeze input shapes and drop them. Requirements are
    given, not inferred: inference imports and probes the model, which is slow.
    """
    import mlflow.pytorch

    mlflow.pytorch.log_model(
        model, name="model", serialization_format="pickle", pip_requirements=_model_requirements(),
        registered_model_name=registered_name,
    )


def _model_requirements() -> list[str]:
    return [f"torch=={torch.__version__.split('+')[0]}", "minigpt"]


def log_generator(model: torch.nn.Module, checkpoint: Path) -> None:
    """Log `generator`, a pyfunc that continues text prompts (`pipeline/generator.py`, logged as
    code): `mlflow models serve -m runs:/<id>/generator` answers `{"dataframe_split":
    {"columns": ["prompt"], "data": [["ROMEO:"]]}, "params": {...}}` with
    `{"predictions": ["ROMEO: ..."]}`.

    Its artifact is a checkpoint of `model` (holding `checkpoint`'s weights) with `checkpoint`'s
    state (config, step, fingerprints) but no optimizer moments: a third of the size, and all
    that generating needs. MLflow checks the input example by loading the logged model and
    generating from it; the example asks for a few tokens to keep that quick.
    """
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import infer_signature

    # Imported here, after the training stage took its code fingerprint: the serving code is
    # not part of what trains, nor of the other stages that import this module (dvc.yaml's
    # deps, which a test pins to the imports, agree).
    from minigpt.checkpoint import read_checkpoint_state, save_checkpoint
    from minigpt.serving import GENERATION_DEFAULTS

    example = pd.DataFrame({"prompt": ["ROMEO:"]})
    with tempfile.TemporaryDirectory(prefix="generator-") as tmp:
        weights = Path(tmp) / checkpoint.name
        save_checkpoint(weights, model, None, read_checkpoint_state(checkpoint))
        mlflow.pyfunc.log_model(
            name="generator", python_model=Path(__file__).with_name("generator.py"),
            artifacts={"checkpoint": str(weights)},
            signature=infer_signature(example, ["ROMEO: ..."], params=GENERATION_DEFAULTS),
            input_example=(example, {**GENERATION_DEFAULTS, "max_new_tokens": 8}),
            pip_requirements=_model_requirements(),
        )
