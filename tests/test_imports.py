"""The library stands alone: importing all of minigpt pulls in none of the pipeline's tools.

mlflow, dvc, Hydra, matplotlib and psutil are the `pipeline` extra (pyproject.toml), used by
pipeline/ and benchmarks/ only; a `pip install minigpt` without it must still import.
"""

import json
import subprocess
import sys

PIPELINE_ONLY = ("mlflow", "dvc", "hydra", "omegaconf", "matplotlib", "psutil")

# -I: a fresh interpreter that sees only the installed package, not the working directory.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import minigpt
names = ["minigpt"] + [m.name for m in pkgutil.walk_packages(minigpt.__path__, "minigpt.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_library_imports_none_of_the_pipeline_tools():
    proc = subprocess.run([sys.executable, "-I", "-c", _IMPORT_ALL], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"minigpt.model", "minigpt.train", "minigpt.data.shards"} <= set(report["modules"])
    assert not any(m.startswith(("minigpt.bench", "minigpt.tracking")) for m in report["modules"])
    assert sorted(set(PIPELINE_ONLY) & set(report["loaded"])) == []
