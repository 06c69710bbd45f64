"""Checkpoints of a sharded (FSDP) run: a directory that each process writes its shard into.

`last.dcp/` (and `best.dcp/`) beside where `last.safetensors` goes:
    .metadata, __<rank>_0.distcp   torch.distributed.checkpoint (DCP): model and optimizer
                                   state, keyed by parameter name, sharded as trained
    rng.rank<R>.safetensors        each process's RNG states (each rank has its own dropout masks)
    state.json                     the run's counters and info, the world size, each file's sha256
No process ever holds the whole model to save it: that is the point of sharding. The
directory is committed atomically (`minigpt.io.atomic_dir`, entered by rank 0 and named to
the others), so a kill mid-save leaves the previous checkpoint and a temporary folder that the
next start removes. DCP reshards on load: a checkpoint of 2 processes loads into 1 (a plain
model: the weights come back whole) or into another world size. Exact resume needs the same
world size, where every rank gets its own RNG back.

`consolidate` gathers a sharded model and optimizer into the one safetensors checkpoint
(`minigpt.checkpoint`) that evaluate, sample, serving and export read.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

from minigpt.checkpoint import (CheckpointError, optimizer_state, read_checkpoint, read_checkpoint_state,
                                restore_rank_rng, rng_state,
                                set_rng_state, tied_aliases, write_checkpoint)
from minigpt.distributed import DistContext, barrier
from minigpt.io import atomic_dir, sha256_file, write_json_atomic

FORMAT = "minigpt-sharded-checkpoint"
VERSION = "1"
SUFFIX = ".dcp"


def sharded_path(path: Path) -> Path:
    """Where the sharded form of checkpoint `path` lives: `last.safetensors` -> `last.dcp`."""
    return Path(path).with_suffix(SUFFIX)


def is_sharded_checkpoint(path: Path) -> bool:
    return Path(path).suffix == SUFFIX


def last_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint a run in `out_dir` continues from: a sharded `last.dcp` (newer: an FSDP
    run consolidates it into the file and removes it when it ends), else `last.safetensors`."""
    for path in (Path(out_dir) / f"last{SUFFIX}", Path(out_dir) / "last.safetensors"):
        if path.exists():
            return path
    return None


def read_any_state(path: Path, verify: bool = False) -> dict[str, Any]:
    """The saved state (step, run info, ...) of a checkpoint file or sharded folder, from its
    header alone; with `verify`, after checking the whole of it against its sha256."""
    if is_sharded_checkpoint(path):
        return read_sharded_state(path, verify)["state"]
    return read_checkpoint_state(path, verify)


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state: dict[str, Any], ctx: DistContext) -> None:
    """Every rank writes its shard of model and optimizer, and its RNG, into directory `path`
    (a collective: all ranks call it). `state` (JSON-able) is rank 0's."""
    with atomic_dir(path) if ctx.is_main else contextlib.nullcontext() as tmp:
        names = [str(tmp)]
        if ctx.enabled:
            dist.broadcast_object_list(names, src=0)  # the temporary folder rank 0 made
        tmp = Path(names[0])
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / f"rng.rank{ctx.rank}.safetensors"), metadata={"rng": json.dumps(rng_meta)})
        barrier(ctx)  # every shard is on disk before rank 0 hashes and commits them
        if ctx.is_main:
            files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
            write_json_atomic(tmp / "state.json", {"format": FORMAT, "version": VERSION,
                                                   "world_size": ctx.world_size, "state": state, "sha256": files})
    barrier(ctx)  # committed before any rank goes on (and perhaps reads it)


