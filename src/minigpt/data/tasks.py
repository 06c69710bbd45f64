"""Finetuning data: a task table -> train/val/test JSONL splits -> tokenized JSONL splits.

Two stages, each writing one folder atomically (a reader sees the old folder or the new
one, never a part):

    prepare_classification / prepare_instructions
        out_dir/{train,val,test}.jsonl   one example per line
        out_dir/manifest.json            source, its sha256, counts, seed, what was dropped
    tokenize_task_splits
        out_dir/{train,val,test}.jsonl   each example with its token ids
        out_dir/manifest.json            max_length used, truncations, tokenizer, counts

Choices (each one a clear error rather than a silent guess):
- text, instruction and output must be non-empty strings (an empty one is an error naming
  its row, not dropped: it means a broken file, not an example);
- exact duplicates are removed and counted; the same text under two labels is an error
  (the data contradicts itself, and keeping either label would hide that);
- classification splits each class separately (stratified), instruction data as a whole;
  split sizes are n * fraction rounded by largest remainder, every split non-empty, each
  within one example of its share; a set too small for that is an error.
All randomness (balancing, split, order) comes from one generator seeded by `split_seed`.
Imports no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import tiktoken

from minigpt.config import TaskDataConfig
from minigpt.data.task_sources import TaskTable, load_task_table, parse_table
from minigpt.io import DataError, atomic_dir
from minigpt.tasks.prompts import format_prompt
from minigpt.tokenizer import get_tokenizer

__all__ = [
    "MANIFEST_NAME",
    "SPLITS",
    "prepare_classification",
    "prepare_instructions",
    "split_sizes",
    "tokenize_task_splits",
]

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
INSTRUCTION_FIELDS = ("instruction", "input", "output")


def split_sizes(n: int, fractions: Sequence[float], what: str) -> list[int]:
    """How many of `n` examples go to train, val and test.

    Each size is n * fraction rounded down or up (largest remainder first), so it is within
    one example of its share; a split whose share is below one example is rounded up first,
    so none is empty. Where that cannot be done `what` (e.g. "class 'spam'") is named.
    """
    targets = [n * f for f in fractions]
    sizes = [math.floor(t + 1e-9) for t in targets]  # 1e-9: 10 * 0.7 may be 6.9999...
    # The rounded-up ones: empty splits first, then the largest remainders (ties: split order).
    for i in sorted(range(len(sizes)), key=lambda i: (sizes[i] > 0, sizes[i] - targets[i])):
        if sum(sizes) == n:
            break
        sizes[i] += 1
    if min(sizes) == 0:
        raise DataError(
            f"{what} has {n} examples, too few to split by finetune.data.fractions {list(fractions)} "
            f"with at least one in each of train, val and test"
        )
    return sizes


def _deal(count: int, sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded permutation of `range(count)`, cut into consecutive parts of `sizes`."""
    return np.split(rng.permutation(count), np.cumsum(sizes)[:-1])


def _text(row: dict, field: str, origin: str, where: str, key: str = "") -> str:
    """`row[field]` as a non-empty string; `key` is the config key naming the field, if any."""
    named = f"{field!r} ({key})" if key else repr(field)
    value = row.get(field)
    if not isinstance(value, str):
        got = "nothing" if value is None else f"{type(value).__name__} {value!r:.40}"
        raise DataError(f"{origin} {where}: field {named} must be text, got {got}")
    if not value.strip():
        raise DataError(f"{origin} {where}: field {named} is empty")
    return value


def _write_split_dir(out_dir: str | Path, splits: dict[str, list[dict]], manifest: dict) -> None:
    with atomic_dir(out_dir) as tmp:
        for name, records in splits.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _source_manifest(task: str, table: TaskTable, cfg: TaskDataConfig, duplicates: int) -> dict:
    return {
        "task": task,
        "source": table.origin,
        "source_sha256": table.sha256,
        "format": table.format,
        "rows": len(table.rows),
        "duplicates_removed": duplicates,
        "fractions": list(cfg.fractions),
        "split_seed": cfg.split_seed,
    }


# --------------------------------------------------------------------------- classification


