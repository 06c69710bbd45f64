"""(input, target) batches from token shards: a windowed dataset and a resumable loader.

`TokenDataset` reads windows straight from memory-mapped shards, so a corpus of
any size costs a few MB of RAM (a list of window tensors would need ~5 KB per
window). `create_dataloader` wraps it in a `torch.utils.data.DataLoader` whose
sampler draws a seeded permutation per epoch, splits it between DDP ranks and
can be saved and restored mid-epoch: a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from minigpt.data.shards import load_manifest, open_shards
from minigpt.io import DataError

__all__ = [
    "ResumableDataLoader",
    "TokenDataset",
    "WindowBatchSampler",
    "create_dataloader",
]


class TokenDataset(Dataset):
    """Windows of `max_length + 1` tokens starting every `stride` tokens of a split.

    Item i is (input, target) = (tokens[s : s + max_length], tokens[s + 1 : s + max_length + 1])
    with s = i * stride: the target is the input shifted by one. The split's shards
    form one token stream, so a window may span two shards. With `vocab_size` (the
    model's), shards whose tokenizer has more ids are refused up front.
    """

    def __init__(
        self, shard_dir: str | Path, max_length: int, stride: int | None = None, vocab_size: int | None = None
    ) -> None:
        self.shard_dir = Path(shard_dir)
        self.max_length = max_length
        self.stride = stride if stride is not None else max_length
        if max_length < 1 or self.stride < 1:
            raise DataError(
                f"data.max_length and data.stride must be >= 1, got {max_length} and {self.stride}"
            )
        counts = [entry["tokens"] for entry in load_manifest(self.shard_dir)["shards"]]
        self._offsets = np.cumsum([0, *counts])  # where each shard starts in the stream
        self.num_tokens = int(self._offsets[-1])
        if self.num_tokens < max_length + 1:
            raise DataError(
                f"{self.shard_dir}: {self.num_tokens} tokens, but one window needs max_length + 1 = "
                f"{max_length + 1}; use more text (or a larger val_fraction) or a smaller max_length"
            )
        self._shards: list[np.ndarray] | None = open_shards(self.shard_dir, vocab_size)  # checks headers now

    def __len__(self) -> int:
        return (self.num_tokens - self.max_length - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.stride
        window = torch.from_numpy(self._read(start, start + self.max_length + 1).astype(np.int64))
        return window[:-1], window[1:]  # (max_length,), (max_length,)

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream, copied out of the shard(s) holding them."""
        if self._shards is None:  # first use in a worker process
            self._shards = open_shards(self.shard_dir)
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            local = start - int(self._offsets[shard])
            piece = self._shards[shard][local : local + stop - start]
            pieces.append(piece)
            start += len(piece)
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getstate__(self) -> dict:
        # Pickling a memmap copies its data; workers reopen the files instead.
        return {**self.__dict__, "_shards": None}


class WindowBatchSampler(Sampler[list[int]]):
    """Batches of window indices for one DDP rank; resumable at any batch.

    Each epoch every rank draws the same permutation of all windows, seeded by
    (seed, epoch), trims it to a multiple of world_size and takes every
    world_size-th window from position `rank`: ranks get disjoint windows and the
    same number of batches (unequal counts would hang DDP's collectives).
    `epoch` and `position` (batches already consumed this epoch) are the state.
    """

    def __init__(
        self,
        num_windows: int,
        batch_size: int,
        *,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise DataError(f"data.batch_size: must be >= 1, got {batch_size}")
        self.num_windows, self.batch_size, self.seed = num_windows, batch_size, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        self.position = 0

    @property
    def windows_per_rank(self) -> int:
        return self.num_windows // self.world_size

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.windows_per_rank // self.batch_size
        return math.ceil(self.windows_per_rank / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`, in the order they are served."""
        # int32 where it fits: halves the permutation's memory for stride-1 datasets.
        dtype = np.int32 if self.num_windows < 2**31 else np.int64
        permutation = np.arange(self.num_windows, dtype=dtype)
        np.random.default_rng([self.seed, epoch]).shuffle(permutation)
        return permutation[: self.windows_per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        # Read the state now, not lazily: the loader advances it while batches are consumed.
        order, size = self.order(self.epoch), self.batch_size
        stop = len(self) * size if self.drop_last else len(order)
        return (order[i : i + size].tolist() for i in range(self.position * size, stop, size))


class ResumableDataLoader(DataLoader):
    """A DataLoader that knows how many batches it has handed out.

    It counts batches delivered to the caller (not those its workers have
    prefetched), so `state_dict()` saved after a training step restores to the
    very next batch. A training loader moves to the next epoch (a new
    permutation) after its last batch; an evaluation loader serves the same
    fixed order from the start every time it is iterated.
    """

    def __init__(
        self, dataset: Dataset, batch_sampler: WindowBatchSampler, *, train: bool, num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ):
        # collate_fn: how a finetuning task turns its rows into a batch (None: stack the items).
        super().__init__(
            dataset, batch_sampler=batch_sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
            collate_fn=collate_fn,
        )
        self.train = train

    def __iter__(self) -> Iterator[Any]:
        sampler = self.batch_sampler
        if not self.train:
            sampler.epoch = sampler.position = 0
        for batch in super().__iter__():  # e.g. (batch, max_length) inputs and targets
            if self.train:
                sampler.position += 1
                if sampler.position == len(sampler):
                    sampler.epoch, sampler.position = sampler.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict:
        sampler = self.batch_sampler
        return dict(
            epoch=sampler.epoch,
            position=sampler.position,
            seed=sampler.seed,
            num_windows=sampler.num_windows,
            batch_size=sampler.batch_size,
            world_size=sampler.world_size,
        )

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped, also on another number of processes (or micro-batch
        size): every rank serves every world_size-th window of the epoch's one permutation, so
        the windows served so far are `position x batch_size x world_size`, whichever split."""
        sampler = self.batch_sampler
        for key in ("seed", "num_windows"):
            if state[key] != getattr(sampler, key):
                raise DataError(
                    f"loader state: saved with {key}={state[key]} but this loader has {key}="
                    f"{getattr(sampler, key)}; it would not continue the same sequence of batches"
                )
        position = state["position"]
        saved_split, split = (state["batch_size"], state["world_size"]), (sampler.batch_size, sampler.world_size)
        if saved_split != split:
            saved_per_batch, per_batch = state["batch_size"] * state["world_size"], sampler.batch_size * sampler.world_size
            served = position * saved_per_batch
            saved_epoch = sampler.num_windows // state["world_size"] // state["batch_size"] * saved_per_batch  # windows
            if served % per_batch or saved_epoch != len(sampler) * per_batch:
                raise DataError(
                    f"loader state: saved with batch_size x world_size = {saved_split[0]} x {saved_split[1]}, this "
                    f"loader has {split[0]} x {split[1]}; its epochs or batches do not line up with the saved ones")
            position = served // per_batch
        if not 0 <= position < len(sampler):
            raise DataError(f"loader state: position {position} outside [0, {len(sampler)})")
        sampler.epoch, sampler.position = int(state["epoch"]), int(position)


def create_dataloader(
    shard_dir: str | Path,
    *,
    max_length: int,
    batch_size: int,
    stride: int | None = None,
    train: bool = True,
    seed: int = 1337,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    vocab_size: int | None = None,
) -> ResumableDataLoader:
    """Batches of (inputs, targets), each (batch_size, max_length) int64, from a shard directory.

    train=True: a new seeded permutation each epoch, incomplete last batch dropped,
    resumable via `state_dict()`. train=False: one fixed seeded order, every window
    served, identical at each evaluation. Under DDP pass `rank`/`world_size`. Pass the
    model's `vocab_size` to refuse data it cannot take before training. (That `max_length`
    fits the model's `context_length` is the config's check: `PipelineConfig`.)
    """
    dataset = TokenDataset(shard_dir, max_length, stride, vocab_size)
    sampler = WindowBatchSampler(
        len(dataset), batch_size, seed=seed, drop_last=train, rank=rank, world_size=world_size
    )
    if len(sampler) == 0:
        per_rank = batch_size if train else 1  # evaluation keeps a partial batch
        windows = per_rank * world_size
        needed = (windows - 1) * dataset.stride + max_length + 1
        raise DataError(
            f"{shard_dir}: {dataset.num_tokens} tokens give {len(dataset)} windows, but one batch needs "
            f"{per_rank} window(s) on each of {world_size} rank(s), i.e. at least {needed} tokens "
            f"(max_length {max_length}, stride {dataset.stride})"
        )
    return ResumableDataLoader(dataset, sampler, train=train, num_workers=num_workers)