def read_sharded_state(path: Path, verify: bool = False) -> dict[str, Any]:
    """`state.json` of sharded checkpoint `path`; with `verify`, only after checking every
    file against the sha256 it lists (a shard missing or changed is a corrupted checkpoint)."""
    path = Path(path)
    try:
        header = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: no readable state.json ({err})") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: not a minigpt sharded checkpoint of version {VERSION} "
                              f"(format={header.get('format')!r}, version={header.get('version')!r})")
    if verify:
        for name, digest in header["sha256"].items():
            file = path / name
            if not file.is_file() or sha256_file(file) != digest:
                raise CheckpointError(f"checkpoint {path}: {name} is missing or does not match its sha256")
    return header


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 ctx: DistContext = DistContext(), restore_rng: bool = False) -> tuple[dict[str, Any], bool]:
    """Load sharded checkpoint `path` into `model` (sharded or not: DCP reshards) and `optimizer`.

    Returns (the saved state, whether this rank's RNG was restored: only at the world size
    it was saved with). With a process group, all ranks call it together."""
    header = read_sharded_state(path, verify=True)
    try:
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
            _load(state, path)
            set_model_state_dict(model, state["model"])
        else:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            _load(state, path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (RuntimeError, ValueError, KeyError) as err:  # another model's shapes or names
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: does not fit this model ({first})") from None
    same_world = header["world_size"] == ctx.world_size
    if restore_rng and same_world:
        rng_file = path / f"rng.rank{ctx.rank}.safetensors"
        with safe_open(str(rng_file), framework="pt") as f:
            meta = json.loads(f.metadata()["rng"])
        set_rng_state(load_file(str(rng_file)), meta)
    return header["state"], restore_rng and same_world


def _load(state: dict[str, Any], path: Path) -> None:
    """`dcp.load` in place; in one process without a group (resuming 2 -> 1) that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(path))


def consolidate(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                state: dict[str, Any], ctx: DistContext) -> None:
    """Write the safetensors checkpoint `path` of a sharded model (and optimizer): the full
    tensors are gathered to rank 0's CPU memory, which alone writes (a collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    if not ctx.is_main:
        return
    # A tied head is the token embedding: stored once, as an unsharded model's checkpoint does.
    weights = {k: v for k, v in weights.items() if k not in tied_aliases(model)}
    optim_state = groups = None
    if optim is not None:
        # DCP keys the optimizer by parameter name; a torch optimizer's state_dict numbers the
        # parameters in the order its groups list them, which is what the checkpoint stores.
        order = [name for group in optim["param_groups"] for name in group["params"]]
        index = {name: i for i, name in enumerate(order)}
        optim_state = {index[name]: values for name, values in optim["state"].items()}
        groups = [{**group, "params": [index[n] for n in group["params"]]} for group in optim["param_groups"]]
    write_checkpoint(path, weights, optim_state, groups, state)


def load_consolidated(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                      ctx: DistContext = DistContext(), restore_rng: bool = False) -> tuple[dict[str, Any], bool]:
    """Load a safetensors checkpoint (one process's, DDP's or a consolidated one) into a sharded
    `model` and its `optimizer`: each rank reads the file and keeps its shards. Returns like
    `load_sharded` (the RNG comes back where the file holds this rank's)."""
    tensors, metadata = read_checkpoint(path)
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = set(get_model_state_dict(model)) - tied_aliases(model)
    if set(weights) != expected:
        raise CheckpointError(f"checkpoint {path}: does not fit this model (missing {sorted(expected - set(weights))}, "
                              f"unexpected {sorted(set(weights) - expected)})")
    full = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: the tied alias is absent
    try:
        set_model_state_dict(model, weights, options=full)
        if optimizer is not None:
            saved = optimizer_state(path, tensors, metadata)
            order = [name for group in get_optimizer_state_dict(model, optimizer)["param_groups"]
                     for name in group["params"]]
            named = {"state": {order[pid]: values for pid, values in saved["state"].items()},
                     "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
            set_optimizer_state_dict(model, optimizer, named, options=full)
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: does not fit this model ({first})") from None
    state = json.loads(metadata["state"])
    restored = restore_rng and state.get("world_size", 1) == ctx.world_size and restore_rank_rng(
        tensors, metadata, ctx.rank)
    return state, restored
