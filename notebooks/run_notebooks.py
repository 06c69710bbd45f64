"""Run the notebooks top to bottom, or clear their outputs (`make notebooks`, `make notebooks-clear`).

    python notebooks/run_notebooks.py            # execute every notebook in place: outputs land in the files
    python notebooks/run_notebooks.py --clear    # remove outputs, execution counts and run metadata
    python notebooks/run_notebooks.py --check    # exit 1 if a notebook is not stored clear (what a test checks)
    python notebooks/run_notebooks.py notebooks/02_attention_mechanism_test.ipynb   # just these

The notebooks are committed without outputs: run them, look, then `--clear` before committing.

The kernel is always this interpreter (`sys.executable`, the venv's python) running ipykernel,
whatever kernels Jupyter has registered, so a fresh clone or CI needs no `ipykernel install`.
Each kernel starts in the notebook's folder, as in Jupyter; the notebooks find the repository
root from there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

FOLDER = Path(__file__).resolve().parent
NOTEBOOKS = sorted(FOLDER.glob("[0-9][0-9]_*.ipynb"))
# Written by whoever ran a notebook last (timings, kernel version, widget state): never stored.
CELL_RUN_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")
NOTEBOOK_RUN_METADATA = ("language_info", "widgets")


class ThisPythonKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel is this interpreter's ipykernel, not a registered kernel spec."""

    @property
    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name=f"Python ({sys.executable})", language="python")


def execute(path: Path, *, env: dict[str, str] | None = None, timeout: int = 600,
            write: bool = True) -> nbformat.NotebookNode:
    """Run a notebook's cells in order in a fresh kernel; return it with its outputs.

    `write`: save it in place, outputs included (also when a cell fails: the error shows there).
    `env`: the kernel's environment (default: this process's). A failing cell raises
    `CellExecutionError`, whose message holds the cell's traceback.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, startup_timeout=120, record_timing=False,
                            kernel_manager_class=ThisPythonKernelManager,
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute(**({"env": env} if env is not None else {}))
    finally:
        if write:
            nbformat.write(nb, path)
    return nb


def clear(nb: nbformat.NotebookNode) -> bool:
    """Strip what running a notebook adds (outputs, execution counts, run metadata); True if it held any."""
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for key in CELL_RUN_METADATA:
            cell.metadata.pop(key, None)
    for key in NOTEBOOK_RUN_METADATA:
        nb.metadata.pop(key, None)
    return nbformat.writes(nb) != before


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """Why a notebook is not in its stored form (empty: it is)."""
    outputs = sum(bool(cell.get("outputs")) for cell in nb.cells)
    counts = sum(cell.get("execution_count") is not None for cell in nb.cells)
    found = [f"{outputs} cell(s) with outputs"] if outputs else []
    found += [f"{counts} execution count(s)"] if counts else []
    if not found and clear(nbformat.from_dict(nb)):
        found.append(f"run metadata ({', '.join(NOTEBOOK_RUN_METADATA + CELL_RUN_METADATA)})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python notebooks/run_notebooks.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/NN_*.ipynb)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--clear", action="store_true", help="remove outputs (before committing)")
    action.add_argument("--check", action="store_true", help="exit 1 if a notebook holds outputs")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a cell may run (default 600)")
    args = parser.parse_args(argv)
    paths = args.paths or NOTEBOOKS

    if args.check:
        dirty = {path: problems(nbformat.read(path, as_version=4)) for path in paths}
        for path, found in dirty.items():
            if found:
                print(f"{path}: {'; '.join(found)}: run `make notebooks-clear`", file=sys.stderr)
        return 1 if any(dirty.values()) else 0
    if args.clear:
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            if clear(nb):
                nbformat.write(nb, path)
                print(f"cleared {path}")
        return 0

    failed = False
    for path in paths:
        start = time.perf_counter()
        try:
            execute(path, timeout=args.timeout)
            print(f"{path}: ran in {time.perf_counter() - start:.1f} s")
        except CellExecutionError as err:
            failed = True
            print(f"{path}: a cell failed (the error is saved in the notebook):\n{err}", file=sys.stderr)
    print("The outputs are now in the notebooks (open them in Jupyter); "
          "`make notebooks-clear` before committing them.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
