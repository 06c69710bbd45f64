"""The GPT-2 model: embeddings -> transformer blocks -> final norm -> vocabulary head."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from minigpt.config import ModelConfig, preset_config
from minigpt.losses import linear_cross_entropy
from minigpt.modules import (
    KVCache,
    LayerNorm,
    TransformerBlock,
    gpt2_init_,
    residual_projections,
    scaled_residual_std,
)


class GPTModel(nn.Module):
    """Decoder-only transformer; `forward` maps token ids `(batch, seq)` to logits `(batch, seq, vocab)`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)  # vocab_size x emb_dim
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)  # context_length x emb_dim
        self.drop_emb = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.emb_dim, cfg.n_heads, cfg.dropout, cfg.qkv_bias)
            for _ in range(cfg.n_layers)
        )
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections N(0, 0.02/sqrt(2*n_layers))."""
        self.apply(gpt2_init_)
        for block in self.blocks:
            for layer in residual_projections(block):
                nn.init.normal_(layer.weight, mean=0.0, std=scaled_residual_std(self.cfg.n_layers))
        if self.cfg.tie_weights:
            # Tying after init: the head *is* the embedding matrix, one tensor, one gradient.
            self.out_head.weight = self.tok_emb.weight

    # ----------------------------------------------------------------- forward
    def hidden_states(self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final-normalised features `(batch, seq, emb_dim)` of token ids `(batch, seq)`."""
        batch, seq = idx.shape
        start = kv_caches[0].length if kv_caches else 0
        if start + seq > self.cfg.context_length:
            raise ValueError(
                f"input length {start + seq} exceeds the model's context_length "
                f"{self.cfg.context_length}; crop the input to its last {self.cfg.context_length} tokens"
            )
        positions = torch.arange(start, start + seq, device=idx.device)  # (seq,)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (batch, seq, emb_dim)
        x = self.drop_emb(x)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_caches[i] if kv_caches else None)  # (batch, seq, emb_dim)
        return self.final_norm(x)  # (batch, seq, emb_dim)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_caches: list[KVCache] | None = None, loss_chunk_size: int | None = None) -> torch.Tensor:
        """Logits `(batch, seq, vocab_size)`, or with `targets (batch, seq)` the mean cross-entropy.

        The loss goes through `forward` (not a separate method) so that DDP and
        torch.compile, which wrap `forward`, see the whole computation.
        `loss_chunk_size` rows at a time go through the fused head + loss (losses.py);
        None computes the full logits: a runtime choice, not part of the architecture.
        """
        hidden = self.hidden_states(idx, kv_caches)  # (batch, seq, emb_dim)
        if targets is None:
            return self.out_head(hidden)  # (batch, seq, vocab_size)
        return linear_cross_entropy(hidden, self.out_head.weight, targets, loss_chunk_size)

    def new_kv_caches(self, batch: int) -> list[KVCache]:
        """Empty per-layer caches for incremental decoding."""
        param = self.tok_emb.weight
        return [
            KVCache(batch, self.cfg.n_heads, self.cfg.context_length, self.cfg.head_dim,
                    param.device, param.dtype)
            for _ in self.blocks
        ]

    # ----------------------------------------------------------------- sizes
    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Unique parameters (a tied head is counted once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if exclude_position_embeddings else n

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTModel:
        """A freshly initialised model of a named size, e.g. `from_preset("gpt2-small", dropout=0.1)`."""
        return cls(preset_config(name, **overrides))

    @classmethod
    def from_hf_gpt2(cls, path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
                     n_heads: int | None = None, **overrides) -> GPTModel:
        """Load Hugging Face GPT-2 weights (a directory, a .safetensors/.bin file or a state dict).

        The head count cannot be read off the weights: it comes from `n_heads`, else the
        directory's config.json, else GPT-2's head size of 64.
        """
        hf_config: dict = {}
        if isinstance(path_or_state_dict, Mapping):
            state = dict(path_or_state_dict)
        else:
            state, hf_config = _read_hf_checkpoint(Path(path_or_state_dict))
        state = {k.removeprefix("transformer."): v for k, v in state.items()}

        emb_dim = state["wte.weight"].shape[1]
        n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("h."))
        cfg = ModelConfig(**{
            "vocab_size": state["wte.weight"].shape[0],
            "context_length": state["wpe.weight"].shape[0],
            "emb_dim": emb_dim,
            "n_layers": n_layers,
            "n_heads": n_heads or hf_config.get("n_head") or emb_dim // 64,
            "qkv_bias": True,
            "tie_weights": "lm_head.weight" not in state
            or torch.equal(state["lm_head.weight"], state["wte.weight"]),
            **overrides,
        })
        model = cls(cfg)
        model.load_state_dict(_hf_to_minigpt(state, cfg))
        return model

    def to_hf_gpt2_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights in `transformers.GPT2LMHeadModel` layout (Conv1D weights transposed)."""
        cfg = self.cfg
        sd = self.state_dict()
        out = {
            "transformer.wte.weight": sd["tok_emb.weight"],
            "transformer.wpe.weight": sd["pos_emb.weight"],
            "transformer.ln_f.weight": sd["final_norm.weight"],
            "transformer.ln_f.bias": sd["final_norm.bias"],
            "lm_head.weight": sd["out_head.weight"],
        }
        for i in range(cfg.n_layers):
            for hf_name, ours, transpose in _BLOCK_MAP:
                value = sd.get(f"blocks.{i}.{ours}")
                if value is None:  # no qkv bias here: GPT-2 always has one, so it is zero
                    value = torch.zeros(3 * cfg.emb_dim, dtype=sd["tok_emb.weight"].dtype)
                out[f"transformer.h.{i}.{hf_name}"] = value.t() if transpose else value
        return {k: v.detach().clone().contiguous() for k, v in out.items()}


# (Hugging Face name, our name, whether HF stores it as a transposed Conv1D weight)
_BLOCK_MAP = [
    ("ln_1.weight", "norm1.weight", False),
    ("ln_1.bias", "norm1.bias", False),
    ("attn.c_attn.weight", "attn.qkv.weight", True),
    ("attn.c_attn.bias", "attn.qkv.bias", False),
    ("attn.c_proj.weight", "attn.out_proj.weight", True),
    ("attn.c_proj.bias", "attn.out_proj.bias", False),
    ("ln_2.weight", "norm2.weight", False),
    ("ln_2.bias", "norm2.bias", False),
    ("mlp.c_fc.weight", "ff.fc.weight", True),
    ("mlp.c_fc.bias", "ff.fc.bias", False),
    ("mlp.c_proj.weight", "ff.proj.weight", True),
    ("mlp.c_proj.bias", "ff.proj.bias", False),
]


def _hf_to_minigpt(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and transpose) HF GPT-2 tensors, prefix `transformer.` already stripped."""
    out = {
        "tok_emb.weight": state["wte.weight"],
        "pos_emb.weight": state["wpe.weight"],
        "final_norm.weight": state["ln_f.weight"],
        "final_norm.bias": state["ln_f.bias"],
        "out_head.weight": state.get("lm_head.weight", state["wte.weight"]),
    }
    for i in range(cfg.n_layers):
        for hf_name, ours, transpose in _BLOCK_MAP:
            if ours == "attn.qkv.bias" and not cfg.qkv_bias:
                continue
            value = state[f"h.{i}.{hf_name}"]
            out[f"blocks.{i}.{ours}"] = value.t() if transpose else value
    return out


def _read_hf_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config.json (if any) of a HF checkpoint, without running pickled code."""
    if not path.exists():
        raise FileNotFoundError(f"HF GPT-2 checkpoint: {path} does not exist")
    config_file = path / "config.json" if path.is_dir() else path.with_name("config.json")
    hf_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"HF GPT-2 checkpoint: {path} holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), hf_config
    return torch.load(path, map_location="cpu", weights_only=True), hf_config
