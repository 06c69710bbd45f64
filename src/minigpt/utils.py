"""Small helpers shared by the library: seeding, device choice, the C allocator's policy.

File writing and hashing live in `minigpt.io`, which the torch-free data stages import."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch


def compiled(fn, **options):
    """`torch.compile(fn)` with inductor's cache under minigpt's cache directory
    (`~/.cache/minigpt/torchinductor` unless TORCHINDUCTOR_CACHE_DIR is set), which
    survives reboots unlike inductor's default in /tmp: a gpt2-tiny training step
    compiles in ~15 s the first time and ~4 s from that cache."""
    from minigpt.fetch import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
    return torch.compile(fn, **options)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers cuda, then mps, then cpu; `cpu`, `cuda`, `cuda:N` and `mps` are taken
    as given, after checking this machine has them (a ValueError says what is missing)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: this machine has no CUDA device (use auto or cpu)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), 0..{count - 1}")
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r}: MPS is not available here (use auto or cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for `precision="bf16"`, nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model.eval()` for the block, then back to whatever mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (which has mallopt and malloc_trim; musl and macOS do not)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step allocates and frees hundreds of MB of short-lived tensors (logits
    and their gradient, bf16 weight casts, embedding gradients). glibc serves each block
    over 32 MB with a fresh mmap and unmaps it on free, so the next step page-faults and
    zeroes it all again: on 2 cores that was 40% of a gpt2-tiny step spent in the kernel.
    With mmap off and trimming off, the heap keeps those blocks and the step runs ~1.6x
    faster; RSS no longer shrinks between steps, and fragmentation lets it creep up
    (~50 MB per 400 gpt2-tiny steps), so call `release_freed_memory` now and then.
    Returns whether the policy was applied (False off glibc, e.g. macOS or musl).
    """
    libc = _glibc()
    # mallopt returns 1 on success; both must hold or the policy is only half in force.
    return libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0)) & bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> None:
    """Give the pages of free heap memory back to the kernel once (glibc's malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
