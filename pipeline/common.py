"""What every stage shares: reading and validating params.yaml, and failing cleanly."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from minigpt.config import PipelineConfig, format_validation_error
from pipeline import paths

if TYPE_CHECKING:  # the data stages (prepare, split, tokenize) must not import torch
    import torch


class StageError(Exception):
    """A failure the user can fix; printed as one line, without a traceback."""


def project_modules() -> dict[str, Path]:
    """The minigpt and pipeline modules this process has imported: name -> source file."""
    return {name: Path(module.__file__) for name, module in list(sys.modules.items())
            if name.split(".")[0] in ("minigpt", "pipeline") and getattr(module, "__file__", None)}


def read_params(path: Path = paths.PARAMS) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"{path}: not found; run `make params` (or `dvc exp run`) to compose it from conf/")
    params = yaml.safe_load(path.read_text())
    if not isinstance(params, dict):
        raise StageError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params


def load_config(*sections: str, path: Path = paths.PARAMS) -> PipelineConfig:
    """Validate just the sections a stage reads, e.g. `cfg = load_config("model", "train")`,
    then `cfg.train.lr`; the sections it did not ask for are None."""
    params = read_params(path)
    missing = [name for name in sections if name not in params]
    if missing:
        raise StageError(f"{path}: section `{missing[0]}` is missing")
    try:
        return PipelineConfig.model_validate({name: params[name] for name in sections})
    except ValidationError as err:
        raise StageError(f"{path}: {format_validation_error(err)}") from None


def stage_device(name: str) -> torch.device:
    """The device `train.device` names, or a StageError if this machine lacks it."""
    from minigpt.utils import pick_device

    try:
        return pick_device(name)
    except ValueError as err:
        raise StageError(f"{paths.PARAMS}: train.device: {err}") from None


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise StageError(f"{path}: not found; run the stage that writes it first (`dvc repro`)")
    return json.loads(path.read_text())


def stage_name(fn: Callable) -> str:
    """`pretrain` for pipeline.pretrain, also when it runs as `python -m pipeline.pretrain`
    (then the function's module is `__main__`, and the real name is on its spec)."""
    module = fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return module.rsplit(".", 1)[-1]


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised while handling, innermost last."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__context__
    return chain


def stage_main(fn: Callable[[], None]) -> Callable[[], None]:
    """Run a stage; a known error becomes `stage: error: ...` and exit status 1."""

    @functools.wraps(fn)
    def wrapper() -> None:
        from minigpt.checkpoint import CheckpointError
        from minigpt.io import DataError
        from minigpt.train import TrainingDiverged

        stage = stage_name(fn)
        try:
            fn()
        except (StageError, DataError, CheckpointError, TrainingDiverged) as err:
            print(f"{stage}: error: {err}", file=sys.stderr)
            sys.exit(1)
        except OSError as err:  # a file it cannot write or read: full disk, read-only folder, ...
            # A failed rename names the temporary source first; the user knows the destination.
            name = err.filename2 or err.filename
            where = f"{name}: " if name else ""
            print(f"{stage}: error: {where}{err.strerror or err}", file=sys.stderr)
            sys.exit(1)
        except Exception as err:
            if not type(err).__module__.startswith("mlflow"):
                raise
            # A tracking call failed past MLflow's own retries (a server down for minutes). When the
            # run could not be closed after another error, that error is the one to tell.
            cause = next((e for e in _chain(err) if isinstance(e, StageError)), None)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            print(f"{stage}: error: {cause or f'tracking: {first}'}", file=sys.stderr)
            sys.exit(1)

    return wrapper
