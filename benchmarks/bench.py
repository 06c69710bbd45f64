"""Benchmarks of this machine, the model, sampling, training and the data stages.

    python -m benchmarks.bench [--quick] [--only hw,model,train,data] [--out reports/bench.json]

Prints a table and merges its keys into `reports/bench.json` (written atomically, so
sections can be run separately and a crash never leaves half a file):

    hw.fp32_matmul_gflops, hw.bf16_matmul_gflops   best matmul FLOP/s over square and
                                                   gpt2-small shapes: the MFU yardsticks
    model.fwd_bwd_tokens_per_s                     gpt2-small, context 256, batch 8, fp32
    sample.kv_tokens_per_s, sample.nocache_tokens_per_s, sample.kv_speedup
                                                   200 new tokens from a 10-token prompt, batch 1,
                                                   greedy, `generate` with and without the cache
    sample.naive_tokens_per_s, sample.kv_speedup_vs_naive
                                                   the textbook loop (whole window, all logits)
    sample.kv_bf16_tokens_per_s, sample.kv_bf16_speedup
                                                   `generate` with the cache on bf16 weights
                                                   (`minigpt generate --precision bf16`)
    sample.kv_batch8_tokens_per_s, sample.kv_bf16_batch8_tokens_per_s
                                                   8 prompts at once: new tokens/s of the batch
    sample.bf16_greedy_agreement                   share of 200 greedy tokens that bf16 weights
                                                   choose as fp32 does, on the fp32 loss-curve
                                                   model below (trained: a random one has ties)
    train.tokens_per_s                             a full training step (forward, backward,
                                                   clip, AdamW) with the default TrainConfig
    train.best_tokens_per_s, train.best_settings   the fastest TrainConfig settings measured
    train.mfu_bf16, train.mfu_fp32                 model FLOP/s (flops_per_token x tokens/s) of the
                                                   fastest bf16 resp. fp32 settings over the bf16
                                                   resp. fp32 yardstick (train.best_model_gflops:
                                                   the fastest settings' model GFLOP/s)
    train.settings                                 tokens/s and MFU of every setting measured
    train.run_model_mfu_bf16, train.run_model_settings
                                                   the same for the model `make run` trains
                                                   (gpt2-tiny, context 128, batch 16)
    train.mfu_bound_bf16, train.run_model_mfu_bound_bf16
                                                   the MFU of a bf16 step if only its matmuls
                                                   took time (each timed alone at its shape),
                                                   and with the fused loss pass added: how
                                                   far the MFU above is from this machine's limit
    train.bf16_loss_rel_diff                       loss curves of `train()` in fp32 vs the best
                                                   settings: max relative difference per step;
    train.seed_loss_rel_diff                       the same for two fp32 runs from different
                                                   seeds: the noise the first is judged against
    tokenize.*, loader.*                           benchmarks.data

Timings are medians of repeated measurements, and the settings compared against each
other are measured interleaved in one process, so that load from other processes hits
them all alike.

Like `train()`, the command first sets glibc's malloc to keep freed memory
(`minigpt.utils.retain_freed_memory`, worth ~1.6x on a CPU training step); the data
benchmarks run in a child process on the default policy, as the data stages do.
`meta.allocator` names a malloc preloaded by the caller (LD_PRELOAD), if any.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt.config import TrainConfig
from minigpt.flops import flops_per_token, matmul_flops_per_s
from minigpt.generate import generate
from minigpt.model import GPTModel
from minigpt.io import write_json_atomic
from minigpt.losses import fused_loss_and_logit_grad
from minigpt.train import LanguageModelLoss, build_optimizer, train, train_step
from minigpt.utils import compiled, eval_mode, retain_freed_memory

SECTIONS = ("hw", "model", "train", "data")
PRESET = "gpt2-small"
CONTEXT = 256
BATCH = 8
PROMPT_TOKENS = 10
NEW_TOKENS = 200
SAMPLE_BATCH = 8
# The model `make run` trains (conf/: model gpt2-tiny, data.max_length, train.micro_batch_size).
RUN_PRESET, RUN_CONTEXT, RUN_BATCH = "gpt2-tiny", 128, 16
CPU = torch.device("cpu")
CHUNK = 1024  # conf/train/cpu-quick.yaml: train.loss_chunk_size
RUN_OPTIMIZER = "muon"  # conf/train/cpu-quick.yaml: train.optimizer

# The trainer's speed settings worth comparing (TrainConfig fields). The first is the
# default configuration; the fastest of the rest becomes `train.best_settings`.
TRAIN_CANDIDATES: list[dict[str, Any]] = [
    {"precision": "fp32", "compile": False, "loss_chunk_size": None},
    {"precision": "fp32", "compile": False, "loss_chunk_size": CHUNK},
    {"precision": "bf16", "compile": False, "loss_chunk_size": None},
    {"precision": "bf16", "compile": False, "loss_chunk_size": CHUNK},
    {"precision": "bf16", "compile": True, "loss_chunk_size": None},
    {"precision": "bf16", "compile": True, "loss_chunk_size": CHUNK},
]
QUICK_CANDIDATES = [TRAIN_CANDIDATES[0], TRAIN_CANDIDATES[3], TRAIN_CANDIDATES[5]]
# For the small model `make run` trains, with its optimizer: with and without compile.
RUN_CANDIDATES = [{**TRAIN_CANDIDATES[3], "optimizer": RUN_OPTIMIZER},
                  {**TRAIN_CANDIDATES[5], "optimizer": RUN_OPTIMIZER}]


def settings_name(settings: dict[str, Any]) -> str:
    chunk = settings.get("loss_chunk_size")
    parts = [settings["precision"], "compile" if settings.get("compile") else "eager"]
    parts.append(f"chunk{chunk}" if chunk else "full-logits")
    if settings.get("optimizer", "adamw") != "adamw":
        parts.append(settings["optimizer"])
    return "+".join(parts)


def _timings(work: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` timed calls of `work`, after `warmup` untimed ones."""
    for _ in range(warmup):
        work()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return seconds


