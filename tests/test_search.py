"""`make search` (pipeline.search): bad search files and storages refused in one line before anything
runs; a dead worker's trial failed and queued again; and for real, in a clone, a study whose trials
are DVC experiments and MLflow runs: one pruned by the median pruner, one interrupted with Ctrl-C
and retried when the search runs again, and the report with its importance plot.

Two workers on two clones sharing one study in PostgreSQL: tests/test_team_stack.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import ROOT, copy_repo, env_for, run, stage_runs

SMOKE_TRIAL = {"train": "smoke", "train.min_lr": 0, "data": "shakespeare-mini", "eval.val_batches": 4,
               "eval.train_batches": 2, "eval.batch_size": 4, "tracking.log_model": False}


def smoke_search(**changes) -> dict:
    """A search over the smoke pipeline: 6 steps a trial, evaluated at steps 3 and 6."""
    return {"study": "smoke", "trials": 3, "budget": {"train.max_steps": 6}, "fixed": SMOKE_TRIAL,
            "params": {"train.lr": {"low": 1e-6, "high": 1e-2, "log": True}}, **changes}


@pytest.fixture
def conf_only(tmp_path) -> Path:
    """A folder with conf/ and nothing else: what is there after a refused search is what it wrote."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    return tmp_path


def search_cli(folder: Path, spec: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    (folder / "search.yaml").write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "pipeline.search", "search.yaml", *args], cwd=folder,
                          env=env_for(folder, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'src'}", **env),
                          capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = {
    "unknown parameter": (dict(params={"train.lrr": {"low": 1e-4, "high": 1e-2}}),
                          "search.yaml: params: train.lrr: not a parameter of conf/"),
    "unknown budget key": (dict(budget={"train.max_stepz": 6}), "budget: train.max_stepz: expected a training budget"),
    "empty range": (dict(params={"train.lr": {"low": 1e-2, "high": 1e-2}}),
                    "search.yaml: params.train.lr: empty range: low (0.01) is not below high (0.01)"),
    "empty choices": (dict(params={"train.optimizer": {"choices": []}}), "search.yaml: params.train.optimizer.choices: empty: no value to try"),
    "log of zero": (dict(params={"train.lr": {"low": 0, "high": 1e-2, "log": True}}), "log scale needs low > 0"),
    "unreported objective": (dict(objective="val_accuracy"), "objective: no stage reports 'val_accuracy'"),
    "a typo": (dict(trails=3), "search.yaml: trails: Extra inputs are not permitted"),
    "invalid trial": (dict(params={"model.n_heads": {"choices": [3, 4]}}),
                      "search.yaml: the trial model.n_heads=3: model.n_heads: emb_dim"),
    "grid over a range": (dict(sampler="grid"), "params: train.lr: the grid sampler needs choices"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_search_file_is_named_in_one_line(conf_only, case, monkeypatch):
    from pipeline.common import StageError
    from pipeline.search import load_spec

    changes, expected = BAD[case]
    monkeypatch.chdir(conf_only)
    Path("search.yaml").write_text(yaml.safe_dump(smoke_search(**changes)))
    with pytest.raises(StageError) as err:
        load_spec(Path("search.yaml"))
    assert expected in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_the_command_refuses_a_bad_file_in_one_line_and_runs_nothing(conf_only):
    proc = search_cli(conf_only, smoke_search(params={"train.lrr": {"low": 1e-4, "high": 1e-2}}))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "search: error: search.yaml: params: train.lrr: not a parameter of conf/ " \
                          "(Could not override 'train.lrr'.)\n", proc.stderr
    assert sorted(p.name for p in conf_only.iterdir()) == ["conf", "search.yaml"]  # no study, no report


def test_an_unreachable_storage_is_named_in_one_line(conf_only):
    port = free_port()  # nothing listens there
    started = time.time()
    proc = search_cli(conf_only, smoke_search(), OPTUNA_STORAGE=f"postgresql://minigpt:s3cret@127.0.0.1:{port}/optuna")
    assert proc.returncode == 1 and time.time() - started < 60
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1, proc.stderr
    assert line.startswith(f"search: error: study storage postgresql://minigpt:***@127.0.0.1:{port}/optuna: "
                           f"cannot open it: "), line
    assert "s3cret" not in line
    proc = search_cli(conf_only, smoke_search(), OPTUNA_STORAGE=f"sqlite:///{conf_only}/no/such/folder/s.db")
    assert proc.returncode == 1 and "cannot open it: unable to open database file" in proc.stderr, proc.stderr
    assert sorted(p.name for p in conf_only.iterdir()) == ["conf", "search.yaml"]


def test_a_study_made_from_another_definition_is_refused(conf_only):
    url = f"sqlite:///{conf_only}/search.db"
    first = search_cli(conf_only, smoke_search(), "--report", OPTUNA_STORAGE=url)
    assert first.returncode == 1 and "no study 'smoke' in sqlite:///" in first.stderr and "yet" in first.stderr

    from pipeline.search import Search, SearchSpec

    Search(SearchSpec.model_validate(smoke_search()), Path("search.yaml"), url, conf_only)  # creates the study
    other = smoke_search(params={"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    proc = search_cli(conf_only, other, OPTUNA_STORAGE=url)
    assert proc.returncode == 1
    assert ("search.yaml: study 'smoke' in sqlite:///" in proc.stderr
            and "was created from another search definition (it differs in params)" in proc.stderr), proc.stderr
    more_trials = search_cli(conf_only, smoke_search(trials=5), "--report", OPTUNA_STORAGE=url)  # may grow
    assert more_trials.returncode == 0 and "Trials: none yet (the study wants 5" in more_trials.stdout


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks for trials without Study.optimize
def test_a_trial_of_a_worker_killed_on_this_machine_is_failed_and_queued_again(tmp_path):
    """kill -9 leaves its trial RUNNING; the next worker here finds the process gone."""
    from optuna.trial import TrialState

    from pipeline.search import Search, SearchSpec

    spec = SearchSpec.model_validate(smoke_search())
    url = f"sqlite:///{tmp_path}/search.db"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = Search(spec, Path("search.yaml"), url, tmp_path)
    trial = first.study.ask()
    trial.suggest_float("train.lr", 1e-6, 1e-2, log=True)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    alive = first.study.ask()  # another worker's, still running
    alive.suggest_float("train.lr", 1e-6, 1e-2, log=True)
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

    again = Search(spec, Path("search.yaml"), url, tmp_path)
    again.fail_dead_trials()
    trials = again.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[0].user_attrs["interrupted"] is True
    assert trials[2].system_attrs["fixed_params"] == trials[0].params and trials[2].user_attrs["retry_of"] == 0
    # A worker that skips interrupted trials (a setting of each worker, not of the study) queues nothing.
    skip = Search(spec.model_copy(update={"interrupted": "skip"}), Path("search.yaml"), url, tmp_path)
    alive.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    skip.fail_dead_trials()
    assert [t.state for t in skip.study.get_trials()] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks for trials without Study.optimize
def test_a_queued_point_asked_for_after_the_study_has_its_trials_stays_queued(tmp_path):
    """Two workers, one trial left: the one that loses the race runs nothing, and if what it took
    was a queued point (a retry), the point is queued again rather than lost."""
    from pipeline.search import Search, SearchSpec, SurplusTrial

    spec = SearchSpec.model_validate(smoke_search(trials=1, first_trials=[{"train.lr": 3e-3}, {"train.lr": 2e-3}]))
    search = Search(spec, Path("search.yaml"), f"sqlite:///{tmp_path}/search.db", tmp_path)
    search.study.ask().suggest_float("train.lr", 1e-6, 1e-2, log=True)  # the other worker's, running
    with pytest.raises(SurplusTrial):
        search.objective(search.study.ask())
    trials = search.study.get_trials()
    assert trials[1].user_attrs["not_run"] is True
    assert trials[2].state.name == "WAITING" and trials[2].system_attrs["fixed_params"] == {"train.lr": 2e-3}


def test_a_worker_stops_after_three_failed_trials_each_told_in_one_line(conf_only):
    """Outside a DVC repository every trial's `dvc exp run` fails: a broken setup, not bad luck."""
    shutil.copy(ROOT / "params.yaml", conf_only / "params.yaml")
    proc = search_cli(conf_only, smoke_search(trials=5))
    failed = [line for line in proc.stdout.splitlines() if " failed: " in line]
    assert proc.returncode == 1 and len(failed) == 3, proc.stdout + proc.stderr
    assert failed[0].startswith("search: trial 0 failed: smoke-t0 failed (") and "log: reports/search/smoke/trial-0.log" in failed[0]
    assert "search: 3 trials in a row failed; this worker stops" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert re.search(r"\|\s+2 \| failed\s+\|", (conf_only / "reports/search/smoke.md").read_text())


def test_against_counts_the_trials_and_minutes_to_come_within_001_of_the_other_best():
    import datetime

    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import FrozenTrial, TrialState

    from pipeline.search import against

    t0 = datetime.datetime(2026, 12, 7, 12, 0)

    def study_of(name: str, results: list) -> optuna.Study:
        study = optuna.create_study(study_name=name)
        for i, (value, state, start, end) in enumerate(results):
            study.add_trial(FrozenTrial(
                number=i, trial_id=i, state=state, value=value if state == TrialState.COMPLETE else None,
                datetime_start=t0 + datetime.timedelta(minutes=start), datetime_complete=t0 + datetime.timedelta(minutes=end),
                params={"x": float(i)}, distributions={"x": FloatDistribution(0, 10)}, user_attrs={}, system_attrs={},
                intermediate_values={50: value}))
        return study

    C, P = TrialState.COMPLETE, TrialState.PRUNED
    grid = study_of("grid", [(2.00, C, 0, 3), (1.90, C, 3, 6), (1.95, C, 6, 9)])
    search = study_of("search", [(1.99, C, 0, 3), (2.50, P, 3, 4), (1.905, C, 4, 7), (1.80, C, 7, 10)])
    lines = against(search, grid, "val_bits_per_byte")
    assert lines[0] == "Against study `grid` (best val_bits_per_byte 1.9000, 3 trials in 9.0 min):"
    assert lines[1] == "- within 0.01 of it after 3 trials, 7.0 min (trial 2: 1.9050)"
    assert lines[2] == "- in all: 4 trials, 1 pruned, 10.0 min"


# --------------------------------------------------------------------------- the real thing
@pytest.fixture(scope="module")
def clone(tokenized_template, tmp_path_factory) -> Path:
    """A clone whose data stages ran: every trial's temporary copy finds them in the cache."""
    return copy_repo(tokenized_template, tmp_path_factory.mktemp("search") / "repo")


@pytest.mark.slow
def test_search_prunes_a_hopeless_trial_and_continues_after_ctrl_c(clone):
    import optuna
    from optuna.trial import TrialState

    from pipeline.trial import open_storage

    # Trials 0 and 1 complete (the median pruner waits for 2); 2 is hopeless (lr 1e-6) and is
    # interrupted mid-way; running the search again runs it as trial 3, which is pruned at step 3.
    spec = smoke_search(first_trials=[{"train.lr": 3e-3}, {"train.lr": 2e-3}, {"train.lr": 1e-6}],
                        pruner={"kind": "median", "startup_trials": 2})
    (clone / "smoke.yaml").write_text(yaml.safe_dump(spec))
    log = clone / "search-first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.search", "smoke.yaml"], cwd=clone,
                                env=env_for(clone), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while "search: trial 2 (smoke-t2)" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.5)
        time.sleep(8)  # its experiment is under way
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=120) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = log.read_text()
    assert "search: trial 2 was interrupted; its parameters are queued to run again" in first
    assert "`make search` continues study 'smoke'" in first

    again = run(clone, sys.executable, "-m", "pipeline.search", "smoke.yaml")
    assert "search: trial 3: pruned after 3 steps" in again.stdout, again.stdout

    study = optuna.load_study(study_name="smoke", storage=open_storage(f"sqlite:///{clone}/search.db"))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert trials[2].user_attrs["interrupted"] and trials[3].user_attrs["retry_of"] == 2
    assert trials[3].params == trials[2].params == {"train.lr": 1e-6}
    assert study.best_trial.number in (0, 1)

    # Each trial that counts is one FINISHED MLflow run (the pruned one tagged so) and one DVC experiment.
    uri = f"sqlite:///{clone}/mlflow.db"
    runs = [r for r in stage_runs(uri, "pretrain") if r.data.tags.get("search") == "smoke"]
    finished = {int(r.data.tags["trial"]): r for r in runs if r.info.status == "FINISHED"}
    assert sorted(finished) == [0, 1, 3] and len([r for r in runs if r.data.tags["trial"] != "2"]) == 3
    assert all(r.info.status != "FINISHED" for r in runs if r.data.tags["trial"] == "2")
    for number in (0, 1):
        assert finished[number].data.metrics["val_bits_per_byte"] == trials[number].value
        assert finished[number].data.tags["train.stop_reason"] == "max_steps"
    pruned = finished[3].data.tags
    assert pruned["pruned"] == "true" and pruned["train.stop_reason"] == "pruned" and pruned["train.steps"] == "3"
    assert {r.data.tags["sweep"] for r in finished.values()} == {"search-smoke"}
    experiments = run(clone, "dvc", "exp", "list", "--name-only").stdout.split()
    assert {"smoke-t0", "smoke-t1", "smoke-t3"} <= set(experiments)

    # The report: best params, every trial's row, the importance plot.
    text = (clone / "reports/search/smoke.md").read_text()
    assert f"**Best: trial {study.best_trial.number}, val_bits_per_byte {study.best_value:.4f}**" in text
    assert re.search(r"\|\s+2 \| interrupted\s+\|", text) and re.search(r"\|\s+3 \| pruned\s+\|", text), text
    assert "![parameter importance](smoke-importance.png)" in text
    assert (clone / "reports/search/smoke-importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.split("\n\n", 1)[0] in again.stdout

    # make compare groups the study's runs by its tags.
    compare = run(clone, sys.executable, "-m", "pipeline.compare", "--all",
                  "--filter", "tags.search = 'smoke' and tags.pruned = 'true'")
    rows = [line for line in compare.stdout.splitlines() if line.startswith("|")][2:]  # after the header
    assert len(rows) == 1 and finished[3].info.run_id[:8] in rows[0], compare.stdout
