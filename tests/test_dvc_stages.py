"""dvc.yaml against the code: each stage runs its script, depends on every module that
script imports (else DVC would not re-run it when that code changes), and writes where
`pipeline.paths` says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import paths

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
ORDER = ["prepare", "split", "tokenize", "pretrain", "evaluate", "sample",
         "finetune_prepare", "finetune", "finetune_evaluate"]

IMPORTED_FILES = """
import json
import pipeline.{stage}
from pipeline.common import project_modules
print(json.dumps(sorted(str(path) for path in project_modules().values())))
"""


def entries(items: list) -> set[str]:
    """Paths of a deps/outs/metrics list, whose items are strings or one-key mappings."""
    return {next(iter(item)) if isinstance(item, dict) else item for item in items}


def imported_sources(stage: str) -> set[str]:
    """Repository paths of the minigpt and pipeline modules that `pipeline.<stage>` imports,
    in a fresh interpreter (this one has imported everything the other tests use)."""
    out = subprocess.run([sys.executable, "-c", IMPORTED_FILES.format(stage=stage)], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    files = {Path(f).resolve().relative_to(ROOT).as_posix() for f in json.loads(out)}
    return {f for f in files if not f.endswith("__init__.py")}  # no code of their own


def test_the_stages_in_order():
    assert list(STAGES) == ORDER


@pytest.mark.parametrize("stage", ORDER)
def test_stage_runs_its_script(stage):
    assert STAGES[stage]["cmd"] == f"python -m pipeline.{stage}"


@pytest.mark.parametrize("stage", ORDER)
def test_stage_depends_on_exactly_the_code_it_imports(stage):
    """A missing dep: DVC would not re-run the stage when that code changes. An extra one:
    it would re-run (a training stage, from scratch) for code it never runs."""
    code_deps = {d for d in entries(STAGES[stage]["deps"]) if d.startswith(("src/", "pipeline/"))}
    missing, extra = imported_sources(stage) - code_deps, code_deps - imported_sources(stage)
    assert not missing, f"dvc.yaml: stage {stage} imports {sorted(missing)} but does not list them as deps"
    assert not extra, f"dvc.yaml: stage {stage} lists {sorted(extra)} as deps but does not import them"


def test_stages_write_where_pipeline_paths_says():
    written = set()
    for stage in STAGES.values():
        written |= entries(stage.get("outs", [])) | entries(stage.get("metrics", []))
    expected = {paths.DOCUMENTS, paths.SPLIT_DIR, paths.TOKENS_DIR, paths.CHECKPOINTS, paths.TRAIN_METRICS,
                paths.TRAIN_CURVE, paths.TRAIN_CURVE_PNG, paths.MLFLOW_RUN, paths.EVAL_METRICS,
                paths.SAMPLES_MD, paths.SAMPLES_JSON, paths.FINETUNE_DATA, paths.FINETUNE_CHECKPOINTS,
                paths.FINETUNE_METRICS, paths.FINETUNE_CURVE, paths.FINETUNE_CURVE_PNG, paths.FINETUNE_RUN,
                paths.FINETUNE_EVAL, paths.FINETUNE_EVAL_PNG, paths.FINETUNE_PREDICTIONS}
    assert written == {p.as_posix() for p in expected}
