"""Bad finetune input through the real entry points (`python -m pipeline.finetune_prepare`,
`pipeline.finetune`, `dvc repro`), as tests/test_faults.py does for pretraining: each case
exits with status 1 and exactly one `<stage>: error: ...` line naming the key, label or
file, no traceback, and leaves no MLflow run marked FINISHED for the failed attempt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from minigpt.config import ModelConfig
from minigpt.model import GPTModel
from pipeline_helpers import clone_checkout, compose_smoke, run
from test_faults import one_error_line, stage, statuses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A clone with the smoke params (the finetune stages read nothing upstream to fail these)."""
    repo = clone_checkout(tmp_path_factory.mktemp("template"))
    compose_smoke(repo)
    return repo


@pytest.fixture
def project(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "project", symlinks=True))


def write_csv(path: Path, labels: list[str]) -> None:
    """One row per label, each with its own two-token text (`message 10`, `message 11`, ...)."""
    path.write_text("text,label\n" + "".join(f"message {10 + i},{label}\n" for i, label in enumerate(labels)))


def local_csv(name: str, classes: list[str]) -> tuple[str, ...]:
    return ("finetune=classify-local", f"finetune.data.source.path={name}", f"finetune.data.classes=[{','.join(classes)}]")


# --------------------------------------------------------------------------- finetune_prepare
@pytest.mark.parametrize("overrides, expected", [
    (["finetune.init=/nonexistent"],
     ["finetune_prepare: error: finetune.init: /nonexistent is not a directory of Hugging Face GPT-2 weights"]),
    (["finetune.data.classes=[ham,eggs]"],
     ["label 'spam' (column 'label') is not one of finetune.data.classes ['ham', 'eggs']"]),
    (["finetune.data.text_column=body"], ["no column 'body' (finetune.data.text_column)"]),
    (["finetune.max_length=4096"],
     ["finetune_prepare: error: params.yaml: finetune.max_length: max_length (4096) must be <= "
      "model.context_length (128)"]),
], ids=["init-missing", "unknown-label", "missing-text-column", "max-length-beyond-context"])
def test_bad_finetune_params_give_one_line(project, overrides, expected):
    compose_smoke(project, *overrides)
    line = one_error_line(stage(project, "finetune_prepare"), "finetune_prepare")
    assert all(part in line for part in expected), line
    assert not (project / "data/finetune/tokens").exists()
    assert statuses(project) == {}


def test_a_bad_max_length_also_stops_the_finetune_stage(project):
    compose_smoke(project, "finetune.max_length=4096")
    line = one_error_line(stage(project, "finetune"), "finetune")
    assert "finetune.max_length" in line and "4096" in line
    assert statuses(project) == {}


@pytest.mark.parametrize("overrides, expected", [
    (["finetune.method=lora"], "finetune: error: params.yaml: finetune.trainable: all contradicts method=lora, "
                               "which freezes the backbone (only the adapters and the task's head train): "
                               "set finetune.trainable=head"),
    (["finetune.method=lora", "finetune.trainable=head", "finetune.lora.rank=512"],
     "finetune: error: params.yaml: finetune.lora.rank: 512 is larger than the layers it adapts (model.emb_dim 128)"),
    (["finetune.method=lora", "finetune.trainable=head", "finetune.lora.alpha=0"],
     "finetune: error: params.yaml: finetune.lora.alpha: Input should be greater than 0"),
    (["finetune.method=lora", "finetune.trainable=head", "finetune.lora.targets=[qkv,lm_head]"],
     "finetune: error: params.yaml: finetune.lora.targets.1: Input should be 'qkv', 'attn_out', 'ff_in' or 'ff_out'"),
], ids=["lora-with-trainable-all", "rank-beyond-the-layers", "alpha-zero", "unknown-target"])
def test_bad_lora_params_stop_the_finetune_stage_in_one_line(project, overrides, expected):
    compose_smoke(project, *overrides)
    line = one_error_line(stage(project, "finetune"), "finetune")
    assert line.startswith(expected), line
    assert not (project / "checkpoints-finetune").exists()
    assert statuses(project) == {}


