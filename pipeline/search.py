"""`make search`: a hyper-parameter search that picks each next experiment from the results so
far (Optuna) and stops hopeless ones early; every trial an ordinary DVC experiment and MLflow run.

    python -m pipeline.search conf/search/recipe.yaml            # run (or continue) the study
    python -m pipeline.search conf/search/recipe.yaml --report   # only the report of its trials
    python -m pipeline.search conf/search/recipe.yaml --report --against recipe-grid  # vs the grid
    OPTUNA_STORAGE=postgresql://... python -m pipeline.search F  # one study, several machines

The search file (conf/search/recipe.yaml says what each key means) names the parameters and
their ranges, the objective, the number of trials and each trial's budget. A trial is
`dvc exp run --temp <stage> --name <study>-t<n> -S ...` (a temporary copy of the workspace,
so several workers on one checkout do not collide), tracked in MLflow as any run, tagged
`search=<study>`, `trial=<n>` and `sweep=search-<study>`. Its training stage reports each
evaluation's val loss to the study (pipeline.trial); when the pruner says so, training stops
there (stop reason `pruned`) and the run ends FINISHED, tagged `pruned`.

The study lives in a database: SQLite `search.db` at the repository root by default, or
OPTUNA_STORAGE. Workers anywhere run `make search` on the same study at once. A worker that is
stopped (Ctrl-C, SIGTERM) stops its trial's experiment and marks the trial failed; one that died
without a word is found by its missing heartbeat (or, on its own machine, its missing process).
Either way the trial never counts as a result and, with `interrupted: retry`, its parameters are
queued to run again. Running `make search` again continues the study.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, NonNegativeInt, PositiveInt, ValidationError, model_validator

from minigpt.config import PipelineConfig, StrictModel, format_validation_error
from minigpt.io import atomic_path, write_text_atomic
from pipeline import paths
from pipeline.common import StageError, load_config, stage_main
from pipeline.trial import PRUNED, PRUNER_ATTR, TRIAL_ENV, TrialInfo, build_pruner, open_storage, shown_url

# The metrics a trial can be judged by (all minimised), as their stage logs them to MLflow,
# and the dvc.yaml stage a trial must run to get them.
OBJECTIVES = {"val_bits_per_byte": "evaluate", "val_loss_full": "evaluate", "val_perplexity": "evaluate",
              "best_val_loss": "pretrain"}
BUDGET_KEYS = ("max_steps", "max_tokens", "max_time")
STORAGE_ENV = "OPTUNA_STORAGE"
DEFAULT_STORAGE = "search.db"  # at the repository root; .gitignore keeps it out of git
SPEC_ATTR = "definition"  # the study's user attribute: the search file it was created from
SEARCH_REPORTS = paths.REPORTS / "search"
# A worker's trial sends a heartbeat every HEARTBEAT seconds; one silent for GRACE seconds is
# failed (and retried) by the next worker that starts a trial. GRACE covers a busy database.
HEARTBEAT, GRACE = 20, 120
FAILURES_IN_A_ROW = 3  # failed trials after which a worker stops: a broken setup, not bad luck
STOP_WAIT = 30  # seconds a trial's experiment gets to end after SIGINT, before SIGKILL


# --------------------------------------------------------------------------- the search file
Value = bool | int | float | str


class Range(StrictModel):
    """One parameter's values: `choices`, or `low`..`high` (ints if both are ints), `log` scale."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Value] | None = None

    @model_validator(mode="after")
    def _check(self) -> Range:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low and high, not both")
            if not self.choices:
                raise ValueError("choices: empty: no value to try")
            return self
        if self.low is None or self.high is None:
            raise ValueError("expected low and high, or choices")
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) is not below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("step and log together: Optuna samples one or the other")
        return self

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high)) and not isinstance(self.step, float)

    def corners(self) -> list[Value]:
        """The values that bound what a trial may get: what validation tries."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def suggest(self, trial: Any, name: str) -> Value:
        if self.choices is not None:
            return trial.suggest_categorical(name, self.choices)
        if self.integer:
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


class PrunerSpec(StrictModel):
    kind: Literal["median", "halving", "none"] = "median"
    startup_trials: NonNegativeInt = 3  # median: trials that must finish before any is pruned
    warmup_steps: NonNegativeInt = 0  # training steps before a trial may be pruned
    reduction_factor: int = Field(3, ge=2)  # halving: 1 in reduction_factor trials goes on at each rung


class SearchSpec(StrictModel):
    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    objective: str = "val_bits_per_byte"
    trials: PositiveInt
    budget: dict[str, int | float]  # e.g. train.max_steps: 300
    fixed: dict[str, Value] = {}  # overrides every trial shares, e.g. data: shakespeare
    params: dict[str, Range] = Field(min_length=1)
    first_trials: list[dict[str, Value]] = []  # points tried first (e.g. today's recipe)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    startup_trials: PositiveInt = 4  # tpe: random trials before it models the results
    pruner: PrunerSpec = PrunerSpec()
    interrupted: Literal["retry", "skip"] = "retry"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: no stage reports {self.objective!r}; expected one of "
                             f"{', '.join(OBJECTIVES)}")
        for key in self.budget:
            if key.rsplit(".", 1)[-1] not in BUDGET_KEYS:
                raise ValueError(f"budget: {key}: expected a training budget (train.{'|'.join(BUDGET_KEYS)})")
        sections = {"budget": self.budget, "fixed": self.fixed, "params": self.params}
        for name, keys in sections.items():
            for other, other_keys in sections.items():
                if name < other and (both := sorted(set(keys) & set(other_keys))):
                    raise ValueError(f"{name}: {both[0]}: also in {other}; a key belongs to one of them")
        for i, point in enumerate(self.first_trials):
            if unknown := sorted(set(point) - set(self.params)):
                raise ValueError(f"first_trials.{i}: {unknown[0]}: not one of params")
        if self.sampler == "grid":
            if ranged := [k for k, r in self.params.items() if r.choices is None]:
                raise ValueError(f"params: {ranged[0]}: the grid sampler needs choices, not a range")
            if self.trials > (size := math.prod(len(r.choices) for r in self.params.values())):
                raise ValueError(f"trials: {self.trials}, but the grid has {size} points")
        return self

    def definition(self) -> dict[str, Any]:
        """What a study is: all of the file but `trials` (which may grow, to continue a study) and
        `interrupted` (what each worker does with the trials it finds interrupted)."""
        return self.model_dump(mode="json", exclude={"trials", "interrupted"})


def override(key: str, value: Value) -> str:
    """`key=value` as `dvc exp run -S` and Hydra read it."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return f"{key}={text}"


