"""The notebooks (notebooks/NN_*.ipynb): stored without outputs, and run top to bottom with
nbclient in a temporary clone, twice: bare (no data, checkpoint or runs: each must fall back
and say so) and after the smoke pipeline (real shards, checkpoint and two MLflow runs).

The kernel is this interpreter (notebooks/run_notebooks.py), so no registered Jupyter kernel
is needed; it gets the clone's library through PYTHONPATH, as the pipeline tests' stages do.
"""

from __future__ import annotations

import importlib.util
import sys

import nbformat
import pytest

from pipeline_helpers import ROOT, SMOKE, clone_checkout, copy_repo, env_for, run

NAMES = ["01_data_exploration.ipynb", "02_attention_mechanism_test.ipynb", "03_compare_runs.ipynb"]


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "notebooks" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _runner()


def test_notebooks_are_stored_without_outputs():
    assert [path.name for path in runner.NOTEBOOKS] == NAMES
    for path in runner.NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        found = runner.problems(nb)
        assert not found, f"{path.name}: {'; '.join(found)}: run `make notebooks-clear` before committing"


def test_clear_strips_what_a_run_adds():
    nb = nbformat.read(runner.NOTEBOOKS[0], as_version=4)
    stored = nbformat.writes(nb)
    code = next(cell for cell in nb.cells if cell.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    code.execution_count = 3
    code.metadata["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.2"}
    assert len(runner.problems(nb)) == 2
    assert runner.clear(nb) and nbformat.writes(nb) == stored and not runner.problems(nb)


def _text(nb: nbformat.NotebookNode) -> str:
    """Everything the cells printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for cell in nb.cells for output in cell.get("outputs", []))


def _execute_all(repo) -> dict[str, tuple[str, int]]:
    """Run the clone's notebooks (not written back); per notebook its text and image count."""
    results = {}
    for name in NAMES:
        nb = runner.execute(repo / "notebooks" / name, env=env_for(repo), timeout=300, write=False)
        assert all(output.output_type != "error" for cell in nb.cells for output in cell.get("outputs", []))
        results[name] = (_text(nb), _images(nb))
    return results


@pytest.mark.slow
def test_notebooks_fall_back_on_a_fresh_clone(tmp_path):
    repo = clone_checkout(tmp_path)
    results = _execute_all(repo)

    text, images = results["01_data_exploration.ipynb"]
    assert "note: no prepared data" in text and "3 documents" in text
    assert "a batch: inputs (3, 32), targets (3, 32)" in text and images == 2

    text, images = results["02_attention_mechanism_test.ipynb"]
    assert "note: no trained checkpoint" in text and "note: no tokenized data" in text
    assert "all 16 shapes as the design notes say" in text and "causal: changing token 8" in text
    assert images == 3

    text, images = results["03_compare_runs.ipynb"]
    assert "note: no MLflow store yet" in text and images == 0
    # Looking wrote nothing into the clone: no store, no data.
    assert not (repo / "mlflow.db").exists() and not (repo / "data").exists()


@pytest.mark.slow
def test_notebooks_on_the_pipeline_outputs(tokenized_template, tmp_path):
    repo = copy_repo(tokenized_template, tmp_path / "repo")
    run(repo, "dvc", "repro", "evaluate")  # data, checkpoint, a pretrain run with its scores
    # A second run with another learning rate: something for 03 to compare.
    run(repo, sys.executable, "-m", "pipeline.compose", *SMOKE, "train.lr=0.001")
    run(repo, "dvc", "repro", "evaluate")
    results = _execute_all(repo)

    text, images = results["01_data_exploration.ipynb"]
    assert "note:" not in text and "data: data/raw/documents.parquet" in text
    assert "3 documents" in text and "a batch: inputs (4, 32), targets (4, 32)" in text and images == 2

    text, images = results["02_attention_mechanism_test.ipynb"]
    assert "note:" not in text and "model: checkpoints/best.safetensors, 6 steps" in text
    assert "batch from data/tokens/val: (2, 32)" in text and "all 16 shapes as the design notes say" in text
    assert "causal: changing token 16" in text and images == 3

    text, images = results["03_compare_runs.ipynb"]
    assert "note:" not in text and "2 pretrain runs of experiment 'minigpt'" in text
    assert "params that differ: train.lr" in text and "val_bits_per_byte" in text and "NaN" not in text
    assert images == 1
