"""The data wing: raw text -> document tables -> token shards -> training batches.

    documents  the document table format, its writer and reader, strict UTF-8
    sources    the prepare stage: corpus sources read into a document table (`acquire`)
    split      the split stage: train/validation tables and their manifest
    shards     the tokenize stage's shard format, `tokenize_split`, and the shard reader
    loader     windows over shards and the resumable, DDP-aware data loader (torch)

    task_sources  finetuning tables: a pinned PyPI member, a pinned URL (or .zip member), a file
    tasks         classification / instruction splits (dedup, balance, stratify) and their tokens

Only `loader` needs torch, and the data stages must not pay for importing it, so
this package imports nothing eagerly: the stages import the submodule they use, and
`from minigpt.data import create_dataloader` loads `loader` on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_LOADER_NAMES = ("ResumableDataLoader", "TokenDataset", "WindowBatchSampler", "create_dataloader")


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        return getattr(importlib.import_module("minigpt.data.loader"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
