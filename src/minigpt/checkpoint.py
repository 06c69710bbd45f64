"""Training checkpoints as one safetensors file: tensors plus JSON metadata, never pickle.

Everything a bit-exact resume needs travels together: model weights, AdamW moments,
step counters, RNG states, the data loader position, the resolved config and the
fingerprints of the data it was trained on. One file means one atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minigpt.io import atomic_path, remove_stale_temp_files

FORMAT = "minigpt-checkpoint"
VERSION = "2"  # 2: the payload sha256 also covers the metadata (step, optimizer groups, RNG)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, foreign or incompatible."""


# --------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All RNG states: tensors (torch CPU/CUDA) and JSON-able ones (python, numpy)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))


# --------------------------------------------------------------------------- payload hash
def _payload_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, raw bytes) and every metadata entry,
    so a flipped bit anywhere is caught on load: in the weights, but also in the step,
    the optimizer's lr or the RNG state, which safetensors itself stores unchecked."""
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != "payload_sha256":
            digest.update(f"{key}\0{metadata[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- save / load
def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another one under a second name (a tied head)."""
    first = {id(p): name for name, p in model.named_parameters()}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != name}


def checkpointed_names(model: torch.nn.Module) -> set[str] | None:
    """The tensors a checkpoint of `model` holds, when not all of them: only the trainable ones
    of a model that says its frozen weights live in a checkpoint of their own (LoRA adapters
    on a base, `tasks.lora`); None for all."""
    if not getattr(model, "checkpoint_trainable_only", False):
        return None
    return {name for name, p in model.named_parameters() if p.requires_grad}


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Model weights without aliases (a tied head is the embedding under a second name), and
    without a base's frozen weights where `checkpointed_names` says so."""
    aliases, only = tied_aliases(model), checkpointed_names(model)
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()
            if name not in aliases and (only is None or name in only)}


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], rank_rngs: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
                    ) -> None:
    """Write model, optimizer, RNG and `state` (JSON-able) atomically to `path`.

    `rank_rngs`: every DDP rank's `rng_state()` (rank 0's first), so that each rank of a
    resumed run gets its own dropout masks back; without it, this process's RNG is saved."""
    osd = optimizer.state_dict() if optimizer is not None else None
    write_checkpoint(path, model_tensors(model), osd and osd["state"], osd and osd["param_groups"], state, rank_rngs)


def write_checkpoint(path: str | Path, weights: dict[str, torch.Tensor],
                     optim_state: dict[int, dict[str, torch.Tensor]] | None, optim_groups: list[dict] | None,
                     state: dict[str, Any],
                     rank_rngs: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> None:
    """`save_checkpoint` from tensors: weights by name, the optimizer as a torch `state_dict`
    numbers it (state per parameter index, groups listing indices)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
    for pid, pstate in (optim_state or {}).items():
        for key, value in pstate.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    rngs = rank_rngs or [rng_state()]
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "state": json.dumps(state),
        "optimizer_param_groups": json.dumps(optim_groups),
        "rng": json.dumps(rngs[0][1]),
    }
    tensors.update(rngs[0][0])
    for rank, (rng_tensors, rng_meta) in enumerate(rngs[1:], start=1):
        tensors.update({f"rng.rank{rank}.{k.removeprefix('rng.')}": v for k, v in rng_tensors.items()})
        metadata[f"rng.rank{rank}"] = json.dumps(rng_meta)
    metadata["payload_sha256"] = _payload_digest(tensors, metadata)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except (SafetensorError, OSError) as err:  # a full disk, a read-only folder
        raise CheckpointError(f"checkpoint {path}: could not be written ({err}); left as it was") from None


# safetensors' writer goes through its own temporary file (`.tmp` + 6 characters) in the
# target's folder, beside the one `atomic_path` makes.
_SAFETENSORS_TEMP = re.compile(r"^\.tmp[0-9A-Za-z]{6}$")


def remove_partial_checkpoints(directory: str | Path) -> list[Path]:
    """Delete what checkpoint writes killed mid-way left in `directory` (both writers'
    temporary files); call it before training writes there. Returns what was removed."""
    removed = remove_stale_temp_files(directory)
    if Path(directory).is_dir():
        for entry in Path(directory).iterdir():
            if _SAFETENSORS_TEMP.match(entry.name) and entry.is_file():
                entry.unlink()
                removed.append(entry)
    return removed


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a verified checkpoint, or a `CheckpointError` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({err})") from None
    _check_format(path, metadata)
    if _payload_digest(tensors, metadata) != metadata.get("payload_sha256"):
        raise CheckpointError(f"checkpoint {path}: contents do not match their sha256 (corrupted file)")
    return tensors, metadata


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = False, rank: int = 0) -> dict[str, Any]:
    """Load weights (and optionally optimizer and RNG state) into place; return the saved `state`.

    With `restore_rng`, the RNG that DDP rank `rank` saved, where the checkpoint holds it
    (`state["world_size"]` says how many ranks saved theirs)."""
    tensors, metadata = read_checkpoint(path)
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatch: a checkpoint of another model size
        raise CheckpointError(f"checkpoint {path}: does not fit this model ({str(err).splitlines()[-1].strip()})") from None
    only = checkpointed_names(model)
    aliased = {n for n in missing if _is_alias(model, n, weights) or (only is not None and n not in only)}
    if set(missing) - aliased or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: does not fit this model (missing {sorted(set(missing) - aliased)}, "
            f"unexpected {sorted(unexpected)})"
        )
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state(path, tensors, metadata))
    if restore_rng:
        restore_rank_rng(tensors, metadata, rank)
    return json.loads(metadata["state"])


def optimizer_state(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """The optimizer `state_dict` a checkpoint holds (parameters numbered as torch does)."""
    groups = json.loads(metadata["optimizer_param_groups"])
    if groups is None:
        raise CheckpointError(f"checkpoint {path}: holds no optimizer state")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            per_param.setdefault(int(pid), {})[name] = value
    return {"state": per_param, "param_groups": groups}


def restore_rank_rng(tensors: dict[str, torch.Tensor], metadata: dict[str, str], rank: int = 0) -> bool:
    """Set this process's RNG to what `rank` saved; False (nothing set) if it saved none."""
    if rank == 0:
        set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.") and not k.startswith("rng.rank")},
                      json.loads(metadata["rng"]))
        return True
    prefix = f"rng.rank{rank}."
    if f"rng.rank{rank}" not in metadata:
        return False
    set_rng_state({"rng." + k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
                  json.loads(metadata[f"rng.rank{rank}"]))
    return True


def _is_alias(model: torch.nn.Module, name: str, weights: dict[str, torch.Tensor]) -> bool:
    """True if parameter `name` shares storage with one that the checkpoint does hold."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    return any(params[name] is params.get(other) for other in weights)


def read_checkpoint_state(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """The saved `state` (step, run info, ...) from the header alone, without loading tensors;
    with `verify`, only after checking the whole file against its sha256.

    For deciding whether to resume; `load_checkpoint` still verifies the whole file.
    """
    from safetensors import safe_open

    if verify:
        read_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({err})") from None
    _check_format(path, metadata)
    try:
        return json.loads(metadata["state"])
    except (KeyError, json.JSONDecodeError) as err:  # unverified header: a corrupted file says so
        raise CheckpointError(f"checkpoint {path}: unreadable state in the header ({err!r})") from None


def _check_format(path: str | Path, metadata: dict[str, str]) -> None:
    """Ours, and of this version: an older layout would be misread, not resumed."""
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a minigpt checkpoint (format={metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {metadata.get('version')!r}, expected {VERSION!r}")