def _labelled_examples(table: TaskTable, cfg: TaskDataConfig) -> tuple[dict[str, list[str]], int]:
    """Texts by class in file order, exact duplicates removed; and how many were removed."""
    classes = cfg.classes or []
    present = list(dict.fromkeys(key for row in table.rows for key in row))
    for column, key in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
        if column not in present:
            raise DataError(f"{table.origin}: no column {column!r} (finetune.data.{key}); columns are {present}")
    by_class: dict[str, list[str]] = {name: [] for name in classes}
    first_seen: dict[str, tuple[str, str]] = {}  # text -> (label, where)
    duplicates = 0
    for row, where in zip(table.rows, table.where):
        text = _text(row, cfg.text_column, table.origin, where, "finetune.data.text_column")
        value = row.get(cfg.label_column)
        # Integer labels (0/1 in a jsonl or parquet) match classes named "0", "1"; bool is not one.
        label = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if label not in by_class:
            raise DataError(f"{table.origin} {where}: label {value!r} (column {cfg.label_column!r}) "
                            f"is not one of finetune.data.classes {classes}")
        if text in first_seen:
            label_before, where_before = first_seen[text]
            if label_before != label:
                raise DataError(f"{table.origin}: the text {text[:60]!r} is labelled {label_before!r} at "
                                f"{where_before} and {label!r} at {where}; give each text one label")
            duplicates += 1
            continue
        first_seen[text] = (label, where)
        by_class[label].append(text)
    return by_class, duplicates


def prepare_classification(cfg: TaskDataConfig, out_dir: str | Path) -> dict:
    """Read a labelled table, deduplicate, optionally balance, split stratified; write and return the manifest.

    Lines of `out_dir/{train,val,test}.jsonl`: `{"text", "label", "label_id"}`, with
    `label_id` the label's index in `cfg.classes`.
    """
    if not cfg.classes:
        raise DataError("finetune.data.classes: classification needs the class names, e.g. [ham, spam]")
    table = load_task_table(cfg)
    by_class, duplicates = _labelled_examples(table, cfg)
    empty = [name for name, texts in by_class.items() if not texts]
    if empty:
        raise DataError(f"{table.origin}: no examples of class {empty[0]!r} (finetune.data.classes {cfg.classes})")
    rng = np.random.default_rng(cfg.split_seed)
    smallest_name = min(by_class, key=lambda name: len(by_class[name]))
    smallest = len(by_class[smallest_name])
    dropped = {}
    for name, texts in by_class.items():
        keep = len(texts)
        if cfg.balance:  # a seeded sample, kept in file order
            keep = smallest
            by_class[name] = [texts[i] for i in sorted(rng.choice(len(texts), smallest, replace=False))]
        dropped[name] = len(texts) - keep
    after = " after removing duplicates" + (f" and balancing to class {smallest_name!r}" if cfg.balance else "")
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for label_id, (name, texts) in enumerate(by_class.items()):
        sizes = split_sizes(len(texts), cfg.fractions, f"class {name!r}{after}")
        for split, chosen in zip(SPLITS, _deal(len(texts), sizes, rng)):
            splits[split] += [{"text": texts[i], "label": name, "label_id": label_id} for i in chosen]
            counts[split][name] = len(chosen)
    for records in splits.values():  # classes interleaved, so no file is all ham, then all spam
        rng.shuffle(records)
    manifest = _source_manifest("classification", table, cfg, duplicates) | {
        "classes": list(cfg.classes),
        "balance": cfg.balance,
        "dropped_by_balancing": dropped,
        "examples": {split: len(part) for split, part in splits.items()},
        "counts": counts,
    }
    _write_split_dir(out_dir, splits, manifest)
    return manifest


# --------------------------------------------------------------------------- instructions


def prepare_instructions(cfg: TaskDataConfig, out_dir: str | Path) -> dict:
    """Read Alpaca records, deduplicate, shuffle and split; write and return the manifest.

    A record needs non-empty `instruction` and `output` strings; `input` is optional (a
    missing or null one is ""). Lines of `out_dir/{train,val,test}.jsonl`:
    `{"instruction", "input", "output"}`; other fields of the source are not kept.
    """
    table = load_task_table(cfg)
    records, seen = [], set()
    for row, where in zip(table.rows, table.where):
        instruction = _text(row, "instruction", table.origin, where)
        output = _text(row, "output", table.origin, where)
        given = row.get("input")
        if not isinstance(given, (str, type(None))):
            got = f"{type(given).__name__} {given!r:.40}"
            raise DataError(f"{table.origin} {where}: field 'input' must be text, got {got}")
        record = {"instruction": instruction, "input": given or "", "output": output}
        key = (instruction, record["input"], output)
        if key not in seen:
            seen.add(key)
            records.append(record)
    sizes = split_sizes(len(records), cfg.fractions, f"{table.origin} (after removing duplicates)")
    parts = _deal(len(records), sizes, np.random.default_rng(cfg.split_seed))
    splits = {split: [records[i] for i in chosen] for split, chosen in zip(SPLITS, parts)}
    manifest = _source_manifest("instruction", table, cfg, len(table.rows) - len(records)) | {
        "examples": {split: len(part) for split, part in splits.items()},
    }
    _write_split_dir(out_dir, splits, manifest)
    return manifest


