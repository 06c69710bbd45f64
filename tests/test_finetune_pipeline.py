"""The finetune stages end to end (issue 11): real DVC, real MLflow (SQLite), real processes.

One temporary clone of this checkout runs the whole pipeline with the smoke presets and one
epoch of the default task (SMS spam or ham, 786 training messages from the pinned PyPI
wheel); then param changes show which stages re-run, and an instruction finetune on a small
generated Alpaca file runs in the same clone. The tests run in file order on that clone.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from minigpt.io import sha256_file
from pipeline_helpers import STAGES, client, clone_checkout, compose_smoke, git, ran_stages, run, stage_runs

pytestmark = pytest.mark.slow

ONE_EPOCH = "finetune.epochs=1"


def store(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


def read_json(repo: Path, name: str):
    return json.loads((repo / name).read_text())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A clone that has run `dvc repro` once: smoke pretraining, one epoch of spam finetuning."""
    repo = clone_checkout(tmp_path_factory.mktemp("clone"))
    compose_smoke(repo, ONE_EPOCH)
    proc = run(repo, "dvc", "repro")
    assert ran_stages(proc.stdout) == STAGES
    return repo


def finetune_run(repo: Path):
    """The MLflow run that reports/finetune_mlflow_run.json names."""
    return client(store(repo)).get_run(read_json(repo, "reports/finetune_mlflow_run.json")["run_id"])