def _median_rate(work: Callable[[], Any], units: float, repeats: int, warmup: int = 1) -> float:
    """Median of `units / seconds` over `repeats` timed calls of `work`."""
    return statistics.median(units / t for t in _timings(work, repeats, warmup))


def _random_batch(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


# --------------------------------------------------------------------------- hw
def model_matmul_shapes(model: GPTModel, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of the forward matmuls of one block and the head for `tokens` rows."""
    e = model.cfg.emb_dim
    return {
        "qkv": (tokens, e, 3 * e),
        "attn_out": (tokens, e, e),
        "mlp_fc": (tokens, e, 4 * e),
        "mlp_proj": (tokens, 4 * e, e),
        "head": (tokens, e, model.cfg.vocab_size),
    }


def peak_of(runs: dict[str, list[float]]) -> float:
    """The best repetition of the best shape: a peak is a maximum, never a median."""
    return max(max(repetitions) for repetitions in runs.values())


def spread(values: list[float], digits: int = 1) -> list[float]:
    """[min, median, max]: how much a timing moved between repetitions (a busy machine shows)."""
    return [round(min(values), digits), round(statistics.median(values), digits), round(max(values), digits)]


def bench_hw(quick: bool, repeats: int | None = None) -> dict[str, Any]:
    """Matmul FLOP/s in fp32 and bf16: the best over square sizes and the model's own shapes.

    A peak is a maximum: the best repetition of the best shape, never a median (a median
    taken while something else ran gave 200 GFLOP/s on a 425 GFLOP/s machine, and an MFU
    of 1.5 against it). Each shape's [min, median, max] is kept to show the noise.
    """
    model = GPTModel.from_preset(PRESET)
    shapes = {"square1024": (1024, 1024, 1024), "square2048": (2048, 2048, 2048),
              **model_matmul_shapes(model, BATCH * CONTEXT)}
    seconds = 0.2 if quick else 0.4
    repeats = repeats or (3 if quick else 5)
    out: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        runs = {shape_name: [matmul_flops_per_s.__wrapped__(dtype, CPU, seconds=seconds, shape=shape) / 1e9
                             for _ in range(repeats)]
                for shape_name, shape in shapes.items()}
        out[f"hw.{name}_matmul_gflops"] = round(peak_of(runs), 1)
        out[f"hw.{name}_matmul_gflops_by_shape"] = {s: round(max(r), 1) for s, r in runs.items()}
        out[f"hw.{name}_matmul_gflops_spread"] = {s: spread(r) for s, r in runs.items()}
    return out


# --------------------------------------------------------------------------- model
def bench_model(quick: bool) -> dict[str, Any]:
    """Forward+backward throughput and sampling with/without the KV cache (issue 2)."""
    torch.manual_seed(0)
    model = GPTModel.from_preset(PRESET, context_length=CONTEXT)
    x, y = _random_batch(BATCH, CONTEXT, model.cfg.vocab_size, seed=1)

    def fwd_bwd() -> None:
        model(x, y).backward()
        model.zero_grad(set_to_none=True)

    model.train()
    fwd_bwd_rate = _median_rate(fwd_bwd, BATCH * CONTEXT, repeats=2 if quick else 5)

    prompt = _random_batch(1, PROMPT_TOKENS, model.cfg.vocab_size, seed=2)[0]  # (1, 10)
    prompts8 = _random_batch(SAMPLE_BATCH, PROMPT_TOKENS, model.cfg.vocab_size, seed=3)[0]  # (8, 10)
    model.eval()
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)  # what `minigpt generate --precision bf16` loads
    samplers: dict[str, tuple[int, Callable[[], torch.Tensor]]] = {  # name: (batch, sample)
        "kv": (1, lambda: generate(model, prompt, NEW_TOKENS, use_cache=True)),
        "nocache": (1, lambda: generate(model, prompt, NEW_TOKENS, use_cache=False)),
        "naive": (1, lambda: naive_generate(model, prompt, NEW_TOKENS)),
        "kv_bf16": (1, lambda: generate(bf16_model, prompt, NEW_TOKENS)),
        "kv_batch8": (SAMPLE_BATCH, lambda: generate(model, prompts8, NEW_TOKENS)),
        "kv_bf16_batch8": (SAMPLE_BATCH, lambda: generate(bf16_model, prompts8, NEW_TOKENS)),
    }
    outputs = {name: sample() for name, (_, sample) in samplers.items()}  # warm-up, and to compare
    rates: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(1 if quick else 3):  # interleaved, so load affects all alike
        for name, (batch, sample) in samplers.items():
            start = time.perf_counter()
            sample()
            rates[name].append(batch * NEW_TOKENS / (time.perf_counter() - start))
    rate = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "model.fwd_bwd_tokens_per_s": round(fwd_bwd_rate, 1),
        "sample.kv_tokens_per_s": round(rate["kv"], 1),
        "sample.nocache_tokens_per_s": round(rate["nocache"], 1),
        "sample.kv_speedup": round(rate["kv"] / rate["nocache"], 2),
        "sample.naive_tokens_per_s": round(rate["naive"], 1),
        "sample.kv_speedup_vs_naive": round(rate["kv"] / rate["naive"], 2),
        "sample.kv_matches_nocache": bool(torch.equal(outputs["kv"], outputs["nocache"])),
        "sample.kv_bf16_tokens_per_s": round(rate["kv_bf16"], 1),
        "sample.kv_bf16_speedup": round(rate["kv_bf16"] / rate["kv"], 2),
        "sample.kv_batch8_tokens_per_s": round(rate["kv_batch8"], 1),
        "sample.kv_bf16_batch8_tokens_per_s": round(rate["kv_bf16_batch8"], 1),
        "sample.tokens_per_s_spread": {name: spread(r) for name, r in rates.items()},
    }


@torch.no_grad()
def naive_generate(model: GPTModel, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding the textbook way: each token re-runs the whole window and projects
    every position to the vocabulary. The baseline that `generate` improves on twice:
    logits of the last position only (use_cache=False), and the KV cache on top."""
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.cfg.context_length:])  # (batch, seq, vocab)
            idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