def trial_overrides(spec: SearchSpec, params: dict[str, Value]) -> list[str]:
    return [override(k, v) for k, v in {**spec.fixed, **spec.budget, **params}.items()]


def load_spec(path: Path, conf_dir: Path = Path("conf")) -> SearchSpec:
    """The search file at `path`, checked down to every key and bound against conf/: one line
    naming the file and the key for anything wrong, before any trial runs."""
    if not path.is_file():
        raise StageError(f"{path}: no such search file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StageError(f"{path}: not YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise StageError(f"{path}: expected a mapping (study, objective, trials, budget, params, ...)")
    try:
        spec = SearchSpec.model_validate(raw)
    except ValidationError as err:
        raise StageError(f"{path}: {format_validation_error(err)}") from None
    check_against_conf(spec, path, conf_dir)
    return spec


def check_against_conf(spec: SearchSpec, path: Path, conf_dir: Path) -> None:
    """Every key is a parameter of conf/, and the trials at the corners of the space compose
    into a valid config (what `dvc exp run -S` would otherwise find out one trial later)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.compose import compose_params

    def compose(overrides: list[str]) -> dict:
        return yaml.safe_load(compose_params(overrides, conf_dir))

    sections = {"fixed": spec.fixed, "budget": spec.budget,
                "params": {k: r.corners()[0] for k, r in spec.params.items()}}
    for section, values in sections.items():
        for key, value in values.items():
            try:
                compose([override(key, value)])
            except (HydraException, OmegaConfBaseException) as err:
                first = str(err).strip().splitlines()[0]
                raise StageError(f"{path}: {section}: {key}: not a parameter of {conf_dir}/ ({first})") from None
    corners = [{k: r.corners()[i] for k, r in spec.params.items()} for i in (0, -1)]
    corners += [{**corners[0], **point} for point in spec.first_trials]
    for corner in corners:
        try:
            PipelineConfig.model_validate(compose(trial_overrides(spec, corner)))
        except ValidationError as err:
            where = ", ".join(f"{k}={v}" for k, v in corner.items())
            raise StageError(f"{path}: the trial {where}: {format_validation_error(err)}") from None


# --------------------------------------------------------------------------- the study
def storage_url(root: Path) -> str:
    return os.environ.get(STORAGE_ENV) or f"sqlite:///{root / DEFAULT_STORAGE}"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Search:
    """One worker of a study: opens (or creates) it, runs trials until the study has its
    `trials` results, reports."""

    def __init__(self, spec: SearchSpec, spec_path: Path, url: str, root: Path, create: bool = True) -> None:
        import optuna

        self.spec, self.spec_path, self.url, self.root = spec, spec_path, url, root
        # This module says what happens to each trial in one line; Optuna's log would repeat it
        # with a traceback for every failed (or surplus) trial.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's
            self.storage = open_storage(url, heartbeat_interval=HEARTBEAT, grace_period=GRACE,
                                        heartbeat_stale_trial_callback=self.requeue)
        self.failures_in_a_row, self.gave_up = 0, False
        created = self._create() if create else False
        try:
            study_id = self.storage.get_study_id_from_name(spec.study)
        except KeyError:
            raise StageError(f"no study {spec.study!r} in {shown_url(url)} yet: `make search` starts it") from None
        definition = self._definition(study_id)
        if definition != spec.definition():
            changed = sorted(k for k in {*definition, *spec.definition()}
                             if definition.get(k) != spec.definition().get(k))
            raise StageError(f"{spec_path}: study {spec.study!r} in {shown_url(url)} was created from another "
                             f"search definition (it differs in {', '.join(changed)}); name a new study")
        # The worker that created the study draws from `seed` (one worker replays exactly); a worker
        # joining it draws its own stream, or two would propose the same points.
        seed = spec.seed if created else hash((spec.seed, os.getpid(), time.time_ns())) % 2**31
        self.study = optuna.load_study(study_name=spec.study, storage=self.storage, sampler=self._sampler(seed),
                                       pruner=build_pruner(self.storage.get_study_user_attrs(study_id)[PRUNER_ATTR]))

    def _create(self) -> bool:
        """Create the study, with its definition; False if it exists (another worker made it)."""
        import optuna

        try:
            study_id = self.storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], self.spec.study)
        except optuna.exceptions.DuplicatedStudyError:
            return False
        self.storage.set_study_user_attr(study_id, PRUNER_ATTR, self.spec.pruner.model_dump())
        for point in self.spec.first_trials:  # queued before the definition: a joining worker waits for it
            optuna.Study(self.spec.study, self.storage).enqueue_trial(point)
        self.storage.set_study_user_attr(study_id, SPEC_ATTR, self.spec.definition())
        return True

    def _definition(self, study_id: int) -> dict[str, Any]:
        """The study's definition; a worker that lost the race to create it waits for the winner's."""
        deadline = time.time() + 30
        while (attrs := self.storage.get_study_user_attrs(study_id)).get(SPEC_ATTR) is None:
            if time.time() > deadline:
                raise StageError(f"study {self.spec.study!r} in {shown_url(self.url)} has no search definition; "
                                 f"it was not made by make search: name a new study")
            time.sleep(0.5)
        return attrs[SPEC_ATTR]

    def _sampler(self, seed: int):
        import optuna

        if self.spec.sampler == "grid":
            return optuna.samplers.GridSampler({k: r.choices for k, r in self.spec.params.items()}, seed=seed)
        if self.spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # multivariate: lr and its partners interact; constant_liar: a running trial counts as a
        # bad result, so parallel workers do not all propose the point the model likes best.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(n_startup_trials=self.spec.startup_trials, multivariate=True,
                                              constant_liar=True, seed=seed)

    # ----------------------------------------------------------------------- trials
    def finished(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def requeue(self, study: Any, trial: Any) -> None:
        """An interrupted trial (a Trial, or a FrozenTrial found dead): its parameters run again
        (`interrupted: retry`) or not (skip)."""
        if self.spec.interrupted == "retry" and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            print(f"search: trial {trial.number} was interrupted; its parameters are queued to run again")
        else:
            print(f"search: trial {trial.number} was interrupted; skipped (interrupted: skip)")

    def fail_dead_trials(self) -> None:
        """Trials still RUNNING for a worker of this machine whose process is gone (a kill -9):
        failed now, not after the heartbeat's grace period."""
        import optuna
        import psutil
        from optuna.trial import TrialState

        host = socket.gethostname()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
            if worker_host == host and pid.isdigit() and not psutil.pid_exists(int(pid)):
                trial_id = trial._trial_id  # Optuna's storage API names trials by id
                try:
                    self.storage.set_trial_user_attr(trial_id, "interrupted", True)
                    self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker starting here failed it first
                # (On SQLite, without row locks, two workers starting at the same instant can both
                # get here: the point then runs twice, as two trials.)
                self.requeue(self.study, trial)

    def objective(self, trial: Any) -> float:
        import optuna
        from optuna.trial import TrialState

        ahead = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                           TrialState.RUNNING))
                 if t.number < trial.number]
        # Counting the trials ahead by number keeps two workers from both running the last one. A
        # queued retry (an older number) taken after a newer trial passed this check can still make
        # one trial more than `trials`: more work, never a lost or double-counted trial.
        if len(ahead) >= self.spec.trials:  # another worker asked for the last trial a moment earlier
            trial.set_user_attr("not_run", True)
            # A queued point (a retry, a first trial) stays queued, for whoever continues the study.
            if fixed := self.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params"):
                self.study.enqueue_trial(fixed, user_attrs={k: v for k, v in trial.user_attrs.items() if k != "not_run"})
            raise SurplusTrial
        params = {name: rng.suggest(trial, name) for name, rng in self.spec.params.items()}
        name = f"{self.spec.study}-t{trial.number}"
        for key, value in (("worker", worker_id()), ("experiment", name)):
            trial.set_user_attr(key, value)
        started = time.time()
        print(f"search: trial {trial.number} ({name}): {', '.join(override(k, v) for k, v in params.items())}")
        try:
            self.run_experiment(trial, name, trial_overrides(self.spec, params))
            run = self.trial_run(trial.number)
        except KeyboardInterrupt:  # Optuna marks the trial failed once this leaves `objective`
            trial.set_user_attr("interrupted", True)
            self.requeue(self.study, trial)
            raise
        except TrialFailed as err:
            trial.set_user_attr("error", str(err))
            raise
        value = run.data.metrics.get(self.spec.objective)
        stop_reason = run.data.tags.get("train.stop_reason")
        steps = int(run.data.tags.get("train.steps", 0))
        attrs = {"mlflow_run": run.info.run_id, "steps": steps, "stop_reason": stop_reason,
                 "seconds": round(time.time() - started), "objective": value}
        for key, attr in attrs.items():
            trial.set_user_attr(key, attr)
        if stop_reason == PRUNED:
            print(f"search: trial {trial.number}: pruned after {steps} steps ({time.time() - started:.0f} s)")
            raise optuna.TrialPruned(f"at step {steps}")
        if value is None or not math.isfinite(value):
            error = f"its run {run.info.run_id} has no finite {self.spec.objective}"
            trial.set_user_attr("error", error)
            raise TrialFailed(error)
        print(f"search: trial {trial.number}: {self.spec.objective} {value:.4f} ({time.time() - started:.0f} s)")
        return value

    def run_experiment(self, trial: Any, name: str, overrides: list[str]) -> None:
        """`dvc exp run` of the trial, in its own process group, output to its log file."""
        log_path = SEARCH_REPORTS / self.spec.study / f"trial-{trial.number}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        dvc = Path(sys.executable).with_name("dvc")
        cmd = [str(dvc) if dvc.exists() else "dvc", "exp", "run", "--temp", OBJECTIVES[self.spec.objective],
               "--name", name, *[arg for o in overrides for arg in ("-S", o)]]
        info = TrialInfo(self.url, self.spec.study, trial.number, trial._trial_id)
        env = {**os.environ, TRIAL_ENV: info.to_env(), "MINIGPT_SWEEP": f"search-{self.spec.study}"}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait()
            except BaseException:
                stop_experiment(proc)
                raise
        if code != 0:
            raise TrialFailed(f"{name} failed ({last_error(log_path)}); log: {log_path}")

    def trial_run(self, number: int) -> Any:
        from mlflow.tracking import MlflowClient

        filter_string = f"tags.search = '{self.spec.study}' and tags.trial = '{number}' and tags.stage = 'pretrain'"
        runs = MlflowClient().search_runs([self.experiment_id], filter_string=filter_string,
                                          order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise TrialFailed(f"its experiment ended, but no MLflow run is tagged {filter_string!r}")
        return runs[0]

    def after_trial(self, study: Any, trial: Any) -> None:
        from optuna.trial import TrialState

        if trial.user_attrs.get("not_run"):
            print(f"search: the study has all its {self.spec.trials} trials (the last run on other workers); "
                  f"this worker stops")
            study.stop()
            return
        if trial.state == TrialState.FAIL:
            print(f"search: trial {trial.number} failed: {trial.user_attrs.get('error', 'see its log')}")
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failures_in_a_row >= FAILURES_IN_A_ROW:
            print(f"search: {FAILURES_IN_A_ROW} trials in a row failed; this worker stops")
            self.gave_up = True
            study.stop()
        elif self.finished() >= self.spec.trials:
            study.stop()

    def run(self) -> int:
        """Trials until the study has its results or all its trials run somewhere; the exit
        status: 1 if this worker gave up after FAILURES_IN_A_ROW failed trials."""
        import optuna

        from pipeline.run import connect  # MLflow: imported only to run trials (a refused file is quick)

        self.experiment_id = connect(load_config("tracking").tracking)  # the store, before parallel trials
        self.fail_dead_trials()
        if self.finished() < self.spec.trials:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.optimize(self.objective, catch=(TrialFailed, SurplusTrial), callbacks=[self.after_trial])
        return 1 if self.gave_up else 0


class TrialFailed(Exception):
    """A trial whose experiment failed or left no result: a FAIL in the study, the search goes on."""


class SurplusTrial(Exception):
    """A trial asked for after the study had all its trials: never run."""


def stop_experiment(proc: subprocess.Popen) -> None:
    """End a trial's `dvc exp run` as Ctrl-C would (its MLflow run is then marked failed, not
    left running), SIGKILL if it has not ended within STOP_WAIT seconds. A second Ctrl-C meanwhile
    does not leave it running."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    for sig, wait in ((signal.SIGINT, STOP_WAIT), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_error(log_path: Path) -> str:
    """The line of a failed experiment's log that says why: the stage's own error, else DVC's."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    for marker in (": error: ", "ERROR"):
        if found := [line for line in lines if marker in line]:
            return found[-1][:300]
    return lines[-1][:300] if lines else "no output"


# --------------------------------------------------------------------------- the report
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "queued"}


