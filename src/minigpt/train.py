"""Training loop: AdamW, warmup + cosine LR, clipping, accumulation, eval, checkpoints, DDP/FSDP.

Read `train()` top to bottom: build the optimizer, maybe resume, then loop
(`train_step` -> log -> evaluate -> checkpoint) until a budget ends. What is
minimised is a `LossFn`: language modelling by default; a finetuning task plugs
in its own (classification, masked instruction loss) and keeps everything else.
Resuming is exact: a checkpoint carries every RNG state, the data position and
the run's history, so `N/2 + resume + N/2` steps give bit-identical weights to
`N` steps on CPU, and the resumed run reports the whole curve.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minigpt.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint
from minigpt.config import TrainConfig
from minigpt.distributed import (DistContext, accumulating, all_reduce_mean, as_float, barrier, is_sharded,
                                 local_tensor, on_any_rank, wrap_model)
from minigpt.flops import flops_per_token, matmul_flops_per_s
from minigpt.model import GPTModel
from minigpt.modules import MultiHeadAttention
from minigpt.optim import Muon
from minigpt.sharded_checkpoint import (consolidate, is_sharded_checkpoint, last_checkpoint, load_consolidated,
                                       load_sharded, read_any_state, save_sharded, sharded_path)
from minigpt.utils import autocast_for, eval_mode, release_freed_memory, retain_freed_memory, seed_everything

Record = dict[str, Any]
# A callback sees each record on rank 0; what it returns, if not None, is a reason to stop (a
# search's pruner: "pruned"), and the loop then ends as at any budget, `last` saved.
Callback = Callable[[Record], str | None]
# (model or its DDP/compiled wrapper, one batch from the loader, device) -> mean loss of the batch
LossFn = Callable[[torch.nn.Module, Any, torch.device], torch.Tensor]


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


class ResumableLoader(Protocol):
    """What the trainer needs from a data loader (minigpt.data.create_dataloader gives one)."""

    def __iter__(self) -> Iterator[Any]: ...  # batches: the rest of the current epoch
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LanguageModelLoss:
    """Next-token cross-entropy of `(inputs, targets)` batches, both `(batch, seq)`."""

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size  # rows per chunk of the fused head + loss (losses.py)

    def __call__(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x, y = batch
        return model(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                     loss_chunk_size=self.chunk_size)


# --------------------------------------------------------------------------- optimizer
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine down to `min_lr`."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matmul weights only. Biases and LayerNorm gains are 1-D; embedding rows are
    updated only when their token appears, so decaying every row every step would
    shrink rare tokens toward zero (a tied head is the token embedding). Frozen
    parameters (finetuning) are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Muon's share of `model`: the 2-D weights inside the transformer blocks, each fused
    q/k/v projection as three matrices."""
    qkv = {id(m.qkv.weight) for m in model.modules() if isinstance(m, MultiHeadAttention)}
    matrices = [p for p in model.blocks.parameters() if p.dim() == 2 and p.requires_grad]
    groups = [{"params": [p for p in matrices if id(p) in qkv], "muon": True, "split": 3},
              {"params": [p for p in matrices if id(p) not in qkv], "muon": True}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # One fused kernel per parameter instead of a dozen multi-tensor passes: ~3x faster
    # optimizer steps on CPU too (PyTorch >= 2.4); MPS keeps the default path.
    fused = device.type in ("cuda", "cpu")
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, fused=fused)
    muon = muon_groups(model)
    taken = {id(p) for g in muon for p in g["params"]}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in taken]}
            for g in param_groups(model, cfg.weight_decay)]
    return Muon(muon + [g for g in rest if g["params"]], lr=cfg.lr, betas=betas,
                lr_scale=cfg.muon_lr / cfg.lr, momentum=cfg.muon_momentum, fused=fused)


