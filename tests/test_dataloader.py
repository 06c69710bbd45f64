"""Windows over memory-mapped shards, and a loader that shuffles, resumes and shards across ranks."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch

from minigpt.data import TokenDataset, create_dataloader
from minigpt.data.shards import write_shards
from minigpt.io import DataError


def _shards(path, n_tokens: int, shard_tokens: int = 1000):
    """A split whose token at position p is p % 50000: a window shows where it starts."""
    tokens = (np.arange(n_tokens) % 50_000).astype(np.uint16)
    write_shards(path, [tokens], tokenizer="gpt2", vocab_size=50257, shard_tokens=shard_tokens)
    return path


def _starts(batches) -> list[int]:
    """Window start of every row of every (inputs, targets) batch."""
    return [int(v) for inputs, _ in batches for v in inputs[:, 0]]


# --------------------------------------------------------------------------- dataset


@pytest.mark.parametrize(
    ("n_tokens", "max_length", "stride"), [(1000, 16, 1), (1000, 16, 16), (999, 10, 3), (17, 16, 16)]
)
def test_windows_are_exact_and_targets_are_inputs_shifted(tmp_path, n_tokens, max_length, stride):
    # shard_tokens=64: plenty of windows straddle two shards
    dataset = TokenDataset(_shards(tmp_path / "t", n_tokens, shard_tokens=64), max_length, stride)
    stream = np.arange(n_tokens)
    starts = list(range(0, n_tokens - max_length, stride))  # every start with max_length + 1 tokens left
    assert len(dataset) == len(starts)
    for i, start in enumerate(starts):
        inputs, targets = dataset[i]
        assert inputs.shape == targets.shape == (max_length,) and inputs.dtype == torch.int64
        assert inputs.tolist() == stream[start : start + max_length].tolist()
        assert targets.tolist() == stream[start + 1 : start + max_length + 1].tolist()
    with pytest.raises(IndexError):
        dataset[len(starts)]


def _allocated_while_reading(dataset: TokenDataset) -> int:
    """Peak bytes allocated (numpy and Python) to build the index and read 200 windows."""
    tracemalloc.start()
    try:
        n = len(dataset)
        for i in np.linspace(0, n - 1, 200).astype(int):
            dataset[int(i)]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_number_of_windows(tmp_path):
    small = TokenDataset(_shards(tmp_path / "small", 2_000, shard_tokens=1_000_000), 64, stride=1)
    large = TokenDataset(_shards(tmp_path / "large", 4_000_000, shard_tokens=1_000_000), 64, stride=1)
    assert len(large) > 1000 * len(small)
    # Materialised windows would take ~1 KB each here: 4 GB for `large`.
    assert _allocated_while_reading(large) < 64 * 1024
    assert _allocated_while_reading(large) < 2 * _allocated_while_reading(small) + 16 * 1024


def test_too_few_tokens_says_how_many_are_needed(tmp_path):
    with pytest.raises(DataError, match=r"t: 16 tokens, but one window needs max_length \+ 1 = 17"):
        TokenDataset(_shards(tmp_path / "t", 16), max_length=16)



def test_data_the_model_cannot_embed_is_refused_when_the_loader_is_made(tmp_path):
    shards = _shards(tmp_path / "t", 100)  # GPT-2 ids (vocab 50257)
    assert len(create_dataloader(shards, max_length=8, batch_size=2, vocab_size=50257)) > 0
    with pytest.raises(DataError, match=r"t/shard_000000\.bin: tokenizer gpt2 has 50257 token ids, more than the "
                                        r"model's vocab_size 256"):  # fmt: skip
        create_dataloader(shards, max_length=8, batch_size=2, vocab_size=256)


def test_a_manifest_pointing_into_another_split_is_refused(tmp_path):
    train, _ = _shards(tmp_path / "train", 100), _shards(tmp_path / "val", 100)
    manifest = json.loads((train / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../val/shard_000000.bin"
    (train / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shard name '\.\./val/shard_000000\.bin' is not a file name inside"):
        create_dataloader(train, max_length=8, batch_size=2)


def test_corpus_too_small_for_one_batch(tmp_path):
    shards = _shards(tmp_path / "t", 32)  # 3 windows of 8 + 1 tokens at stride 8
    needs = r"32 tokens give 3 windows, but one batch needs 4 window\(s\) on each of 1 rank\(s\), .* least 33"
    with pytest.raises(DataError, match=needs):
        create_dataloader(shards, max_length=8, batch_size=4)
    assert len(create_dataloader(shards, max_length=8, batch_size=4, train=False)) == 1  # evaluation keeps it


# --------------------------------------------------------------------------- loader


@pytest.fixture
def shards(tmp_path):
    return _shards(tmp_path / "t", 4 * 100 + 1)  # max_length 4, stride 4: exactly 100 windows


def test_each_epoch_is_a_new_permutation_without_repeats(shards):
    loader = create_dataloader(shards, max_length=4, batch_size=10, seed=0)
    epochs = [_starts(loader) for _ in range(3)]
    for starts in epochs:
        assert sorted(starts) == list(range(0, 400, 4))
    assert epochs[0] != epochs[1] != epochs[2]
    assert create_dataloader(shards, max_length=4, batch_size=10, seed=0).state_dict()["epoch"] == 0
    assert loader.state_dict()["epoch"] == 3


def test_drop_last_drops_the_incomplete_batch(shards):
    loader = create_dataloader(shards, max_length=4, batch_size=8)
    batches = list(loader)
    assert len(batches) == len(loader) == 12 and all(inputs.shape == (8, 4) for inputs, _ in batches)
    assert len(set(_starts(batches))) == 96


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_remaining_batches(shards, num_workers):
    def make():
        return create_dataloader(shards, max_length=4, batch_size=8, seed=5, num_workers=num_workers)

    reference = make()
    uninterrupted = [batch for _ in range(3) for batch in reference]  # epochs 0, 1, 2

    first = make()
    seen = []
    for batch in first:  # epoch 0 completely, then 5 batches of epoch 1
        seen.append(batch)
    for batch in first:
        seen.append(batch)
        if len(seen) == 12 + 5:
            break  # workers have prefetched beyond this point; the state must not count those
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 5)

    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)  # the rest of epoch 1, then all of epoch 2
    assert len(seen) + len(rest) == len(uninterrupted)
    for (x, y), (x_ref, y_ref) in zip(seen + rest, uninterrupted):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_a_state_continues_on_another_split_of_the_same_order_or_is_refused(shards):
    """Resuming on another number of processes: 2 ranks x 5 windows have served 3 steps; one
    loader of 10 continues with the windows of the 4th. A split whose epochs end elsewhere
    (8 x 12 = 96 of the 100 windows) cannot continue the same sequence: refused."""
    ranks = [create_dataloader(shards, max_length=4, batch_size=5, seed=3, rank=r, world_size=2) for r in range(2)]
    batches = [iter(loader) for loader in ranks]
    for it in batches:
        for _ in range(3):
            next(it)
    state = ranks[0].state_dict()
    fourth_step = sorted(_starts([next(it) for it in batches]))
    one = create_dataloader(shards, max_length=4, batch_size=10, seed=3)
    one.load_state_dict(state)
    assert sorted(_starts([next(iter(one))])) == fourth_step
    with pytest.raises(DataError, match="saved with batch_size x world_size = 5 x 2, this loader has 8 x 1"):
        create_dataloader(shards, max_length=4, batch_size=8, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="saved with seed=3 but this loader has seed=4"):
        create_dataloader(shards, max_length=4, batch_size=10, seed=4).load_state_dict(state)


def test_ddp_ranks_get_disjoint_windows_and_equal_batch_counts(tmp_path):
    shards = _shards(tmp_path / "t", 4 * 101 + 1)  # 101 windows: one is left out so ranks stay equal
    ranks = [
        create_dataloader(shards, max_length=4, batch_size=5, seed=3, rank=r, world_size=2) for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 10
    for _ in range(2):  # two epochs
        starts = [_starts(loader) for loader in ranks]
        assert len(starts[0]) == len(starts[1]) == 50
        assert not set(starts[0]) & set(starts[1])
        assert len(set(starts[0])) == 50


def test_validation_loader_is_deterministic(shards):
    val = create_dataloader(shards, max_length=4, batch_size=8, train=False, seed=9)
    first = list(val)
    assert len(first) == 13 and first[-1][0].shape == (4, 4)  # nothing dropped
    next(iter(val))  # an evaluation that stops early ...
    again = list(val)  # ... does not shift the next one
    assert len(again) == len(first)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert sorted(_starts(first)) == list(range(0, 400, 4))