def trials_table(study: Any, spec: SearchSpec):
    """One row per trial that ran or runs: its params, objective, state, steps and minutes."""
    import pandas as pd

    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("not_run"):
            continue
        state = STATES[trial.state.name]
        if trial.user_attrs.get("interrupted") and state == "failed":
            state = "interrupted"
        value = trial.user_attrs.get("objective")
        rows.append({"trial": trial.number, "state": state, spec.objective: None if value is None else round(value, 4),
                     **{name: trial.params.get(name) for name in spec.params},
                     "steps": trial.user_attrs.get("steps"),
                     "minutes": round(trial.user_attrs["seconds"] / 60, 1) if "seconds" in trial.user_attrs else None,
                     "experiment": trial.user_attrs.get("experiment")})
    return pd.DataFrame(rows)


def importance_plot(study: Any, path: Path, complete: int) -> str | None:
    """Optuna's parameter-importance chart (matplotlib) at `path`; why not, if it cannot be drawn.

    Its default evaluator, PED-ANOVA, asks how the best 10% of the trials differ from the rest:
    of 9 trials that is one, and every parameter then comes out equally important (so it did on
    the 9-point recipe grid, where lr plainly matters most; so it still did with the best 3).
    The best 5 trials, at most half and at least 10% of them, are asked instead."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    evaluator = PedAnovaImportanceEvaluator(target_quantile=min(0.5, max(0.1, 5 / complete)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its matplotlib backend is marked experimental
        try:
            axes = optuna.visualization.matplotlib.plot_param_importances(study, evaluator=evaluator)
        except (ValueError, RuntimeError) as err:
            return str(err).splitlines()[0]
    figure = axes.figure
    figure.set_size_inches(7, 3.5)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    matplotlib.pyplot.close(figure)
    return None


def against(study: Any, other: Any, objective: str, within: float = 0.01) -> list[str]:
    """How `study` fared against `other` (e.g. the grid over the same space): the trials and
    wall-clock it took to come within `within` of the other's best, beside what the other took."""
    from optuna.trial import TrialState

    def timeline(s: Any) -> tuple[list[Any], Any]:
        done = sorted((t for t in s.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)),
                      key=lambda t: t.datetime_complete)
        return done, min((t.datetime_start for t in s.get_trials(deepcopy=False) if t.datetime_start), default=None)

    def minutes(since: Any, until: Any) -> str:
        return f"{(until - since).total_seconds() / 60:.1f} min"

    target = other.best_value + within
    done, start = timeline(study)
    other_done, other_start = timeline(other)
    first = next((i for i, t in enumerate(done) if t.state == TrialState.COMPLETE and t.value <= target), None)
    pruned = sum(t.state == TrialState.PRUNED for t in done)
    lines = [f"Against study `{other.study_name}` (best {objective} {other.best_value:.4f}, "
             f"{len(other_done)} trials in {minutes(other_start, other_done[-1].datetime_complete)}):"]
    if first is None:
        lines.append(f"- never within {within} of it in {len(done)} trials ({pruned} pruned)")
    else:
        lines.append(f"- within {within} of it after {first + 1} trials, "
                     f"{minutes(start, done[first].datetime_complete)} (trial {done[first].number}: "
                     f"{done[first].value:.4f})")
    lines.append(f"- in all: {len(done)} trials, {pruned} pruned, "
                 f"{minutes(start, done[-1].datetime_complete) if done else '0 min'}")
    return lines + [""]


