"""Serving the trained model: the `generator` pyfunc that the pretrain stage logs, loaded in
process and behind a real `mlflow models serve`, and the `minigpt` console script reading
`runs:/` and `models:/` URIs; all on a clone that ran `dvc repro pretrain` with the smoke params.
Every way gives the same text for the same prompt and settings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from minigpt.serving import GENERATION_DEFAULTS, load_language_model, stream_text
from pipeline_helpers import clone_checkout, compose_smoke, env_for, free_port, run, wait_until_up

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PROMPTS = ["ROMEO:", "Was ever"]
SETTINGS = {**GENERATION_DEFAULTS, "max_new_tokens": 6, "temperature": 0.9, "seed": 5}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, str]:
    """A clone whose pretrain stage ran, and its MLflow run id."""
    repo = clone_checkout(tmp_path_factory.mktemp("clone"))
    compose_smoke(repo)
    run(repo, "dvc", "repro", "pretrain")
    return repo, json.loads((repo / "reports/mlflow_run.json").read_text())["run_id"]


@pytest.fixture(scope="module")
def expected(project) -> list[str]:
    """The texts of PROMPTS from the library, reading the best checkpoint file directly."""
    repo, _ = project
    model, _ = load_language_model(repo / "checkpoints/best.safetensors")
    return [prompt + "".join(stream_text(model, prompt, **SETTINGS)) for prompt in PROMPTS]


def store(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


def test_the_logged_generator_predicts_the_library_s_text(project, expected):
    import mlflow
    import pandas as pd

    repo, run_id = project
    mlflow.set_tracking_uri(store(repo))
    generator = mlflow.pyfunc.load_model(f"runs:/{run_id}/generator")
    assert generator.predict(pd.DataFrame({"prompt": PROMPTS}), params=SETTINGS) == expected
    # Defaults fill in what a request leaves out: greedy, 64 tokens at most.
    (greedy,) = generator.predict(pd.DataFrame({"prompt": ["ROMEO:"]}), params={"max_new_tokens": 5})
    assert greedy.startswith("ROMEO:") and len(greedy) > len("ROMEO:")
    schema = generator.metadata.get_params_schema().to_dict()
    assert {p["name"]: p["default"] for p in schema} == GENERATION_DEFAULTS


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_with_the_same_text(project, expected, tmp_path):
    repo, run_id = project
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"runs:/{run_id}/generator", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env_for(repo, MLFLOW_TRACKING_URI=store(repo)), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group of its own: the workers it starts are stopped with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        waited = wait_until_up(f"{url}/ping", server, log=tmp_path / "serve.log", timeout=90)
        print(f"mlflow models serve answered /ping after {waited:.1f} s")
        split = {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]}, "params": SETTINGS}
        assert post(f"{url}/invocations", split) == (200, {"predictions": expected})
        records = {"dataframe_records": [{"prompt": PROMPTS[0]}], "params": SETTINGS}
        assert post(f"{url}/invocations", records) == (200, {"predictions": expected[:1]})
        status, answer = post(f"{url}/invocations", {**split, "params": {"temperature": -1.0}})
        assert status == 400 and "temperature must be >= 0, got -1.0" in answer["message"]
        status, answer = post(f"{url}/invocations", {"dataframe_records": [{"text": "Hi"}]})
        assert status == 400 and "prompt" in json.dumps(answer)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def minigpt(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """The console script in the clone's root, where ./mlflow.db is the store it reads."""
    return subprocess.run([str(BIN / "minigpt"), *args], cwd=repo, env=env_for(repo), capture_output=True, text=True,
                          timeout=300)


def test_the_cli_reads_runs_and_models_uris(project, expected):
    import mlflow

    repo, run_id = project
    mlflow.set_tracking_uri(store(repo))
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    for uri in (f"runs:/{run_id}/checkpoint", f"runs:/{run_id}/generator",
                f"runs:/{run_id}/checkpoint/best.safetensors"):
        proc = minigpt(repo, "generate", "--model", uri, PROMPTS[0], *settings)
        assert (proc.returncode, proc.stdout) == (0, expected[0] + "\n"), proc.stderr
    version = mlflow.register_model(f"runs:/{run_id}/model", "minigpt-serving-test").version
    proc = minigpt(repo, "generate", "--model", f"models:/minigpt-serving-test/{version}", PROMPTS[1], *settings)
    assert (proc.returncode, proc.stdout) == (0, expected[1] + "\n"), proc.stderr
    info = minigpt(repo, "info", f"runs:/{run_id}/checkpoint").stdout
    assert re.search(rf"^mlflow run: +{run_id}$", info, re.M) and re.search(r"^step: +6$", info, re.M)


@pytest.mark.parametrize("uri, message", [
    ("runs:/{run}/model", "holds no minigpt checkpoint (.safetensors)"),
    ("runs:/0123456789abcdef0123456789abcdef/checkpoint", "0123456789abcdef0123456789abcdef"),
    ("runs:/{run}/no-such-artifact", "no-such-artifact"),
    ("models:/no-such-model/1", "no-such-model"),
])
def test_the_cli_says_what_is_wrong_with_a_uri(project, uri, message):
    repo, run_id = project
    proc = minigpt(repo, "generate", "--model", uri.format(run=run_id), "Hi")
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("minigpt: error: ") and message in line
