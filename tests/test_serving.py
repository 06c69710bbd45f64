"""Serving the trained model: the `generator` pyfunc that the pretrain stage logs, loaded in
process and behind a real `mlflow models serve`, and the `minigpt` console script reading
`runs:/` and `models:/` URIs; all on a clone that ran `dvc repro pretrain` with the smoke params.
Every way gives the same text for the same prompt and settings."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from minigpt.serving import GENERATION_DEFAULTS, load_language_model, stream_text
from pipeline_helpers import copy_repo, env_for, free_port, run, wait_until_up

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PROMPTS = ["ROMEO:", "Was ever"]
SETTINGS = {**GENERATION_DEFAULTS, "max_new_tokens": 6, "temperature": 0.9, "seed": 5}


@pytest.fixture(scope="module")
def project(tokenized_template, tmp_path_factory) -> tuple[Path, str]:
    """A clone whose pretrain stage ran, and its MLflow run id."""
    repo = copy_repo(tokenized_template, tmp_path_factory.mktemp("clone") / "repo")
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


@contextlib.contextmanager
def served(repo: Path, model_uri: str, tmp_path: Path) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` on a free port, in a process group of its own that
    is stopped afterwards (the workers it starts with it); yields its base URL."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env_for(repo, MLFLOW_TRACKING_URI=store(repo)), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        waited = wait_until_up(f"{url}/ping", server, log=tmp_path / "serve.log", timeout=90)
        print(f"mlflow models serve {model_uri} answered /ping after {waited:.1f} s")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_mlflow_models_serve_answers_with_the_same_text(project, expected, tmp_path):
    repo, run_id = project
    with served(repo, f"runs:/{run_id}/generator", tmp_path) as url:
        split = {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]}, "params": SETTINGS}
        assert post(f"{url}/invocations", split) == (200, {"predictions": expected})
        records = {"dataframe_records": [{"prompt": PROMPTS[0]}], "params": SETTINGS}
        assert post(f"{url}/invocations", records) == (200, {"predictions": expected[:1]})
        status, answer = post(f"{url}/invocations", {**split, "params": {"temperature": -1.0}})
        assert status == 400 and "temperature must be >= 0, got -1.0" in answer["message"]
        status, answer = post(f"{url}/invocations", {"dataframe_records": [{"text": "Hi"}]})
        assert status == 400 and "prompt" in json.dumps(answer)


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


def promote(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.promote", *args], cwd=repo, env=env_for(repo),
                          capture_output=True, text=True, timeout=300)


def test_promote_moves_champion_to_the_best_run_and_previous_to_the_old_champion(project, tmp_path):
    """Two FINISHED runs in the store: `make promote` registers the best as @champion, the old
    champion becomes @previous, and the CLI and `mlflow models serve` follow the aliases."""
    import mlflow

    repo, first = project
    proc = promote(repo, "--metric", "val_loss")
    assert proc.returncode == 0, proc.stderr
    assert f"minigpt@champion -> version 1 (run {first[:8]} " in proc.stdout
    proc = promote(repo, "--metric", "val_loss")
    assert "nothing changed" in proc.stdout and "version 1" in proc.stdout

    # A second run, in a temporary copy so that this clone's checkpoints stay the first run's.
    run(repo, "dvc", "exp", "run", "--temp", "-S", "train=smoke", "-S", "data=shakespeare-mini", "-S", "train.seed=7",
        "pretrain")
    client = mlflow.MlflowClient(store(repo))
    runs = client.search_runs([client.get_run(first).info.experiment_id], "tags.stage = 'pretrain'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    best, other = sorted(runs, key=lambda r: r.data.metrics["val_loss"])
    proc = promote(repo, "--metric", "val_loss")
    assert proc.returncode == 0, proc.stderr
    if best.info.run_id == first:
        assert "nothing changed" in proc.stdout
    else:
        assert proc.stdout.splitlines()[-2:] == [
            f"minigpt@champion -> version 2 (run {best.info.run_id[:8]} {best.data.tags['mlflow.runName']!r}, "
            f"val_loss {best.data.metrics['val_loss']:.4f})",
            f"minigpt@previous -> version 1 (run {first[:8]} {client.get_run(first).data.tags['mlflow.runName']!r}, "
            f"val_loss {client.get_run(first).data.metrics['val_loss']:.4f})"]
    # Any run on demand: the other one becomes champion, the best one previous.
    proc = promote(repo, "--run", other.info.run_id, "--metric", "val_loss")
    assert proc.returncode == 0, proc.stderr
    assert client.get_model_version_by_alias("minigpt", "champion").run_id == other.info.run_id
    assert client.get_model_version_by_alias("minigpt", "previous").run_id == best.info.run_id

    settings = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    texts = {}
    for name, uri in [("champion", "models:/minigpt@champion"), ("other", f"runs:/{other.info.run_id}/checkpoint")]:
        proc = minigpt(repo, "generate", "--model", uri, PROMPTS[0], *settings)
        assert proc.returncode == 0, proc.stderr
        texts[name] = proc.stdout
    assert texts["champion"] == texts["other"]
    with served(repo, "models:/minigpt@champion", tmp_path) as url:
        body = {"dataframe_split": {"columns": ["prompt"], "data": [[PROMPTS[0]]]}, "params": SETTINGS}
        assert post(f"{url}/invocations", body) == (200, {"predictions": [texts["champion"].removesuffix("\n")]})

    for args, message in [(("--run", "0" * 32), "no such run"),
                          (("--stage", "finetune"), "no FINISHED finetune run")]:
        proc = promote(repo, *args)
        assert proc.returncode == 1 and proc.stderr.startswith(f"promote: error: ") and message in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1
