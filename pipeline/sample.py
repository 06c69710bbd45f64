"""Stage 6: text from the configured prompts and sampling settings -> reports/samples.{md,json}."""

from __future__ import annotations

import zlib

import mlflow
import torch

from minigpt.config import SampleConfig
from minigpt.generate import generate
from minigpt.tokenizer import get_tokenizer
from minigpt.io import write_json_atomic, write_text_atomic
from pipeline import paths
from pipeline.common import load_config, stage_device, stage_main
from pipeline.run import join_run
from pipeline.trained import load_trained_model


def sample_seed(seed: int, prompt: str, temperature: float) -> int:
    return seed + zlib.crc32(f"{prompt}\0{temperature}".encode())


def to_markdown(samples: list[dict], cfg: SampleConfig, checkpoint: str) -> str:
    lines = ["# Samples\n", f"From `{checkpoint}`, {cfg.max_new_tokens} new tokens, "
             f"top_k={cfg.top_k}, top_p={cfg.top_p}, seed={cfg.seed} (+ crc32 of prompt and temperature).\n"]
    for s in samples:
        lines.append(f"## {s['prompt']!r} at temperature {s['temperature']}\n")
        lines.append("```text\n" + s["text"].replace("```", "` ` `") + "\n```\n")
    return "\n".join(lines)


@stage_main
def main() -> None:
    stage = load_config("model", "data", "train", "sample", "tracking")
    cfg = stage.sample
    enc = get_tokenizer(stage.data.tokenizer)
    model, checkpoint, _ = load_trained_model(stage.model, stage_device(stage.train.device))
    device = next(model.parameters()).device
    samples = []
    for prompt in cfg.prompts:
        for temperature in cfg.temperatures:
            # One generator per (prompt, temperature), seeded from both: each sample is
            # reproducible on its own, and prompts do not share one random stream.
            generator = torch.Generator(device=device).manual_seed(sample_seed(cfg.seed, prompt, temperature))
            idx = torch.tensor([enc.encode_ordinary(prompt) or [enc.eot_token]], device=device)
            out = generate(model, idx, cfg.max_new_tokens, temperature=temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, eos_id=enc.eot_token, generator=generator)
            text = enc.decode(out[0].tolist())
            samples.append({"prompt": prompt, "temperature": temperature, "text": text})
            print(f"--- {prompt!r} @ T={temperature}\n{text}\n")
    write_json_atomic(paths.SAMPLES_JSON, {"checkpoint": checkpoint, "config": cfg.model_dump(), "samples": samples})
    write_text_atomic(paths.SAMPLES_MD, to_markdown(samples, cfg, checkpoint))
    with join_run(stage.tracking):
        mlflow.log_artifact(str(paths.SAMPLES_MD))
        mlflow.log_artifact(str(paths.SAMPLES_JSON))


if __name__ == "__main__":
    main()
