"""The split stage: a document table -> train and validation tables plus a manifest.

Whole documents go to one side, chosen from a seed, so no document leaks into both;
a corpus of a single document is cut by characters instead. `manifest.csv` says which
document (or which character range of it) went where.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from minigpt.data.documents import DocumentWriter, iter_documents, read_document_index, text_sha256
from minigpt.io import DataError, atomic_dir

__all__ = ["choose_val_documents", "split_documents"]


def choose_val_documents(chars: Sequence[int], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the documents that go to validation, about `val_fraction` of the characters.

    Documents are visited in a seeded random order and one is taken when at least
    half of it still fits under the target, so validation ends within half the
    largest document of `val_fraction * total`. Both splits get at least one document.
    """
    sizes = [int(c) for c in chars]
    if len(sizes) < 2:
        raise DataError(f"split: need at least 2 documents to split by document, got {len(sizes)}")
    order = np.random.default_rng(seed).permutation(len(sizes))
    target = val_fraction * sum(sizes)
    is_val = np.zeros(len(sizes), dtype=bool)
    taken = 0
    for i in order:
        if taken + sizes[i] / 2 <= target:
            is_val[i] = True
            taken += sizes[i]
    if not is_val.any():
        is_val[order[0]] = True
    if is_val.all():
        is_val[order[-1]] = False
    return is_val


def _split_by_documents(
    docs_path: Path, out_dir: Path, is_val: dict[int, bool], progress: bool
) -> list[dict]:
    rows = []
    documents = tqdm(
        iter_documents(docs_path), desc="split", unit="doc", total=len(is_val), disable=not progress
    )
    with DocumentWriter(out_dir / "train.parquet") as train, DocumentWriter(out_dir / "val.parquet") as val:
        for doc in documents:
            split = "val" if is_val[doc["id"]] else "train"
            (val if split == "val" else train).add(doc["id"], doc["title"], doc["source"], doc["text"])
            rows.append(
                dict(id=doc["id"], title=doc["title"], split=split, char_start=0,
                     char_end=doc["chars"], chars=doc["chars"], sha256=doc["sha256"])
            )  # fmt: skip
    return rows


def _split_by_characters(docs_path: Path, out_dir: Path, val_fraction: float) -> list[dict]:
    """One document: the first (1 - val_fraction) of its characters train, the rest validate."""
    (doc,) = iter_documents(docs_path)
    text = doc["text"]
    cut = round(len(text) * (1 - val_fraction))
    if not 0 < cut < len(text):
        raise DataError(
            f"{docs_path}: its single document ({len(text)} characters) is too short to split "
            f"with val_fraction {val_fraction}"
        )
    rows = []
    for split, start, end in (("train", 0, cut), ("val", cut, len(text))):
        part = text[start:end]
        with DocumentWriter(out_dir / f"{split}.parquet") as writer:
            writer.add(doc["id"], doc["title"], doc["source"], part)
        rows.append(
            dict(id=doc["id"], title=doc["title"], split=split, char_start=start,
                 char_end=end, chars=len(part), sha256=text_sha256(part))
        )  # fmt: skip
    return rows


def split_documents(
    docs_path: str | Path, out_dir: str | Path, val_fraction: float, seed: int, *, progress: bool = True
) -> pd.DataFrame:
    """Split a document table into `out_dir/{train,val}.parquet` + `out_dir/manifest.csv`.

    Whole documents go to one side (seeded, deterministic); a single document is
    cut by characters instead. Returns the manifest: one row per (document, split)
    with id, title, split, char_start, char_end, chars, sha256.
    """
    docs_path = Path(docs_path)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction: must be strictly between 0 and 1, got {val_fraction}")
    index = read_document_index(docs_path)
    if index.empty:
        raise DataError(f"empty corpus: {docs_path} has no documents")

    with atomic_dir(out_dir) as tmp:
        if len(index) == 1:
            rows = _split_by_characters(docs_path, tmp, val_fraction)
        else:
            mask = choose_val_documents(index["chars"], val_fraction, seed)
            is_val = dict(zip(index["id"].tolist(), mask.tolist()))
            rows = _split_by_documents(docs_path, tmp, is_val, progress)
        manifest = pd.DataFrame(rows)
        manifest.to_csv(tmp / "manifest.csv", index=False)
    return manifest