def test_a_class_with_too_few_examples_to_split(project):
    write_csv(project / "few.csv", ["positive"] * 10 + ["negative"] * 2)
    compose_smoke(project, *local_csv("few.csv", ["negative", "positive"]))
    line = one_error_line(stage(project, "finetune_prepare"), "finetune_prepare")
    assert "class 'negative'" in line and "2 examples" in line and "finetune.data.fractions" in line, line
    assert statuses(project) == {}


# --------------------------------------------------------------------------- finetune
def test_init_weights_of_another_vocabulary_are_refused(project):
    """HF GPT-2 weights whose vocabulary is not the GPT-2 tokenizer's: the data stage reads only
    their context length; the finetune stage says what is wrong before opening a run."""
    folder = project / "hf-vocab-1000"
    folder.mkdir()
    model = GPTModel(ModelConfig(vocab_size=1000, context_length=64, emb_dim=32, n_heads=2, n_layers=1))
    save_file(model.to_hf_gpt2_state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 1000, "n_positions": 64, "n_ctx": 64, "n_embd": 32, "n_head": 2,
         "n_layer": 1}))
    compose_smoke(project, "finetune.init=hf-vocab-1000")
    prepared = stage(project, "finetune_prepare")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert json.loads((project / "data/finetune/tokens/manifest.json").read_text())["max_length"] <= 64
    line = one_error_line(stage(project, "finetune"), "finetune")
    assert line == ("finetune: error: finetune.init: hf-vocab-1000: vocab_size 1000, but the GPT-2 tokenizer "
                    "has 50257 tokens")
    assert "FINISHED" not in statuses(project).values()
    assert not (project / "checkpoints-finetune/last.safetensors").exists()


def test_resuming_a_checkpoint_of_other_classes_or_other_data_is_refused(project):
    """A 2-class finetune (10 a, 20 b), then `train.resume` naming its checkpoint (one training
    serves every case):
    - 3 classes (10 each): its head has 2 rows, the new model's 3. Said before anything else;
    - method=lora: adapters cannot continue a whole model's weights;
    - the same 2 classes on other rows (20 a, 10 b; both split 21/3/6 into two-token texts):
      refused by the data's sha256."""
    write_csv(project / "two.csv", ["a"] * 10 + ["b"] * 20)
    write_csv(project / "three.csv", ["a"] * 10 + ["b"] * 10 + ["c"] * 10)
    write_csv(project / "other.csv", ["a"] * 20 + ["b"] * 10)
    compose_smoke(project, *local_csv("two.csv", ["a", "b"]))
    run(project, "dvc", "repro", "finetune")
    before = statuses(project)
    assert sorted(before.values()) == ["FINISHED", "FINISHED"]  # pretrain and the 2-class finetune
    last = (project / "checkpoints-finetune/last.safetensors").read_bytes()
    resume = "finetune.train.resume=checkpoints-finetune/last.safetensors"

    compose_smoke(project, *local_csv("three.csv", ["a", "b", "c"]), resume)
    prepared = stage(project, "finetune_prepare")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    line = one_error_line(stage(project, "finetune"), "finetune")
    assert line == ("finetune: error: params.yaml: finetune.data.classes: checkpoints-finetune/last.safetensors "
                    "was trained with 2 classes ['a', 'b'], this config has 3 ['a', 'b', 'c']"), line

    compose_smoke(project, *local_csv("two.csv", ["a", "b"]), "finetune.method=lora", "finetune.trainable=head", resume)
    line = one_error_line(stage(project, "finetune"), "finetune")
    assert line == ("finetune: error: params.yaml: finetune.method: checkpoints-finetune/last.safetensors holds the "
                    "whole model's weights (method=full), this config has method=lora"), line

    compose_smoke(project, *local_csv("other.csv", ["a", "b"]), "finetune.train.max_steps=6", resume)
    prepared = stage(project, "finetune_prepare")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    line = one_error_line(stage(project, "finetune"), "finetune")
    assert "data_sha256" in line, line

    after = statuses(project)
    assert {run_id: after[run_id] for run_id in before} == before  # the earlier runs stay FINISHED
    assert "FINISHED" not in [s for run_id, s in after.items() if run_id not in before]
    assert (project / "checkpoints-finetune/last.safetensors").read_bytes() == last  # never replaced
