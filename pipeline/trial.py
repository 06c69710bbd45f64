"""A training stage's side of `make search` (pipeline.search): which trial this run is, each
evaluation reported to the study, and the pruner's verdict turned into a reason to stop.

`make search` starts every trial as a `dvc exp run` with MINIGPT_TRIAL set to the JSON of a
`TrialInfo`; outside a search the variable is unset and nothing here runs. The pruner is not
in the study database (Optuna keeps only trials there), so the study carries its definition in
a user attribute that `pipeline.search` writes when it creates the study, and every worker and
trial builds the same pruner from it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pipeline.common import StageError

if TYPE_CHECKING:
    import optuna

TRIAL_ENV = "MINIGPT_TRIAL"
PRUNED = "pruned"  # the stop reason of a trial its pruner stopped
PRUNER_ATTR = "pruner"  # the study's user attribute holding the pruner's definition
CONNECT_TIMEOUT = 10  # seconds to reach a study database before saying it is down


@dataclass(frozen=True)
class TrialInfo:
    storage: str  # the study database's URL
    study: str
    number: int  # the trial's number in its study (what people see)
    trial_id: int  # its id in the database (what Optuna's Trial is opened by)

    def to_env(self) -> str:
        return json.dumps(asdict(self))


def current_trial() -> TrialInfo | None:
    """The trial this process trains for, or None outside a search."""
    raw = os.environ.get(TRIAL_ENV)
    if not raw:
        return None
    try:
        return TrialInfo(**json.loads(raw))
    except (ValueError, TypeError) as err:
        raise StageError(f"{TRIAL_ENV}: expected the JSON `make search` sets ({err})") from None


def trial_tags() -> dict[str, str]:
    """The MLflow tags of a trial's run: `search=<study>`, `trial=<number>`."""
    trial = current_trial()
    return {} if trial is None else {"search": trial.study, "trial": str(trial.number)}


def shown_url(url: str) -> str:
    """`url` with its password hidden, for messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(url: str, **heartbeat: Any) -> optuna.storages.RDBStorage:
    """The study database at `url` (`heartbeat`: RDBStorage's heartbeat settings), or a
    StageError naming it once it has not answered within CONNECT_TIMEOUT seconds.

    `postgresql://` means psycopg 3 here (the team extra installs it; SQLAlchemy's default
    driver for the scheme, psycopg2, is not installed)."""
    import optuna
    import sqlalchemy.exc

    given = url
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("postgresql"):
        engine = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}, "pool_pre_ping": True}
    elif url.startswith("sqlite"):
        engine = {"connect_args": {"timeout": 60}}  # seconds a writer waits for another's lock
    else:
        engine = {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, skip_table_creation=False, **heartbeat)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
            first = (str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__])[0]
            # Two workers creating the tables of a new database at once: one of them loses the race
            # ("duplicate key value" in PostgreSQL's catalog, "already exists" in SQLite); again.
            if attempt < 4 and ("duplicate key" in first or "already exists" in first):
                time.sleep(1 + attempt)
                continue
            raise StageError(f"study storage {shown_url(given)}: cannot open it: {first}") from None


def build_pruner(definition: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The pruner a study's definition names (see conf/search/recipe.yaml)."""
    import optuna

    kind = definition["kind"]
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=definition["startup_trials"],
                                           n_warmup_steps=definition["warmup_steps"])
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(definition["warmup_steps"], 1),
                                                      reduction_factor=definition["reduction_factor"])
    return optuna.pruners.NopPruner()


def pruning_callback() -> Callable[[dict[str, Any]], str | None] | None:
    """For a trial: a training callback that reports each evaluation's `val_loss` to the study
    at its step and answers PRUNED when the pruner stops the trial; None outside a search.

    The stages' objectives are all losses on the validation split, so a trial's val_loss series
    ranks trials in the objective's order (lower is better) at each step, as long as no searched
    parameter changes the data, tokenizer or eval sample. The median pruner compares trials at
    the same step: trials that evaluate at other steps (another eval_interval) never prune each
    other."""
    info = current_trial()
    if info is None:
        return None
    import optuna

    storage = open_storage(info.storage)
    try:
        study_id = storage.get_study_id_from_name(info.study)
        pruner = build_pruner(storage.get_study_user_attrs(study_id)[PRUNER_ATTR])
    except (KeyError, optuna.exceptions.OptunaError) as err:
        raise StageError(f"study {info.study!r} in {shown_url(info.storage)}: {err.__cause__ or err}") from None
    trial = optuna.trial.Trial(optuna.Study(info.study, storage, pruner=pruner), info.trial_id)

    def report(record: dict[str, Any]) -> str | None:
        if record["kind"] != "eval":
            return None
        try:
            trial.report(record["val_loss"], record["step"])
            if not trial.should_prune():
                return None
        except optuna.exceptions.UpdateFinishedTrialError:
            raise StageError(f"trial {info.number} of study {info.study!r} is no longer running (its worker "
                             f"stopped and failed it); this run stops") from None
        except optuna.exceptions.OptunaError as err:  # the database, down or refusing (StorageInternalError)
            cause = str(err.__cause__ or err).strip().splitlines() or [type(err).__name__]
            raise StageError(f"study storage {shown_url(info.storage)}: {cause[0]}") from None
        print(f"search: trial {info.number} of {info.study!r} pruned at step {record['step']} "
              f"(val loss {record['val_loss']:.4f})")
        return PRUNED

    return report