# --------------------------------------------------------------------------- one step
def train_step(runner: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Any],
               loss_fn: LossFn, *, lr: float, accum_steps: int, precision: str, grad_clip: float | None,
               device: torch.device, ctx: DistContext = DistContext()) -> tuple[float, float]:
    """One optimizer step over `accum_steps` micro-batches; returns (mean loss, grad norm).

    `runner` is what `minigpt.distributed.wrap_model` returned: the model, compiled, under
    DDP (through which the forward must go for DDP to all-reduce gradients) or sharded.
    Raises `TrainingDiverged` without touching the weights when the loss or the gradient
    is not finite.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum_steps):
        # A DataLoader draws a seed from the global RNG whenever it starts an epoch, so a
        # run resumed mid-epoch would draw once more than the uninterrupted one and get
        # other dropout masks. Fetching under fork_rng keeps the loader off that RNG.
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        # Only the last micro-batch reduces gradients across ranks; the others just accumulate.
        sync = not ctx.enabled or micro == accum_steps - 1
        with contextlib.nullcontext() if sync else accumulating(runner):
            with autocast_for(device, precision):
                loss = loss_fn(runner, batch, device) / accum_steps
            loss.backward()
        loss_sum += loss.detach().float()
    grad_norm = as_float(torch.nn.utils.clip_grad_norm_(runner.parameters(), grad_clip or math.inf))
    loss_value = float(all_reduce_mean(loss_sum, ctx))
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"train loss is {loss_value}, grad norm {grad_norm}; "
                               f"stopped without applying the update")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: ResumableLoader, device: torch.device, precision: str = "fp32",
             max_batches: int | None = None, ctx: DistContext = DistContext(),
             loss_fn: LossFn = LanguageModelLoss()) -> float:
    """Mean loss over the first `max_batches` validation batches (the same ones every call)."""
    total = torch.zeros((), device=device)
    count = 0
    # A DataLoader draws a seed from the global RNG on every pass: under fork_rng, how often
    # we evaluate cannot change the dropout masks (so the losses) of the training run.
    with eval_mode(model), torch.random.fork_rng(devices=[]):
        for batch in loader:
            with autocast_for(device, precision):
                total += loss_fn(model, batch, device).float()
            count += 1
            if max_batches is not None and count >= max_batches:
                break  # before fetching a batch that would not be used
    if count == 0:
        raise ValueError("validation loader yielded no batch: the validation split is too small")
    return float(all_reduce_mean(total / count, ctx))


# --------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Counters that a checkpoint restores (model/optimizer/RNG travel beside them)."""

    step: int = 0
    tokens_seen: int = 0
    train_time: float = 0.0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    last_val_loss: float | None = None
    train_loader: dict[str, Any] = field(default_factory=dict)
    # Every record of the run so far, so a resumed (or already finished) run reports
    # the whole curve, not just the steps of its last execution.
    history: list[Record] = field(default_factory=list)

    def record_eval(self, val_loss: float, min_delta: float) -> bool:
        """Count an evaluation; True if it is the best so far (by more than `min_delta`)."""
        self.last_val_loss = val_loss
        improved = val_loss < self.best_val_loss - min_delta
        self.best_val_loss = val_loss if improved else self.best_val_loss
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        return improved

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainState:
        """The counters of a checkpoint's saved state (which also holds its `run_info` and
        the world size that saved it)."""
        return cls(**{k: v for k, v in saved.items() if k not in ("run_info", "world_size")})


@dataclass
class TrainResult:
    state: TrainState
    stop_reason: str
    last_checkpoint: Path
    best_checkpoint: Path | None
    history: list[Record]  # the whole run's records, those restored from a checkpoint included


def stop_reason(state: TrainState, cfg: TrainConfig, check_time: bool = True) -> str | None:
    """Why a run in `state` must not take another step under `cfg`, or None.

    Also answers, before any training, whether a saved run is already complete. The loop
    passes `check_time=False` and asks all DDP ranks about `max_time` together: each rank
    has its own clock, and one that stopped alone would leave the others waiting forever.
    """
    if cfg.patience is not None and state.evals_without_improvement >= cfg.patience:
        return "early_stopping"
    if state.step >= cfg.max_steps:
        return "max_steps"
    if cfg.max_tokens is not None and state.tokens_seen >= cfg.max_tokens:
        return "max_tokens"
    if check_time and cfg.max_time is not None and state.train_time >= cfg.max_time:
        return "max_time"
    return None