# --------------------------------------------------------------------------- tokenization


def _read_split(path: Path, fields: Sequence[str]) -> tuple[list[dict], list[str]]:
    """A prepared split's records and their locations (`line N`)."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found (prepare the task data first)")
    rows, where = parse_table(path.read_bytes(), "jsonl", str(path))
    for row, at in zip(rows, where):
        missing = [field for field in fields if field not in row]
        if missing:
            raise DataError(f"{path} {at}: no field {missing[0]!r}; not a prepared split file")
    return rows, where


def read_tokenized_split(token_dir: str | Path, split: str,
                         task: Literal["classification", "instruction"]) -> list[dict]:
    """The examples of one tokenized split (`tokenize_task_splits`' output), in order."""
    fields = ("ids", "label_id") if task == "classification" else ("prompt_ids", "response_ids")
    return _read_split(Path(token_dir) / f"{split}.jsonl", fields)[0]


def _encode(record: dict, enc: tiktoken.Encoding, classification: bool) -> dict:
    if classification:
        return record | {"ids": enc.encode_ordinary(record["text"])}
    return record | {
        "prompt_ids": enc.encode_ordinary(format_prompt(record)),
        "response_ids": enc.encode_ordinary(record["output"]) + [enc.eot_token],
    }


def _length(record: dict) -> int:
    if "ids" in record:
        return len(record["ids"])
    return len(record["prompt_ids"]) + len(record["response_ids"])


def _fit(record: dict, limit: int) -> None:
    """Cut `record`'s tokens to `limit`. Classification keeps the text's first tokens.
    Instruction data lose the response's end first, but it keeps at least one token (an
    example needs a target), then the prompt's start (the constant preamble goes first)."""
    if "ids" in record:
        record["ids"] = record["ids"][:limit]
        return
    prompt, response = record["prompt_ids"], record["response_ids"]
    response = response[: max(limit - len(prompt), 1)]
    keep = max(limit - len(response), 0)
    record["prompt_ids"], record["response_ids"] = prompt[len(prompt) - keep :], response


def tokenize_task_splits(
    split_dir: str | Path,
    out_dir: str | Path,
    task: Literal["classification", "instruction"],
    *,
    context_length: int,
    max_length: int | None = None,
    truncate: bool = True,
    tokenizer: str = "gpt2",
) -> dict:
    """Tokenize `split_dir/{train,val,test}.jsonl` into `out_dir`; write and return the manifest.

    Each line keeps its fields and gains, for classification, `ids` (the text's tokens);
    for instruction data, `prompt_ids` (the Alpaca prompt's) and `response_ids` (the
    output's, then `<|endoftext|>`). The length limit is `max_length`, or the longest
    example of all three splits when it is None, never more than `context_length`. A longer
    example is cut (see `_fit`) and counted per split, or with `truncate=False` is an error.
    """
    if task not in ("classification", "instruction"):
        raise ValueError(f"task: expected 'classification' or 'instruction', got {task!r}")
    split_dir = Path(split_dir)
    enc = get_tokenizer(tokenizer)
    classification = task == "classification"
    fields = ("text", "label_id") if classification else INSTRUCTION_FIELDS
    encoded, where = {}, {}
    for split in SPLITS:
        rows, where[split] = _read_split(split_dir / f"{split}.jsonl", fields)
        encoded[split] = [_encode(row, enc, classification) for row in rows]
    longest = max(_length(record) for records in encoded.values() for record in records)
    limit = min(longest if max_length is None else max_length, context_length)
    truncated = {}
    for split, records in encoded.items():
        truncated[split] = 0
        for record, at in zip(records, where[split]):
            if _length(record) <= limit:
                continue
            if not truncate:
                raise DataError(f"{split_dir / split}.jsonl {at}: {_length(record)} tokens, more than max_length "
                                f"{limit}; raise finetune.max_length or set finetune.truncate: true")
            truncated[split] += 1
            _fit(record, limit)
    manifest = {
        "task": task,
        "tokenizer": tokenizer,
        "eot_id": enc.eot_token,
        "context_length": context_length,
        "max_length_requested": max_length,
        "max_length": limit,
        "longest": longest,
        "truncate": truncate,
        "examples": {split: len(records) for split, records in encoded.items()},
        "truncated": truncated,
    }
    _write_split_dir(out_dir, encoded, manifest)
    return manifest