# --------------------------------------------------------------------------- train
class TrainStep:
    """One optimizer step of the trainer itself (`minigpt.train.train_step`) for a single
    process, one micro-batch, the same batch every time."""

    def __init__(self, settings: dict[str, Any], seed: int = 0, shape: tuple[str, int, int] = (PRESET, CONTEXT, BATCH)) -> None:
        preset, context, batch = shape
        self.cfg = TrainConfig(micro_batch_size=batch, global_batch_size=batch, **settings)
        torch.manual_seed(seed)
        self.model = GPTModel.from_preset(preset, context_length=context)
        self.model.train()
        self.optimizer = build_optimizer(self.model, self.cfg, CPU)
        self.runner = compiled(self.model) if self.cfg.compile else self.model
        self.batches = itertools.repeat(_random_batch(batch, context, self.model.cfg.vocab_size, seed=seed + 1))
        self.loss_fn = LanguageModelLoss(self.cfg.loss_chunk_size)

    def __call__(self) -> float:
        loss, _ = train_step(self.runner, self.optimizer, self.batches, self.loss_fn, lr=self.cfg.lr,
                             accum_steps=1, precision=self.cfg.precision, grad_clip=self.cfg.grad_clip,
                             device=CPU)
        return loss


def measure_train_steps(candidates: list[dict[str, Any]], rounds: int, warmup: int = 2,
                        log: Callable[[str], None] = print,
                        shape: tuple[str, int, int] = (PRESET, CONTEXT, BATCH)) -> list[dict[str, Any]]:
    """Tokens/s of each settings' training step of a (preset, context, batch) model:
    medians over `rounds` interleaved rounds."""
    steps = []
    for settings in candidates:
        start = time.perf_counter()
        step = TrainStep(settings, shape=shape)
        for _ in range(warmup):  # the first compiled steps compile
            step()
        log(f"  {settings_name(settings):28s} ready in {time.perf_counter() - start:5.1f} s")
        steps.append(step)
    flops_token = flops_per_token(steps[0].model, shape[1])
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    del steps  # the models and optimizers: ~0.5 GB each
    gc.collect()
    tokens = shape[1] * shape[2]
    return [
        {"settings": settings, "name": settings_name(settings),
         "tokens_per_s": round(tokens / statistics.median(t), 1),
         "best_of_tokens_per_s": round(tokens / min(t), 1),
         "tokens_per_s_spread": spread([tokens / seconds for seconds in t]),
         "flops_per_token": flops_token}
        for settings, t in zip(candidates, times)
    ]


@dataclass(frozen=True)
class Matmul:
    """`count` products per training step of `a (batch, m, k) @ b (batch, k, n)`; `a_t`/`b_t`:
    that operand is a transposed view, as the trainer's backward passes hand it to the kernel."""

    m: int
    k: int
    n: int
    a_t: bool = False
    b_t: bool = False
    batch: int = 1
    count: float = 1.0

    @property
    def flop(self) -> float:
        """FLOPs of one product (a multiply-add is 2)."""
        return 2.0 * self.batch * self.m * self.k * self.n


def step_matmuls(model: GPTModel, context: int, batch: int) -> list[Matmul]:
    """Every matmul of one training step of `model` on `(batch, context)` tokens, forward and
    backward, each distinct product once with the number of times the step runs it."""
    e, vocab, heads, layers = model.cfg.emb_dim, model.cfg.vocab_size, model.cfg.n_heads, model.cfg.n_layers
    tokens = context * batch
    chunk = min(CHUNK, tokens)
    chunks = tokens / chunk
    # The head per chunk (losses.LinearCrossEntropy): logits, hidden gradient, weight gradient^T.
    products = [Matmul(chunk, e, vocab, b_t=True, count=chunks), Matmul(chunk, vocab, e, count=chunks),
                Matmul(e, chunk, vocab, a_t=True, count=chunks)]
    # Each linear layer of a block: forward x W^T, input gradient dY W, weight gradient dY^T x.
    for d_in, d_out in ((e, 3 * e), (e, e), (e, 4 * e), (4 * e, e)):
        products += [Matmul(tokens, d_in, d_out, b_t=True, count=layers), Matmul(tokens, d_out, d_in, count=layers),
                     Matmul(d_out, tokens, d_in, a_t=True, count=layers)]
    # Attention: q k^T and weights @ v, each once forward and twice backward.
    head_dim = e // heads
    products += [Matmul(context, head_dim, context, batch=batch * heads, count=3 * layers),
                 Matmul(context, context, head_dim, batch=batch * heads, count=3 * layers)]
    return products


def matmul_seconds(product: Matmul, repeats: int) -> float:
    """Best time of one `product` in bf16, cache-warm."""
    gen = torch.Generator().manual_seed(0)

    def operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
        batch = (product.batch,) if product.batch > 1 else ()  # a plain product stays a 2-D mm, not a bmm
        stored = torch.randn(*batch, *((cols, rows) if transposed else (rows, cols)), generator=gen).bfloat16()
        return stored.mT if transposed else stored

    a, b = operand(product.m, product.k, product.a_t), operand(product.k, product.n, product.b_t)
    return min(_timings(lambda: a @ b, repeats, warmup=2))


def fused_loss_seconds(rows: int, vocab: int, tokens: int, repeats: int) -> float:
    """Best time of the fused softmax/logit-gradient pass over one chunk of `rows` bf16 logits."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen).bfloat16()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    fused_loss = fused_loss_and_logit_grad("cpu")
    row_scale = torch.full((rows,), 1 / tokens)
    return min(_timings(lambda: fused_loss(logits, targets, row_scale), repeats, warmup=2))


def mfu_bound(shape: tuple[str, int, int], peak_gflops: float, repeats: int = 8,
              time_matmul: Callable[[Matmul, int], float] = matmul_seconds,
              time_loss: Callable[[int, int, int, int], float] = fused_loss_seconds) -> dict[str, float]:
    """The MFU a bf16 training step of a (preset, context, batch) model could reach if
    everything but its matmuls took no time: each matmul of the step (`step_matmuls`)
    timed alone at its shape, best of `repeats`. `matmuls_and_loss` adds the fused
    softmax/gradient pass over the logits. The timers are arguments so that the
    arithmetic can be checked on given timings."""
    preset, context, batch = shape
    model = GPTModel.from_preset(preset, context_length=context)
    tokens = context * batch
    chunk = min(CHUNK, tokens)
    matmuls = sum(product.count * time_matmul(product, repeats) for product in step_matmuls(model, context, batch))
    loss = tokens / chunk * time_loss(chunk, model.cfg.vocab_size, tokens, repeats)
    step_gflop = flops_per_token(model, context) * tokens / 1e9
    return {"matmuls": step_gflop / matmuls / peak_gflops, "matmuls_and_loss": step_gflop / (matmuls + loss) / peak_gflops}


def mfu(tokens_per_s: float, flops_per_token: float, peak_gflops: float) -> float:
    """Model FLOP/s over the peak: the share of the machine a training step uses."""
    return tokens_per_s * flops_per_token / (peak_gflops * 1e9)


def set_mfus(results: list[dict[str, Any]], peaks: dict[str, float], remeasure: Callable[[], dict[str, float]],
             log: Callable[[str], None] = print) -> dict[str, float]:
    """Give each result its MFU against the peak of its precision, and return the peaks used.

    An MFU above 1 is more than the machine can do: the peak was measured while it was
    busy. The peaks are measured again (`remeasure`, keeping the higher of old and new);
    still above 1, the bench fails rather than report it."""
    for _ in range(2):
        for r in results:
            r["mfu"] = round(mfu(r["tokens_per_s"], r["flops_per_token"], peaks[r["settings"]["precision"]]), 3)
        highest = max(r["mfu"] for r in results)
        if highest <= 1.0:
            return peaks
        log(f"  MFU {highest} > 1: the matmul peak was measured on a busy machine; re-measuring it")
        remeasured = remeasure()
        peaks = {p: max(peaks[p], remeasured[p]) for p in peaks}
    raise RuntimeError(f"MFU {highest} > 1 even against a re-measured peak "
                       f"({peaks} GFLOP/s): the machine is too busy to benchmark; run `make bench` again")


def markov_tokens(n_tokens: int, vocab: int, seed: int = 0, states: int = 2048,
                  successors: int = 4) -> torch.Tensor:
    """A learnable token stream: a random sparse Markov chain over `states` token ids.

    Its entropy is at most ln(successors) nats per token, so the loss of a short run
    falls steeply from ln(vocab) and a loss curve says something (uniform random
    tokens would give a flat line at ln(vocab)).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=gen)[:states]
    nxt = torch.randint(0, states, (states, successors), generator=gen).tolist()
    cum = torch.softmax(torch.randn(states, successors, generator=gen) * 2, dim=-1).cumsum(-1).tolist()
    draws = torch.rand(n_tokens, generator=gen).tolist()
    out, state = [], 0
    for u in draws:
        out.append(state)
        row = cum[state]
        j = 0
        while j < successors - 1 and u > row[j]:
            j += 1
        state = nxt[state][j]
    return ids[torch.tensor(out)]


class WindowLoader:
    """Consecutive non-overlapping (input, target) windows of a token stream, resumable:
    the minimal `ResumableLoader` the trainer needs."""

    def __init__(self, tokens: torch.Tensor, batch: int, length: int) -> None:
        n_windows = (tokens.numel() - 1) // length
        self.batches = n_windows // batch
        if self.batches == 0:
            raise ValueError("token stream shorter than one batch")
        self.tokens, self.batch, self.length, self.position = tokens, batch, length, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.position < self.batches:
            start = self.position * self.batch * self.length
            rows = [self.tokens[start + r * self.length: start + (r + 1) * self.length + 1]
                    for r in range(self.batch)]
            self.position += 1
            window = torch.stack(rows)  # (batch, length + 1)
            yield window[:, :-1], window[:, 1:]
        self.position = 0  # next epoch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state.get("position", 0))


def loss_curve(settings: dict[str, Any], tokens: torch.Tensor, steps: int,
               seed: int = 1337) -> tuple[list[float], float, GPTModel]:
    """Train losses of a short `train()` run, its median tokens/s (first steps excluded)
    and the trained model.

    `seed` seeds the model's initialisation and the trainer (the data is the same)."""
    cfg = TrainConfig(
        seed=seed, micro_batch_size=BATCH, global_batch_size=BATCH, max_steps=steps,
        warmup_steps=max(1, steps // 5), lr=1e-3, min_lr=1e-4, eval_interval=steps, eval_batches=1,
        log_interval=1, resume="never", **settings,
    )
    split = int(tokens.numel() * 0.9)
    torch.manual_seed(seed)
    model = GPTModel.from_preset(PRESET, context_length=CONTEXT)
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-") as out_dir:
        result = train(model, cfg, WindowLoader(tokens[:split], BATCH, CONTEXT),
                       WindowLoader(tokens[split:], BATCH, CONTEXT), out_dir, progress=False,
                       max_length=CONTEXT)
    records = [r for r in result.history if r["kind"] == "train"]
    rates = [r["tokens_per_s"] for r in records[2:]] or [records[-1]["tokens_per_s"]]
    return [r["train_loss"] for r in records], statistics.median(rates), model


def bench_train(quick: bool, hw: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Training-step throughput per setting, MFU of the best, fp32-vs-best loss curves (issue 4)."""
    candidates = QUICK_CANDIDATES if quick else TRAIN_CANDIDATES
    rounds = 3 if quick else 7
    results = measure_train_steps(candidates, rounds=rounds, log=log)
    log(f"  the model `make run` trains: {RUN_PRESET}, context {RUN_CONTEXT}, batch {RUN_BATCH}")
    run_results = measure_train_steps(RUN_CANDIDATES, rounds=rounds, log=log,
                                      shape=(RUN_PRESET, RUN_CONTEXT, RUN_BATCH))
    model = GPTModel.from_preset(PRESET, context_length=CONTEXT)
    flops_token = results[0]["flops_per_token"]
    peaks = {p: hw.get(f"hw.{p}_matmul_gflops") or matmul_flops_per_s(
        torch.float32 if p == "fp32" else torch.bfloat16, CPU, size=2048) / 1e9 for p in ("fp32", "bf16")}

    def remeasure() -> dict[str, float]:
        remeasured = bench_hw(quick, repeats=8)
        return {p: remeasured[f"hw.{p}_matmul_gflops"] for p in peaks}

    peaks = set_mfus(results + run_results, peaks, remeasure, log)
    log("  MFU bounds: each matmul of a bf16 step alone, then the fused loss")
    bounds = {shape[0]: {name: round(value, 3) for name, value in mfu_bound(shape, peaks["bf16"],
                                                                             repeats=3 if quick else 8).items()}
              for shape in ((PRESET, CONTEXT, BATCH), (RUN_PRESET, RUN_CONTEXT, RUN_BATCH))}
    default = results[0]
    best = max(results, key=lambda r: r["tokens_per_s"])
    best_of = {p: max((r for r in results if r["settings"]["precision"] == p), key=lambda r: r["tokens_per_s"])
               for p in ("fp32", "bf16")}

    steps = 12 if quick else 40
    tokens = markov_tokens(BATCH * (CONTEXT + 1) * (steps + 4) * 10 // 9, model.cfg.vocab_size)
    log(f"  loss curves: {steps} steps of train() in fp32, in {best['name']}, and in fp32 from another seed")
    ref_losses, ref_rate, trained = loss_curve(default["settings"], tokens, steps)
    best_losses, best_rate, _ = loss_curve(best["settings"], tokens, steps)
    # The yardstick for "within noise": the same fp32 run from another initialisation.
    seed_losses, _, _ = loss_curve(default["settings"], tokens, steps, seed=1338)
    greedy_agreement = bf16_greedy_agreement(trained, tokens[None, :PROMPT_TOKENS])

    def rel_diffs(other: list[float]) -> list[float]:
        return [abs(a - b) / abs(a) for a, b in zip(ref_losses, other)]

    best_diff, seed_diff = rel_diffs(best_losses), rel_diffs(seed_losses)
    every = max(1, steps // 10)
    return {
        "train.tokens_per_s": default["tokens_per_s"],
        "train.best_tokens_per_s": best["tokens_per_s"],
        "train.best_settings": best["settings"],
        "train.speedup": round(best["tokens_per_s"] / default["tokens_per_s"], 2),
        "train.best_model_gflops": round(best["tokens_per_s"] * flops_token / 1e9, 1),
        "train.mfu_bf16": best_of["bf16"]["mfu"],
        "train.mfu_fp32": best_of["fp32"]["mfu"],
        "train.mfu_bound_bf16": bounds[PRESET],
        "train.flops_per_token": flops_token,
        "train.settings": {r["name"]: {k: r[k] for k in ("tokens_per_s", "best_of_tokens_per_s", "tokens_per_s_spread",
                                                         "mfu")}
                           for r in results},
        "train.bf16_loss_rel_diff": round(max(best_diff), 5),
        "train.bf16_loss_mean_rel_diff": round(statistics.mean(best_diff), 5),
        "train.seed_loss_rel_diff": round(max(seed_diff), 5),
        "train.seed_loss_mean_rel_diff": round(statistics.mean(seed_diff), 5),
        "train.loss_curves_match": (max(best_diff) <= max(seed_diff)
                                    and statistics.mean(best_diff) <= statistics.mean(seed_diff)),
        "train.loss_curve_steps": steps,
        "train.loss_curve_fp32": [round(v, 4) for v in ref_losses[every - 1::every]],
        "train.loss_curve_best": [round(v, 4) for v in best_losses[every - 1::every]],
        "train.loss_curve_fp32_seed2": [round(v, 4) for v in seed_losses[every - 1::every]],
        "sample.bf16_greedy_agreement": greedy_agreement,
        "train.run_model": f"{RUN_PRESET}, context {RUN_CONTEXT}, batch {RUN_BATCH}",
        "train.run_model_mfu_bf16": max(r["mfu"] for r in run_results),
        "train.run_model_mfu_bound_bf16": bounds[RUN_PRESET],
        "train.run_model_settings": {r["name"]: {k: r[k] for k in ("tokens_per_s", "tokens_per_s_spread", "mfu")}
                                     for r in run_results},
        "train.trainer_tokens_per_s": round(ref_rate, 1),
        "train.trainer_best_tokens_per_s": round(best_rate, 1),
    }


def bf16_greedy_agreement(model: GPTModel, prompt: torch.Tensor) -> float:
    """Share of `NEW_TOKENS` greedy tokens that a bf16 copy of `model` chooses as it does."""
    fp32 = generate(model, prompt, NEW_TOKENS)[0, prompt.shape[1]:]
    bf16 = generate(copy.deepcopy(model).to(torch.bfloat16), prompt, NEW_TOKENS)[0, prompt.shape[1]:]
    return round(float((fp32 == bf16).float().mean()), 3)


# --------------------------------------------------------------------------- data
_DATA_BENCH = """
import json, sys
from benchmarks.data import run_data_benchmarks
print(json.dumps(run_data_benchmarks(quick=sys.argv[1] == "1")))
"""


def bench_data(quick: bool) -> dict[str, Any]:
    """benchmarks.data's metrics, measured in a child process: the data stages run on
    glibc's default policy in the pipeline, and their memory target (tokenize.peak_rss_mb)
    must be measured that way too, not under `retain_freed_memory`."""
    # Run from the directory above this package, so the child imports it wherever we ran.
    proc = subprocess.run([sys.executable, "-c", _DATA_BENCH, "1" if quick else "0"],
                          stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"data benchmarks failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def environment() -> dict[str, Any]:
    return {
        "meta.torch": torch.__version__,
        "meta.threads": torch.get_num_threads(),
        "meta.cpu": _cpu_name(),
        "meta.python": platform.python_version(),
        "meta.allocator": loaded_allocator(),
        "meta.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# --------------------------------------------------------------------------- allocator
def loaded_allocator() -> str:
    """Which malloc this process runs on: a preloaded tcmalloc/jemalloc, else the system's."""
    with contextlib.suppress(OSError):
        maps = Path("/proc/self/maps").read_text()
        for name in ("tcmalloc", "jemalloc"):
            if f"lib{name}" in maps:
                return name
    return "system"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def print_table(results: dict[str, Any], out=sys.stdout) -> None:
    rows = [(k, v) for k, v in results.items() if k not in ("train.settings",) and not k.endswith("_by_shape")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {_fmt(value)}", file=out)
    settings = results.get("train.settings")
    if settings:
        print(f"\n{'train settings':<34}{'tokens/s':>10}{'best-of':>10}{'MFU':>8}", file=out)
        for name, r in settings.items():
            print(f"{name:<34}{r['tokens_per_s']:>10,.1f}{r['best_of_tokens_per_s']:>10,.1f}{r['mfu']:>8.3f}", file=out)
    for key in (k for k in results if k.endswith("_by_shape")):
        print(f"\n{key} (GFLOP/s): " + ", ".join(f"{s}={g}" for s, g in results[key].items()), file=out)


def merge_into(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Existing keys of `path` updated with `results`, written atomically."""
    merged: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            merged = json.loads(path.read_text())
    merged.update(results)
    write_json_atomic(path, merged)
    return merged


def run(sections: list[str], quick: bool = False, out: Path | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    retains_freed = retain_freed_memory()  # what train() does on CPU, before anything is allocated
    results: dict[str, Any] = {**environment(), "meta.malloc_retains_freed": retains_freed, "meta.quick": quick}
    existing: dict[str, Any] = {}
    if out is not None and out.exists():
        with contextlib.suppress(ValueError, OSError):
            existing = json.loads(out.read_text())
    for section in sections:
        start = time.perf_counter()
        log(f"[bench] {section} ...")
        if section == "hw":
            results.update(bench_hw(quick))
        elif section == "model":
            results.update(bench_model(quick))
        elif section == "train":
            # MFU needs the yardsticks: this run's, else the ones already in the report.
            results.update(bench_train(quick, {**existing, **results}, log=log))
        elif section == "data":
            results.update(bench_data(quick))
        log(f"[bench] {section} done in {time.perf_counter() - start:.0f} s")
        if out is not None:  # after every section, so a long run keeps what it measured
            merge_into(out, results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and settings, a smaller data corpus")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    parser.add_argument("--out", type=Path, default=Path("reports/bench.json"),
                        help="JSON report; existing keys of other sections are kept")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    results = run(sections, quick=args.quick, out=args.out)
    print()
    print_table(results)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