def _resume_path(cfg: TrainConfig, out_dir: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return last_checkpoint(out_dir)
    path = Path(cfg.resume)
    if not path.exists():
        raise CheckpointError(f"train.resume: checkpoint {path} does not exist")
    return path


def _restore(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: ResumableLoader,
             run_info: dict[str, Any], cfg: TrainConfig, ctx: DistContext) -> TrainState:
    """Load a checkpoint (a file, or an FSDP run's folder) into model, optimizer, RNG and
    loader; return its counters. Any checkpoint loads under any strategy and world size."""
    # Check the data from the header first, so a refused checkpoint leaves model and RNG untouched.
    saved_info = read_any_state(path).get("run_info", {})
    # Continuing on other data (the curves would lie) or from other base weights (a finetune's
    # adapters or weights belong to the model they started from).
    for key in ("data_sha256", "tokenizer_sha256", "init_sha256"):
        old, new = saved_info.get(key), run_info.get(key)
        if old and new and old != new:
            raise CheckpointError(f"checkpoint {path}: trained with {key}={old[:12]}…, this run has {new[:12]}…")
    if is_sharded_checkpoint(path):
        saved, own_rng = load_sharded(path, model, optimizer, ctx, restore_rng=True)
    elif is_sharded(model):
        saved, own_rng = load_consolidated(path, model, optimizer, ctx, restore_rng=True)
    else:
        saved = load_checkpoint(path, model, optimizer, restore_rng=True, rank=ctx.rank)
        own_rng = ctx.rank == 0 or saved.get("world_size") == ctx.world_size
    state = TrainState.from_saved(saved)
    if not own_rng:
        # Saved at another world size: this rank would draw another rank's dropout masks.
        # Give each its own stream again (exact resume holds at the world size of the save).
        seed_everything(cfg.seed + ctx.rank + ctx.world_size * state.step)
    loader.load_state_dict(state.train_loader)
    return state


class _Checkpoints:
    """`last` and `best` in `out_dir`, never with non-finite weights: the last good checkpoint
    survives a diverged run. One process and DDP: `last.safetensors` and `best.safetensors`,
    written by rank 0 with every rank's RNG. FSDP: `last.dcp/`, each rank writing its shard,
    consolidated into `last.safetensors` when training ends; `best.safetensors` holds the
    weights alone, gathered to rank 0 (what evaluation reads; no run resumes from it)."""

    def __init__(self, out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loader: ResumableLoader, run_info: dict[str, Any], ctx: DistContext, saved_at: int) -> None:
        self.last, self.best = out_dir / "last.safetensors", out_dir / "best.safetensors"
        self.model, self.optimizer, self.loader, self.run_info, self.ctx = model, optimizer, loader, run_info, ctx
        self.sharded = is_sharded(model)
        self.last_saved_at = saved_at  # the step `last` holds

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        """The error for a run gone NaN/inf. Nothing non-finite is ever saved, so `last` is good."""
        last = last_checkpoint(self.last.parent)
        kept = f"Last good checkpoint: {last}" if last else "No checkpoint was written yet"
        return TrainingDiverged(f"step {step}: {what}. {kept}. Try a lower train.lr or train.grad_clip.")

    def _saved_state(self, state: TrainState) -> dict[str, Any]:
        state.train_loader = self.loader.state_dict()
        return {**state.__dict__, "run_info": self.run_info, "world_size": self.ctx.world_size}

    def save(self, path: Path, state: TrainState) -> None:
        # Finite losses do not imply finite weights: the update after the last checked loss
        # can overflow. A checkpoint of such weights must not replace the last good one.
        finite = bool(torch.stack([torch.isfinite(local_tensor(p)).all() for p in self.model.parameters()]).all())
        if on_any_rank(not finite, self.ctx, next(self.model.parameters()).device):
            raise self.diverged(state.step, "the weights hold NaN/inf after the update")
        saved = self._saved_state(state)
        if path == self.last:
            self.last_saved_at = state.step
        if self.sharded:
            if path == self.last:
                save_sharded(sharded_path(path), self.model, self.optimizer, saved, self.ctx)
            else:
                consolidate(path, self.model, None, saved, self.ctx)
            return
        rngs = None
        if self.ctx.enabled:
            rngs = [None] * self.ctx.world_size
            dist.all_gather_object(rngs, rng_state())  # each rank's, so each resumes its own masks
        if self.ctx.is_main:
            save_checkpoint(path, self.model, self.optimizer, saved, rngs)
            if path == self.last:  # an FSDP run's folder, killed before it ended, is now older
                shutil.rmtree(sharded_path(path), ignore_errors=True)

    def finish(self, state: TrainState) -> None:
        """The sharded `last` as the one file every later stage reads (a collective)."""
        if not self.sharded:
            return
        consolidate(self.last, self.model, self.optimizer, self._saved_state(state), self.ctx)
        barrier(self.ctx)
        if self.ctx.is_main:
            shutil.rmtree(sharded_path(self.last), ignore_errors=True)  # the file holds the same step


# --------------------------------------------------------------------------- loop
def train(
    model: GPTModel,
    cfg: TrainConfig,
    train_loader: ResumableLoader,
    val_loader: ResumableLoader,
    out_dir: str | Path,
    *,
    loss_fn: LossFn | None = None,
    eval_metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    callbacks: tuple[Callback, ...] = (),
    run_info: dict[str, Any] | None = None,
    device: torch.device | None = None,
    ctx: DistContext = DistContext(),
    max_length: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` until `max_steps`/`max_tokens`/`max_time` or early stopping.

    Writes `last.safetensors` (every `checkpoint_interval` steps and at the end) and
    `best.safetensors` (lowest validation loss) into `out_dir`, from rank 0 only.
    Each new record (`kind` = "train" or "eval") is passed to every callback on rank 0; a
    reason one returns after an evaluation ends the run there, like a budget (`stop_reason`);
    `eval_metrics(model)` adds a task's own numbers (e.g. val accuracy) to each eval record.
    On CPU it switches the process's malloc to keep freed memory (`retain_freed_memory`).
    """
    out_dir, run_info = Path(out_dir), run_info or {}
    device = device or next(model.parameters()).device
    if device.type == "cpu":
        retain_freed_memory()  # process-wide; see its docstring for the 1.6x
    model.to(device)
    loss_fn = loss_fn or LanguageModelLoss(cfg.loss_chunk_size)
    accum_steps = cfg.global_batch_size // (cfg.micro_batch_size * ctx.world_size)
    if accum_steps * cfg.micro_batch_size * ctx.world_size != cfg.global_batch_size:
        raise ValueError(
            f"train.global_batch_size: {cfg.global_batch_size} is not a multiple of "
            f"micro_batch_size ({cfg.micro_batch_size}) x processes ({ctx.world_size})"
        )

    runner = wrap_model(model, cfg, ctx, device)  # FSDP shards `model` in place: before the optimizer
    optimizer = build_optimizer(model, cfg, device)
    seed_everything(cfg.seed + ctx.rank)  # dropout masks differ per rank, as they should
    resume_from = _resume_path(cfg, out_dir)
    state = TrainState() if resume_from is None else _restore(
        resume_from, model, optimizer, train_loader, run_info, cfg, ctx)

    seq_len = max_length or model.cfg.context_length
    tokens_per_step = cfg.global_batch_size * seq_len
    flops_token = flops_per_token(model, seq_len)
    peak_flops = matmul_flops_per_s(torch.bfloat16 if cfg.precision == "bf16" else torch.float32, device)
    checkpoint_interval = cfg.checkpoint_interval or cfg.eval_interval
    # `eval_batches` counts batches of the whole evaluation, shared out between the ranks: each
    # rank's loader serves every world_size-th window, so 2 ranks x eval_batches/2 score the same
    # windows as one process x eval_batches, and val loss (so best/early stopping) does not
    # depend on the number of processes.
    eval_batches = None if cfg.eval_batches is None else math.ceil(cfg.eval_batches / ctx.world_size)
    checkpoints = _Checkpoints(out_dir, model, optimizer, train_loader, run_info, ctx, saved_at=state.step)

    def emit(record: Record) -> str | None:
        """Hand `record` to the callbacks (rank 0); the reason to stop that one of them gave."""
        stop = None
        if ctx.is_main:
            state.history.append(record)
            for callback in callbacks:
                stop = callback(record) or stop
        return stop

    batches = _endless(train_loader)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step",
               disable=not (progress and ctx.is_main), dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    try:  # the bar ends its line on any error, so the error message starts on its own
        while True:
            reason = stop_reason(state, cfg, check_time=False)  # the same on every rank
            if cfg.max_time is not None:  # every rank stops at the same step
                reason = reason or ("max_time" if on_any_rank(state.train_time >= cfg.max_time, ctx, device) else None)
            if reason is not None:
                break

            step_start = time.perf_counter()
            lr = lr_at(state.step, cfg)
            try:
                loss, grad_norm = train_step(runner, optimizer, batches, loss_fn, lr=lr, accum_steps=accum_steps,
                                             precision=cfg.precision, grad_clip=cfg.grad_clip, device=device, ctx=ctx)
            except TrainingDiverged as err:
                raise checkpoints.diverged(state.step + 1, str(err)) from None
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.train_time += time.perf_counter() - step_start
            window_tokens += tokens_per_step
            bar.update(1)

            if state.step % cfg.log_interval == 0 or state.step == cfg.max_steps:
                tokens_per_s = window_tokens / (time.perf_counter() - window_start)
                emit({"kind": "train", "step": state.step, "tokens": state.tokens_seen, "train_loss": loss,
                      "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                      "mfu": tokens_per_s * flops_token / peak_flops})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_tokens = time.perf_counter(), 0

            if state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps:
                val_loss = evaluate(model, val_loader, device, cfg.precision, eval_batches, ctx, loss_fn)
                if device.type == "cpu":
                    release_freed_memory()  # bounds the creep of a heap that never trims itself
                if not math.isfinite(val_loss):  # these weights are broken: stop before saving them
                    raise checkpoints.diverged(state.step, f"validation loss is {val_loss}")
                improved = state.record_eval(val_loss, cfg.min_delta)
                extra = _task_metrics(eval_metrics, model) if eval_metrics else {}
                requested = emit({"kind": "eval", "step": state.step, "tokens": state.tokens_seen, "val_loss": val_loss,
                      "val_perplexity": math.exp(min(val_loss, 50.0)), "best_val_loss": state.best_val_loss,
                      **extra})
                if improved:
                    checkpoints.save(checkpoints.best, state)
                # The timer restarts so evaluation time does not count against tokens/s.
                window_start, window_tokens = time.perf_counter(), 0
                # Only rank 0 runs callbacks. A run at its budget ends for that reason, whatever a
                # callback says at its last evaluation: it trained all it was meant to.
                if on_any_rank(requested is not None, ctx, device) and stop_reason(state, cfg, False) is None:
                    reason = requested or "stopped_by_rank_0"
                    break

            if state.step % checkpoint_interval == 0:
                checkpoints.save(checkpoints.last, state)
        if checkpoints.last_saved_at != state.step or last_checkpoint(out_dir) is None:
            checkpoints.save(checkpoints.last, state)
        checkpoints.finish(state)
    finally:
        bar.close()
    barrier(ctx)
    best = checkpoints.best if checkpoints.best.exists() else None
    return TrainResult(state, reason, checkpoints.last, best, state.history)


def _task_metrics(eval_metrics: Callable[[torch.nn.Module], dict[str, float]],
                  model: torch.nn.Module) -> dict[str, float]:
    # In eval mode and off the global RNG (a DataLoader pass draws from it), like `evaluate`.
    with eval_mode(model), torch.random.fork_rng(devices=[]), torch.no_grad():
        return eval_metrics(model)


def _endless(loader: ResumableLoader) -> Iterator[Any]:
    """Batches across epochs: each `iter(loader)` serves the rest of the current epoch.

    One empty pass is normal (a run resumed exactly at an epoch's end); two in a row
    mean the split holds less than one batch.
    """
    empty_passes = 0
    while empty_passes < 2:
        empty_passes += 1
        for batch in loader:
            empty_passes = 0
            yield batch
    raise ValueError("training loader yielded no batch: the training split is smaller than one batch")
