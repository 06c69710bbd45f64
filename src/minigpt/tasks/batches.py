"""Batches of tokenized task rows: right-padding, and the resumable loader both tasks share.

A finetuning split is a few thousand short rows (dicts of token-id lists, as the data
stage writes them to jsonl), so the rows themselves, a plain list, are the dataset:
item i is row i, and a task's collate function turns a list of rows into tensors.
The batches come from the pretraining loader's `WindowBatchSampler` (a seeded
permutation per epoch, split between DDP ranks) inside a `ResumableDataLoader`, so a
finetune run saves and restores its data position exactly like pretraining does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from minigpt.data.loader import ResumableDataLoader, WindowBatchSampler
from minigpt.io import DataError

Row = Mapping[str, Any]


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Token ids `(batch, longest)`: each sequence followed by `pad_id` up to the longest one."""
    longest = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)  # (batch, longest)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)  # (len(seq),)
    return ids


def create_task_loader(
    rows: Sequence[Row],
    batch_size: int,
    collate: Callable[[list[Row]], Any],
    *,
    train: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> ResumableDataLoader:
    """Batches of `collate(rows of one batch)`, resumable via `state_dict()`.

    train=True: a new seeded permutation every epoch, the incomplete last batch
    dropped (every step sees `batch_size` rows). train=False: one fixed seeded order,
    every row served, the same at each evaluation. Under DDP pass `rank`/`world_size`.
    """
    sampler = WindowBatchSampler(len(rows), batch_size, seed=seed, drop_last=train, rank=rank,
                                 world_size=world_size)
    if len(sampler) == 0:
        per_rank = batch_size if train else 1  # evaluation keeps a partial batch
        raise DataError(f"{len(rows)} rows, but one batch needs {per_rank} row(s) on each of "
                        f"{world_size} rank(s): use more data or a smaller batch size")
    return ResumableDataLoader(list(rows), sampler, train=train, num_workers=num_workers, collate_fn=collate)
