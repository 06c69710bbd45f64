"""What every stage shares: reading and validating params.yaml, and failing cleanly."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from minigpt.config import PipelineConfig, StrictModel, check_length_fits, format_validation_error
from pipeline import paths


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


def load_sections(*names: str, path: Path = paths.PARAMS) -> dict[str, StrictModel]:
    """Validate just the sections a stage reads, e.g. `load_sections("model", "train")`.

    A stage depends (in dvc.yaml) only on the keys it reads, so it must not fail on,
    or re-run for, a section that belongs to another stage.
    """
    params = read_params(path)
    fields = PipelineConfig.model_fields
    out: dict[str, StrictModel] = {}
    for name in names:
        if name not in params:
            raise StageError(f"{path}: section `{name}` is missing")
        try:
            out[name] = fields[name].annotation.model_validate(params[name])
        except ValidationError as err:
            raise StageError(f"{path}: {format_validation_error(err, name)}") from None
    if "model" in out and "data" in out:
        try:
            check_length_fits(out["data"].max_length, out["model"].context_length)
        except ValueError as err:
            raise StageError(f"{path}: {err}") from None
    return out


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise StageError(f"{path}: not found; run the stage that writes it first (`dvc repro`)")
    return json.loads(path.read_text())


def stage_main(fn: Callable[[], None]) -> Callable[[], None]:
    """Run a stage; a known error becomes `stage: error: ...` and exit status 1."""

    @functools.wraps(fn)
    def wrapper() -> None:
        from minigpt.checkpoint import CheckpointError
        from minigpt.corpus import DataError
        from minigpt.train import TrainingDiverged

        stage = fn.__module__.rsplit(".", 1)[-1]
        try:
            fn()
        except (StageError, DataError, CheckpointError, TrainingDiverged) as err:
            print(f"{stage}: error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper
