"""Every config group composes and validates; params.yaml is the composition of conf/."""

import shlex
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from minigpt.config import PRESETS, PipelineConfig, format_validation_error
from pipeline.compose import compose_params

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def group_options(group: str) -> list[str]:
    """A group's options: conf/<group>/, and for `model` the library's presets (the same files)."""
    return sorted(PRESETS) if group == "model" else sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose(*overrides: str) -> dict:
    return yaml.safe_load(compose_params(list(overrides), CONF))


def test_params_yaml_is_the_composition_of_conf():
    committed = (ROOT / "params.yaml").read_text()
    assert yaml.safe_load(committed) == compose(), "params.yaml drifted from conf/: run `make params`"
    assert committed == compose_params([], CONF)


@pytest.mark.parametrize("group", ["model", "data", "train", "finetune"])
def test_every_group_option_composes_and_validates(group):
    options = group_options(group)
    assert options
    for option in options:
        params = compose(f"{group}={option}", *(["data.max_length=128"] if group == "model" else []))
        PipelineConfig.model_validate(params)


def test_finetune_options_switch_the_task():
    assert compose()["finetune"]["task"] == "classification"  # the default: SMS spam
    instruct = PipelineConfig.model_validate(compose("finetune=instruct-alpaca")).finetune
    assert instruct.task == "instruction" and instruct.train.loss_chunk_size == 1024
    assert instruct.data.source.sha256.startswith("7e09a9af")


def test_model_sizes_are_written_once():
    """The `model` group is found in the library's presets, not in a copy under conf/."""
    assert not (CONF / "model").exists()
    assert compose("model=gpt2-small")["model"]["emb_dim"] == PRESETS["gpt2-small"]["emb_dim"] == 384


def test_default_composition_is_the_quick_cpu_run():
    params = compose()
    assert params["model"]["emb_dim"] == 128 and params["data"]["source"] == {"kind": "shakespeare"}
    assert params["train"]["max_steps"] > 0 and params["data"]["max_length"] <= params["model"]["context_length"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("model.n_heads=5", "model.n_heads: emb_dim (128) must be divisible by n_heads (5)"),
        ("train.device=banana", "train.device: expected auto, cpu, cuda, cuda:N or mps, got 'banana'"),
        ("data.max_length=4096", "data.max_length: max_length (4096) must be <= model.context_length (128)"),
        ("train.precision=fp8", "train.precision: Input should be 'fp32' or 'bf16'"),
        ("train.strategy=fsdp", "train.strategy: fsdp shards every matrix across processes and muon"),  # default: muon
        ("sample.top_p=1.5", "sample.top_p: Input should be less than or equal to 1"),
        ("finetune.max_length=4096", "finetune.max_length: max_length (4096) must be <= model.context_length (128)"),
        ("finetune.trainable=some", "finetune.trainable: Input should be 'head', 'last_block' or 'all'"),
        ("finetune.data.classes=null", "finetune.data.classes: classification needs the class names"),
        ("finetune.data.fractions=[0.5,0.5,0.5]", "finetune.data.fractions: train, val and test must be > 0 and sum to 1"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ValidationError) as err:
        PipelineConfig.model_validate(compose(override))
    assert message in format_validation_error(err.value)


@pytest.mark.parametrize("sweep", ["recipe.txt", "finetune.txt"])
def test_every_sweep_candidate_composes_and_validates(sweep):
    """`make sweep-recipe` / `make sweep-finetune` queue one experiment per line of -S overrides
    (the finetune sweep once per seed): each must compose, and no two lines be the same."""
    lines = [line.strip() for line in (CONF / "sweeps" / sweep).read_text().splitlines()]
    candidates = [shlex.split(line) for line in lines if line and not line.startswith("#")]
    assert len(candidates) >= 4 and len({tuple(c) for c in candidates}) == len(candidates)
    for args in candidates:
        assert args[::2] == ["-S"] * (len(args) // 2), f"conf/sweeps/{sweep}: expected -S key=value pairs: {args}"
        PipelineConfig.model_validate(compose(*args[1::2], "finetune.train.seed=124"))


def test_bench_measures_the_model_make_run_trains():
    """`make bench`'s train.run_model_* keys speak for the default recipe only if they time it."""
    from benchmarks import bench

    params = compose()
    train = params["train"]
    assert (bench.RUN_CONTEXT, bench.RUN_BATCH, bench.CHUNK, bench.RUN_OPTIMIZER) == (
        params["data"]["max_length"], train["micro_batch_size"], train["loss_chunk_size"], train["optimizer"])
    assert params["model"] == PRESETS[bench.RUN_PRESET]
