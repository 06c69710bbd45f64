"""Validated configuration: one pydantic model per concern.

Every stage of the pipeline builds these from `params.yaml` and every library
entry point accepts them, so a bad value fails early with a message that
names the field, instead of deep inside a matmul.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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


# GPT-2's real dimensions (124M .. xl) and two sizes that train on a laptop CPU.
PRESETS: dict[str, dict] = {
    "gpt2-tiny": dict(context_length=128, emb_dim=128, n_heads=4, n_layers=4),
    "gpt2-small": dict(context_length=256, emb_dim=384, n_heads=6, n_layers=6),
    "gpt2-124M": dict(context_length=1024, emb_dim=768, n_heads=12, n_layers=12, qkv_bias=True),
    "gpt2-medium": dict(context_length=1024, emb_dim=1024, n_heads=16, n_layers=24, qkv_bias=True),
    "gpt2-large": dict(context_length=1024, emb_dim=1280, n_heads=20, n_layers=36, qkv_bias=True),
    "gpt2-xl": dict(context_length=1024, emb_dim=1600, n_heads=25, n_layers=48, qkv_bias=True),
}


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
    """One line per mistake: `section.field: message`."""
    prefix = f"{section}." if section else ""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix.rstrip('.')}: {msg}")
    return "; ".join(lines)
