"""GGUF export against llama.cpp, the reference for decoding on a CPU (`make bench-gguf`):
file size per precision, and batch-1 greedy decode tokens/s of llama.cpp (f32, f16, q8_0)
beside `minigpt generate`'s KV-cache decoder (fp32 and bf16 weights), same prompts, same
threads, one run; and how often q8_0's next token agrees with ours (teacher-forced).

    python -m benchmarks.gguf                           # gpt2-tiny and gpt2-small, initialised weights
    python -m benchmarks.gguf --checkpoint checkpoints/best.safetensors   # also a trained model

Decode speed does not depend on what the weights are, so the presets use fresh ones; the
agreement of q8_0 does (a trained model's logits are far more spread than an initialised
one's), which is what --checkpoint is for. Timings exclude the prompt: both sides time the
tokens after the first, each fed one at a time. Writes reports/bench-gguf.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minigpt.export import GGUF_PRECISIONS, export_gguf
from minigpt.generate import stream_tokens
from minigpt.io import write_json_atomic
from minigpt.model import GPTModel
from minigpt.serving import load_language_model
from minigpt.tokenizer import get_tokenizer

PROMPTS = ["ROMEO:", "The king is dead; long live"]
NEW_TOKENS = 100  # the prompts and these fit gpt2-tiny's 128-token context: llama.cpp's window does not slide
THREADS = 2


def minigpt_tokens_per_s(model: GPTModel, prompt: str) -> tuple[float, list[int]]:
    """Greedy decode rate after the first token (the prompt's prefill), and the tokens."""
    ids = torch.tensor([get_tokenizer().encode_ordinary(prompt)])
    tokens = stream_tokens(model, ids, NEW_TOKENS)
    chosen = [next(tokens)]
    start = time.perf_counter()
    chosen += list(tokens)
    return (len(chosen) - 1) / (time.perf_counter() - start), chosen


def llama_cpp(gguf: Path, prompt: str, follow: list[int] | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.llama_cpp", str(gguf), "--prompt", prompt,
           "--max-new-tokens", str(NEW_TOKENS), "--threads", str(THREADS)]
    if follow:
        cmd += ["--follow", ",".join(map(str, follow))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(proc.stdout.splitlines()[-1])


def measure(name: str, model: GPTModel, folder: Path) -> dict:
    model = model.eval()
    result: dict = {"parameters": model.num_parameters(), "gguf_bytes": {}, "llama_cpp_tokens_per_s": {},
                    "minigpt_tokens_per_s": {}}
    reference = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = []
        for prompt in PROMPTS:
            rate, tokens = minigpt_tokens_per_s(model.to(dtype), prompt)
            rates.append(rate)
            if precision == "fp32":
                reference[prompt] = tokens
        result["minigpt_tokens_per_s"][precision] = round(sum(rates) / len(rates), 1)
    model.float()
    for precision in GGUF_PRECISIONS:
        path = export_gguf(model, folder / f"{name}.{precision}.gguf", precision)
        result["gguf_bytes"][precision] = path.stat().st_size
        runs = [llama_cpp(path, prompt) for prompt in PROMPTS]
        result["llama_cpp_tokens_per_s"][precision] = round(
            sum(1 / r["seconds_per_token"] for r in runs) / len(runs), 1)
        agree = total = 0
        for prompt in PROMPTS:  # teacher-forced on our fp32 greedy tokens
            top1 = llama_cpp(path, prompt, follow=reference[prompt])["top1"]
            agree += sum(a == b for a, b in zip(top1, reference[prompt]))
            total += len(top1)
        result.setdefault("top1_agreement_with_minigpt_fp32", {})[precision] = round(agree / total, 4)
    result["llama_cpp_f32_vs_minigpt_fp32"] = round(
        result["llama_cpp_tokens_per_s"]["f32"] / result["minigpt_tokens_per_s"]["fp32"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gguf", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="gpt2-tiny,gpt2-small")
    parser.add_argument("--checkpoint", type=Path, help="also measure this trained language model")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-gguf.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    models = {name: GPTModel.from_preset(name) for name in args.presets.split(",")}
    if args.checkpoint:
        models[f"{args.checkpoint.stem} (trained)"] = load_language_model(args.checkpoint)[0]
    report = {"threads": THREADS, "new_tokens": NEW_TOKENS, "prompts": PROMPTS, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        for name, model in models.items():
            torch.manual_seed(0)
            report["models"][name] = measure(name.split()[0], model, Path(tmp))
            print(json.dumps({name: report["models"][name]}, indent=1), flush=True)
    write_json_atomic(args.out, report)
    print(f"bench-gguf: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