# --------------------------------------------------------------------------- classification
def test_classification_report_scores_the_whole_test_split(project):
    report = read_json(project, "reports/finetune_eval.json")
    manifest = read_json(project, "data/finetune/tokens/manifest.json")
    n_test = manifest["examples"]["test"]
    assert n_test == 224  # 112 ham + 112 spam after deduplication and balancing
    assert report["task"] == "classification" and report["class_names"] == ["ham", "spam"]
    matrix = report["confusion_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert sum(map(sum, matrix)) == n_test
    assert report["accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / n_test)
    assert 0 <= report["macro"]["f1"] <= 1
    assert [report["per_class"][c]["support"] for c in ("ham", "spam")] == [sum(row) for row in matrix]
    assert (project / "reports/finetune_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = jsonl(project / "reports/finetune_predictions.jsonl")
    assert len(lines) == n_test
    assert sum(line["label"] == line["predicted"] for line in lines) == matrix[0][0] + matrix[1][1]
    test_texts = {json.loads(line)["text"] for line in (project / "data/finetune/tokens/test.jsonl").open()}
    assert {line["text"] for line in lines} == test_texts
    train = read_json(project, "reports/finetune_train.json")
    assert train["steps"] == manifest["examples"]["train"] // 8  # one epoch of batches of 8
    assert train["stop_reason"] == "max_steps"


def test_the_finetune_is_its_own_mlflow_run_nested_under_pretrain(project):
    uri = store(project)
    (pretrain,) = stage_runs(uri, "pretrain")
    (finetune,) = stage_runs(uri, "finetune")
    assert finetune.info.run_id == finetune_run(project).info.run_id != pretrain.info.run_id
    assert finetune.info.status == "FINISHED" and pretrain.info.status == "FINISHED"
    tags = finetune.data.tags
    pretrain_id = read_json(project, "reports/mlflow_run.json")["run_id"]
    assert pretrain_id == pretrain.info.run_id
    assert tags["minigpt.pretrain_run"] == tags["mlflow.parentRunId"] == pretrain_id
    assert tags["init.sha256"] == sha256_file(project / "checkpoints/best.safetensors")
    assert tags["init.path"] == "checkpoints/best.safetensors"
    splits = b"".join(f"{s}.jsonl".encode() + b"\0" + (project / f"data/finetune/tokens/{s}.jsonl").read_bytes()
                      for s in ("train", "val", "test"))
    assert tags["data.sha256"] == hashlib.sha256(splits).hexdigest()  # the examples themselves
    assert len(tags["code.sha256"]) == 64
    assert tags["finetune.task"] == "classification" and tags["finetune.trainable"] == "all"
    assert tags["git.commit"] == git(project, "rev-parse", "HEAD").strip()
    params = finetune.data.params
    assert params["finetune.epochs"] == "1" and params["finetune.data.classes"] == "['ham', 'spam']"

    steps = read_json(project, "reports/finetune_train.json")["steps"]
    evaluated = [s for s in range(1, steps + 1) if s % 50 == 0 or s == steps]  # eval_interval 50
    history = {key: client(uri).get_metric_history(finetune.info.run_id, key) for key in ("val_accuracy", "val_loss")}
    assert [m.step for m in history["val_accuracy"]] == evaluated == [m.step for m in history["val_loss"]]
    assert all(0 <= m.value <= 1 for m in history["val_accuracy"])
    metrics = finetune.data.metrics
    report = read_json(project, "reports/finetune_eval.json")
    assert metrics["test_accuracy"] == pytest.approx(report["accuracy"])
    assert metrics["test_macro_f1"] == pytest.approx(report["macro"]["f1"])
    assert metrics["test_f1_spam"] == pytest.approx(report["per_class"]["spam"]["f1"])
    assert finetune.data.tags["test.examples"] == "224"
    assert "test_accuracy" not in pretrain.data.metrics  # nothing of the finetune went into pretrain's run
    artifacts = {a.path for d in (None, "checkpoint", "config")
                 for a in client(uri).list_artifacts(finetune.info.run_id, d)}
    assert {"finetune_eval.json", "finetune_eval.png", "finetune_predictions.jsonl",
            "finetune_curve.png", "checkpoint/best.safetensors", "config/params.yaml"} <= artifacts


def test_logged_model_loads_and_predicts_as_the_evaluation_did(project):
    import mlflow

    from minigpt.tasks.classification import SequenceClassifier
    from minigpt.tokenizer import get_tokenizer

    mlflow.set_tracking_uri(store(project))
    model = mlflow.pytorch.load_model(f"runs:/{finetune_run(project).info.run_id}/model").eval()
    assert isinstance(model, SequenceClassifier)
    enc = get_tokenizer("gpt2")
    lines = jsonl(project / "reports/finetune_predictions.jsonl")[:20]
    with torch.no_grad():
        for line in lines:
            ids = enc.encode_ordinary(line["text"])
            logits = model(torch.tensor([ids]), torch.tensor([len(ids)]))  # forward(idx, lengths)
            assert logits.shape == (1, 2)
            assert ["ham", "spam"][int(logits.argmax())] == line["predicted"], line["text"]


def test_param_changes_rerun_only_the_stages_that_read_them(project):
    uri = store(project)
    (pretrain,) = stage_runs(uri, "pretrain")
    first = finetune_run(project).info.run_id
    compose_smoke(project, ONE_EPOCH, "finetune.train.lr=1e-3")
    proc = run(project, "dvc", "repro")
    assert ran_stages(proc.stdout) == ["finetune", "finetune_evaluate"]
    assert "was trained with other params; starting afresh" in proc.stdout
    second = finetune_run(project)
    assert second.info.run_id != first and second.info.status == "FINISHED"
    assert second.data.params["finetune.train.lr"] == "0.001"

    compose_smoke(project, ONE_EPOCH, "finetune.train.lr=1e-3", "finetune.data.split_seed=7")
    proc = run(project, "dvc", "repro")
    assert ran_stages(proc.stdout) == ["finetune_prepare", "finetune", "finetune_evaluate"]
    assert read_json(project, "data/finetune/splits/manifest.json")["split_seed"] == 7
    finetunes = stage_runs(uri, "finetune")
    assert len(finetunes) == 3 and {r.info.status for r in finetunes} == {"FINISHED"}
    assert [(r.info.run_id, r.info.status) for r in stage_runs(uri, "pretrain")] == [(pretrain.info.run_id, "FINISHED")]
    assert {r.data.tags["mlflow.parentRunId"] for r in finetunes} == {pretrain.info.run_id}


# --------------------------------------------------------------------------- instruction
def alpaca_records() -> list[dict]:
    """60 generated Alpaca records: sums, with and without an input."""
    records = []
    for a in range(1, 7):
        for b in range(1, 6):
            records.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}."})
            records.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}",
                            "output": f"{a} plus {b} is {a + b}."})
    return records