def report(search: Search, against_study: str | None = None) -> str:
    """reports/search/<study>.md and <study>-importance.png; the text printed. `against_study`:
    another study in the same storage to measure this one by (its best, its wall-clock)."""
    from optuna.trial import TrialState

    spec, study = search.spec, search.study
    table = trials_table(study, spec)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    lines = [f"# Search `{spec.study}`: {spec.objective}, minimised", "",
             f"{search.spec_path}; study in {shown_url(search.url)}; sampler {spec.sampler}, pruner {spec.pruner.kind}; "
             f"each trial: {', '.join(override(k, v) for k, v in {**spec.fixed, **spec.budget}.items())}", "",
             f"Trials: {', '.join(f'{n} {state}' for state, n in counts.items()) or 'none yet'} "
             f"(the study wants {spec.trials} complete or pruned).", ""]
    if complete:
        best = min(complete, key=lambda t: t.value)
        lines += [f"**Best: trial {best.number}, {spec.objective} {best.value:.4f}** "
                  f"({best.user_attrs.get('experiment')}, MLflow run {best.user_attrs.get('mlflow_run')}):", "",
                  *[f"- `{override(k, v)}`" for k, v in best.params.items()], ""]
    if len(table):
        lines += [table.to_markdown(index=False), ""]
    if against_study:
        import optuna

        try:
            other = optuna.load_study(study_name=against_study, storage=search.storage)
            lines += against(study, other, spec.objective)
        except (KeyError, ValueError) as err:  # no such study, or none of its trials complete
            raise StageError(f"--against {against_study}: {str(err).strip(chr(39))}") from None
    png = SEARCH_REPORTS / f"{spec.study}-importance.png"
    why_not = importance_plot(study, png, len(complete)) if len(complete) >= 2 else "fewer than 2 complete trials"
    lines += [f"![parameter importance]({png.name})" if why_not is None else f"No importance plot: {why_not}.", ""]
    text = "\n".join(lines)
    write_text_atomic(SEARCH_REPORTS / f"{spec.study}.md", text)
    return text + f"\nsearch: wrote {SEARCH_REPORTS / (spec.study + '.md')}" + ("" if why_not else f" and {png}")


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.search", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("search_file", type=Path, help="e.g. conf/search/recipe.yaml")
    parser.add_argument("--report", action="store_true", help="write and print the report only; run no trial")
    parser.add_argument("--against", metavar="STUDY", help="compare with another study of the same storage "
                                                           "(e.g. recipe-grid): trials and minutes to within 0.01")
    args = parser.parse_args(sys.argv[1:])
    sys.stdout.reconfigure(line_buffering=True)  # a line per trial as it happens, also into a log file
    root = Path.cwd()
    spec = load_spec(args.search_file)
    search = Search(spec, args.search_file, storage_url(root), root, create=not args.report)
    # SIGINT and SIGTERM (a scheduler, `kill`) end the worker as Ctrl-C does: the trial stopped and
    # marked failed. SIGINT too, explicitly: a process started with it ignored inherits that.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    status = 0
    try:
        if not args.report:
            status = search.run()
    except KeyboardInterrupt:
        print(f"search: interrupted; `make search` continues study {spec.study!r}", file=sys.stderr)
        sys.exit(130)
    print(report(search, args.against))
    sys.exit(status)


if __name__ == "__main__":
    main()
