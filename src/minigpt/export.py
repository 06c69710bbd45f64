"""Hand a trained language model to the tools people run models in: a GGUF file for llama.cpp
(and what is built on it: Ollama, LM Studio), or a Hugging Face GPT-2 folder for transformers.

Both files carry the tokenizer too (GPT-2's byte-level BPE: vocabulary, merges, end-of-text),
so the other side tokenizes text itself and nothing but the file is needed. Both are written
atomically: a failed export leaves no file a reader could take for a whole one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from minigpt.io import atomic_dir, atomic_path
from minigpt.model import GPTModel
from minigpt.tokenizer import EOT_ID, EOT_TOKEN, gpt2_vocabulary

#: Weight formats of a GGUF export: the 2-D matrices are stored this way, norms and biases
#: always in f32 (llama.cpp's own converter does the same: they are tiny and sensitive).
GGUF_PRECISIONS = ("f32", "f16", "q8_0")


def export_gguf(model: GPTModel, path: str | Path, precision: str = "f32", name: str = "minigpt") -> Path:
    """Write `model` as a GGUF file of llama.cpp's `gpt2` architecture, tokenizer included.

    llama.cpp's GPT-2 graph differs from ours in what it expects, not in what it computes:
    queries, keys and values as one fused `attn_qkv` (ours already is), a bias on every
    linear layer (zeros where ours has none: `qkv_bias=False`), and an output matrix that
    may be left out when tied to the token embedding (then it reads `token_embd`).
    """
    try:
        import gguf  # here: only exporting needs it (the `interop` extra)
    except ImportError:
        raise ValueError("GGUF export needs the gguf package: pip install 'minigpt[interop]'") from None
    if precision not in GGUF_PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(GGUF_PRECISIONS)}")
    cfg = model.cfg
    tokens, merges = gpt2_vocabulary()
    if cfg.vocab_size != len(tokens):
        raise ValueError(f"vocab_size {cfg.vocab_size}: a GGUF export carries GPT-2's tokenizer, "
                         f"which needs vocab_size {len(tokens)}")
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        writer.add_name(name)
        writer.add_context_length(cfg.context_length)
        writer.add_embedding_length(cfg.emb_dim)
        writer.add_feed_forward_length(4 * cfg.emb_dim)
        writer.add_block_count(cfg.n_layers)
        writer.add_head_count(cfg.n_heads)
        writer.add_layer_norm_eps(model.final_norm.eps)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[precision])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizing regex, which llama.cpp knows by name
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.NORMAL] * EOT_ID + [gguf.TokenType.CONTROL])
        writer.add_token_merges([f"{left} {right}" for left, right in merges])
        writer.add_bos_token_id(EOT_ID)  # GPT-2 has one special token: it starts and ends documents
        writer.add_eos_token_id(EOT_ID)
        writer.add_add_bos_token(False)  # our prompts start with their first word, not <|endoftext|>

        for name_, tensor in gguf_tensors(model).items():
            data = tensor.detach().float().cpu().numpy()
            kind = _storage_type(gguf, data, precision)
            writer.add_tensor(name_, gguf.quants.quantize(data, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def gguf_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's GPT-2 names. nn.Linear stores (out, in), which is
    the (rows, row length) order GGUF wants: no transposes, unlike Hugging Face's Conv1D."""
    cfg = model.cfg
    out = {
        "token_embd.weight": model.tok_emb.weight,  # (vocab_size, emb_dim)
        "position_embd.weight": model.pos_emb.weight,  # (context_length, emb_dim)
        "output_norm.weight": model.final_norm.weight,
        "output_norm.bias": model.final_norm.bias,
    }
    if not cfg.tie_weights:
        out["output.weight"] = model.out_head.weight  # (vocab_size, emb_dim)
    for i, block in enumerate(model.blocks):
        qkv = block.attn.qkv
        out |= {
            f"blk.{i}.attn_norm.weight": block.norm1.weight,
            f"blk.{i}.attn_norm.bias": block.norm1.bias,
            f"blk.{i}.attn_qkv.weight": qkv.weight,  # (3 * emb_dim, emb_dim): q, k, v stacked
            f"blk.{i}.attn_qkv.bias": qkv.bias if qkv.bias is not None else torch.zeros(qkv.out_features),
            f"blk.{i}.attn_output.weight": block.attn.out_proj.weight,
            f"blk.{i}.attn_output.bias": block.attn.out_proj.bias,
            f"blk.{i}.ffn_norm.weight": block.norm2.weight,
            f"blk.{i}.ffn_norm.bias": block.norm2.bias,
            f"blk.{i}.ffn_up.weight": block.ff.fc.weight,  # (4 * emb_dim, emb_dim)
            f"blk.{i}.ffn_up.bias": block.ff.fc.bias,
            f"blk.{i}.ffn_down.weight": block.ff.proj.weight,  # (emb_dim, 4 * emb_dim)
            f"blk.{i}.ffn_down.bias": block.ff.proj.bias,
        }
    return out


def _storage_type(gguf, data: np.ndarray, precision: str):
    """How one tensor is stored: vectors in f32; matrices as asked, except that q8_0 packs
    rows in blocks of 32 values, so a matrix with shorter or ragged rows falls back to f16."""
    types = gguf.GGMLQuantizationType
    if data.ndim == 1 or precision == "f32":
        return types.F32
    if precision == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] == 0:
        return types.Q8_0
    return types.F16


def export_hf(model: GPTModel, folder: str | Path) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder that `transformers` loads with
    `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained`: config.json,
    model.safetensors (no pickle), and GPT-2's tokenizer files vocab.json and merges.txt."""
    cfg = model.cfg
    tokens, merges = gpt2_vocabulary()
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": "gelu_new",  # the tanh approximation, as ours
        "layer_norm_epsilon": model.final_norm.eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "tie_word_embeddings": cfg.tie_weights,
        "torch_dtype": "float32",
    }
    weights = model.to_hf_gpt2_state_dict()
    if cfg.tie_weights:  # transformers ties lm_head to wte itself; safetensors refuses a shared tensor twice
        weights.pop("lm_head.weight")
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.context_length,
                        "bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN,
                        "add_prefix_space": False}
    with atomic_dir(folder) as tmp:
        save_file({k: v.float().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                        encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        for file in tmp.iterdir():
            file.chmod(0o644)  # safetensors creates its file private
    return Path(folder)
