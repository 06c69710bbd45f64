"""`minigpt export`, checked by the tools on the other side: a GGUF file run in a real llama.cpp
(the `llama-cpp-py-sync` wheel's prebuilt library, see benchmarks/llama_cpp.py) tokenizes like us
and continues prompts with our greedy tokens; a Hugging Face folder loads in transformers with
our logits and our tokenizer's ids. Bad requests are one line and write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt.checkpoint import save_checkpoint
from minigpt.config import ModelConfig
from minigpt.generate import generate
from minigpt.model import GPTModel
from minigpt.tasks.classification import SequenceClassifier
from minigpt.tokenizer import N_VOCAB, get_tokenizer
from test_cli import assert_one_line_error, cli

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO: Wherefore art thou, my love?", "It's 2026 — naïve café!\n\n   spaced  out\tTAB 12345",
           "\n"]
N_NEW = 48
# The default block (tied head, no qkv bias) and the other layout: biases present, head untied.
LAYOUTS = {
    "tied": ModelConfig(vocab_size=N_VOCAB, context_length=128, emb_dim=64, n_heads=4, n_layers=2),
    "untied": ModelConfig(vocab_size=N_VOCAB, context_length=128, emb_dim=64, n_heads=4, n_layers=2,
                          qkv_bias=True, tie_weights=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export")
    paths = {}
    for seed, (name, cfg) in enumerate(LAYOUTS.items()):
        torch.manual_seed(seed)
        model = GPTModel(cfg)
        if not cfg.tie_weights:  # a head that really differs from the embedding
            torch.nn.init.normal_(model.out_head.weight, std=0.02)
        paths[name] = folder / f"{name}.safetensors"
        save_checkpoint(paths[name], model, None, {"step": 0, "run_info": {"config": {"model": cfg.model_dump()}}})
    return paths


def ours(path: Path, prompt: str) -> list[int]:
    from minigpt.serving import load_language_model

    model, _ = load_language_model(path)
    ids = get_tokenizer().encode_ordinary(prompt)
    return generate(model, torch.tensor([ids]), N_NEW)[0, len(ids):].tolist()


def llama_cpp(gguf: Path, prompt: str, follow: list[int] | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.llama_cpp", str(gguf), "--prompt", prompt,
           "--max-new-tokens", str(N_NEW), "--threads", "1"]
    if follow:
        cmd += ["--follow", ",".join(map(str, follow))]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def export(checkpoint: Path, out: Path, fmt: str, *extra: str) -> None:
    proc = cli("export", str(checkpoint), str(out), "--format", fmt, *extra)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out} ({fmt}, ")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("precision", ["f32", "f16"])
def test_llama_cpp_tokenizes_like_us_and_continues_with_our_greedy_tokens(checkpoints, tmp_path, layout, precision):
    gguf = tmp_path / f"{layout}.{precision}.gguf"
    export(checkpoints[layout], gguf, "gguf", "--precision", precision)
    for prompt in PROMPTS[:2]:
        result = llama_cpp(gguf, prompt)
        assert result["prompt_ids"] == get_tokenizer().encode_ordinary(prompt)
        assert result["tokens"] == ours(checkpoints[layout], prompt)


def test_q8_0_agrees_on_the_next_token_almost_everywhere(checkpoints, tmp_path):
    gguf = tmp_path / "q8.gguf"
    export(checkpoints["tied"], gguf, "gguf", "--precision", "q8_0")
    f32 = tmp_path / "f32.gguf"
    export(checkpoints["tied"], f32, "gguf")
    assert gguf.stat().st_size < 0.4 * f32.stat().st_size  # 8.5 bits a weight for the matrices, vs 32
    agree = total = 0
    for prompt in PROMPTS:
        expected = ours(checkpoints["tied"], prompt)
        top1 = llama_cpp(gguf, prompt, follow=expected)["top1"]  # teacher-forced: one slip derails nothing
        agree += sum(a == b for a, b in zip(top1, expected))
        total += len(expected)
    print(f"q8_0 top-1 agreement with minigpt: {agree}/{total}")
    assert agree / total >= 0.9


def test_the_hf_folder_loads_in_transformers_with_our_logits_and_token_ids(checkpoints, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from minigpt.serving import load_language_model

    for layout, checkpoint in checkpoints.items():
        folder = tmp_path / layout
        export(checkpoint, folder, "hf")
        hf = GPT2LMHeadModel.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model, _ = load_language_model(checkpoint)
        for prompt in PROMPTS:
            ids = get_tokenizer().encode_ordinary(prompt)
            assert tokenizer(prompt)["input_ids"] == ids
            with torch.no_grad():
                torch.testing.assert_close(hf(torch.tensor([ids])).logits, model(torch.tensor([ids])),
                                           atol=1e-5, rtol=0)


def test_bad_exports_are_one_line_and_write_nothing(checkpoints, tmp_path):
    cfg = LAYOUTS["tied"]
    classifier = tmp_path / "classifier.safetensors"
    info = {"config": {"finetune": {"task": "classification"}}, "model_config": cfg.model_dump()}
    save_checkpoint(classifier, SequenceClassifier(GPTModel(cfg), 2), None, {"step": 1, "run_info": info})
    out = tmp_path / "out.gguf"
    assert_one_line_error(cli("export", str(classifier), str(out), "--format", "gguf"),
                          "a classifier", "no language-model head")
    assert_one_line_error(cli("export", str(checkpoints["tied"]), str(out), "--format", "gguf", "--precision", "q4"),
                          "--precision q4", "f32, f16, q8_0")
    assert_one_line_error(cli("export", str(checkpoints["tied"]), str(tmp_path / "hf"), "--format", "hf",
                              "--precision", "f16"), "--precision f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.safetensors"]