def test_an_instruction_finetune_runs_end_to_end(project):
    """With LoRA adapters (method=lora): the run checkpoints the adapters alone, evaluation,
    the logged model and the CLI all see the base with the adapters folded in."""
    uri = store(project)
    records = alpaca_records()
    assert len(records) == 60
    (project / "datasets/instructions.json").write_text(json.dumps(records, indent=1))
    git(project, "add", "datasets/instructions.json")
    git(project, "commit", "-qm", "instruction data")
    before = {r.info.run_id for r in stage_runs(uri, "finetune")}
    compose_smoke(project, "finetune=instruct-local", ONE_EPOCH, "finetune.method=lora", "finetune.trainable=head")
    proc = run(project, "dvc", "repro")
    # A new file in datasets/ (a dep of both data stages) re-reads the corpus too; its output is
    # the same table, so nothing after `prepare` re-runs on the pretraining side.
    assert ran_stages(proc.stdout) == ["prepare", "finetune_prepare", "finetune", "finetune_evaluate"]

    manifest = read_json(project, "data/finetune/tokens/manifest.json")
    assert manifest["task"] == "instruction" and manifest["examples"] == {"train": 51, "val": 6, "test": 3}
    report = read_json(project, "reports/finetune_eval.json")
    assert report["task"] == "instruction" and report["examples"] == 3
    assert 0 < report["test_loss"] < 20 and 0 <= report["rouge_l"] <= 1 and 0 <= report["token_f1"] <= 1
    lines = jsonl(project / "reports/finetune_predictions.jsonl")
    assert len(lines) == 3
    outputs = {r["output"] for r in records}
    for line in lines:
        assert isinstance(line["response"], str) and line["reference"] in outputs
        assert 0 <= line["rouge_l"] <= 1 and 0 <= line["token_f1"] <= 1
    assert report["rouge_l"] == pytest.approx(sum(line["rouge_l"] for line in lines) / 3)
    assert (project / "reports/finetune_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (new,) = [r for r in stage_runs(uri, "finetune") if r.info.run_id not in before]
    assert new.info.run_id == finetune_run(project).info.run_id
    assert new.info.status == "FINISHED"
    assert new.data.tags["finetune.task"] == "instruction" and new.data.tags["finetune.trainable"] == "head"
    assert (new.data.params["finetune.method"], new.data.params["finetune.lora.rank"]) == ("lora", "8")
    assert new.data.tags["mlflow.parentRunId"] == read_json(project, "reports/mlflow_run.json")["run_id"]
    assert new.data.metrics["test_rouge_l"] == pytest.approx(report["rouge_l"])
    assert new.data.metrics["test_loss"] == pytest.approx(report["test_loss"])
    assert "val_accuracy" not in new.data.metrics
    steps = read_json(project, "reports/finetune_train.json")["steps"]
    assert steps == 51 // 8  # one epoch

    # The checkpoint (and the run's `checkpoint` artifact) holds the adapters: 4 blocks x 4 targets x (A, B).
    best = project / "checkpoints-finetune/best.safetensors"
    weights = [k for k in safe_open_keys(best) if k.startswith("model.")]
    assert len(weights) == 32 and all(k.endswith((".lora_a", ".lora_b")) for k in weights)
    assert best.stat().st_size < (project / "checkpoints/best.safetensors").stat().st_size / 10
    # The logged generator is the merged model: it writes what the CLI writes from the adapters + base.
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    prompt = "Below is an instruction that describes a task.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    generated = mlflow.pyfunc.load_model(f"runs:/{new.info.run_id}/generator").predict(
        pd.DataFrame({"prompt": [prompt]}), params={"max_new_tokens": 6})
    cli = subprocess.run([str(Path(sys.executable).parent / "minigpt"), "generate", "--model", str(best), prompt,
                          "--max-new-tokens", "6"], cwd=project, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert generated == [cli.stdout.removesuffix("\n")]


def safe_open_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_the_default_local_task_files_can_be_committed():
    from pipeline_helpers import ROOT

    for name in ("classify-local", "instruct-local"):
        path = yaml.safe_load((ROOT / "conf/finetune" / f"{name}.yaml").read_text())["data"]["source"]["path"]
        for file in (path, f"{path}.dvc"):
            ignored = subprocess.run(["git", "check-ignore", "-q", file], cwd=ROOT).returncode == 0
            assert not ignored, f"{file} (conf/finetune/{name}.yaml) is ignored by git"


def test_editing_the_local_data_file_reruns_finetune_prepare(project):
    records = alpaca_records()[:-2] + [{"instruction": "Add 9 and 9.", "input": "", "output": "18."}] * 2
    (project / "datasets/instructions.json").write_text(json.dumps(records, indent=1))
    git(project, "commit", "-qam", "instruction data edited")
    proc = run(project, "dvc", "repro", "finetune_prepare")
    assert ran_stages(proc.stdout) == ["finetune_prepare"]
