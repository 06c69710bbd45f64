"""Benchmarks of the data stages: tokenizer throughput, its memory, and loader speed.

`run_data_benchmarks()` returns a flat dict of metrics for `reports/bench.json`:

    tokenize.single_thread_mb_per_s   plain `encode_ordinary` on one thread (the baseline;
                                      mean of a run before and one after the stage)
    tokenize.mb_per_s                 the tokenize stage's own path (`tokenize_split`), all cores
    tokenize.speedup                  the ratio of the two (target: >= 1.8 on 2 cores)
    tokenize.peak_rss_mb              peak resident memory of the stage, workers included (target: <= 512)
    tokenize.corpus_mb                size of the corpus it encoded: the default corpus repeated
                                      to >= 1 GB (quick mode: ~100 MB)
    tokenize.tokens                   tokens it produced
    loader.batches_per_s              training batches (8 x 256 tokens) served by `create_dataloader`

MB are 10^6 bytes of UTF-8 text. The stage runs in a fresh subprocess so that its
memory is its own, not the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.compute as pc

from minigpt.config import ShakespeareSource
from minigpt.data.documents import DocumentWriter, iter_documents, open_document_table
from minigpt.data.loader import create_dataloader
from minigpt.data.sources import acquire
from minigpt.io import atomic_path
from minigpt.tokenizer import get_tokenizer

__all__ = [
    "build_repeated_corpus",
    "measure_loader",
    "measure_single_thread",
    "measure_tokenize",
    "run_data_benchmarks",
]

FULL_CORPUS_BYTES = 10**9
QUICK_CORPUS_BYTES = 10**8


def measure_single_thread(texts: list[str], min_seconds: float = 2.0) -> float:
    """MB/s of `encode_ordinary` on one thread, over whole passes of `texts` lasting >= min_seconds."""
    enc = get_tokenizer("gpt2")
    size = sum(len(t.encode("utf-8")) for t in texts)
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < min_seconds:
        for text in texts:
            enc.encode_ordinary(text)
        done += size
    return done / 1e6 / (time.perf_counter() - start)


def build_repeated_corpus(docs_path: Path, out_path: Path, target_bytes: int) -> int:
    """Write a document table of copies of `docs_path`'s documents totalling >= target_bytes.

    Documents are streamed into the writer, never all held; returns the bytes written.
    """
    docs = list(iter_documents(docs_path))  # the default corpus itself: ~5 MB
    written = 0
    with atomic_path(out_path) as part, DocumentWriter(part) as writer:
        while written < target_bytes:
            for doc in docs:
                writer.add(writer.count, doc["title"], doc["source"], doc["text"])
                written += len(doc["text"].encode("utf-8"))
    return written


_STAGE = """
import json, sys, time
from minigpt.data.shards import tokenize_split
start = time.perf_counter()
manifest = tokenize_split(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": manifest["tokens"]}))
"""


def _tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (shared pages count in each)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass  # a worker that exited between listing and reading
    return total


def _utf8_bytes(docs_path: Path) -> int:
    """UTF-8 size of a document table's text, one row group at a time."""
    table = open_document_table(docs_path)
    return sum(
        pc.sum(pc.binary_length(table.read_row_group(i, columns=["text"]).column("text"))).as_py()
        for i in range(table.num_row_groups)
    )


def measure_tokenize(docs_path: Path, out_dir: Path) -> dict[str, float]:
    """Run `tokenize_split` in a fresh process; its throughput and the peak RSS of its process tree."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _STAGE, str(docs_path), str(out_dir)], stdout=subprocess.PIPE, text=True
    )
    peak = 0
    ps = psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                peak = max(peak, _tree_rss(ps))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"tokenize benchmark subprocess failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    size = _utf8_bytes(docs_path)
    return {
        "tokenize.mb_per_s": size / 1e6 / result["seconds"],
        "tokenize.peak_rss_mb": peak / 2**20,
        "tokenize.corpus_mb": size / 1e6,
        "tokenize.tokens": result["tokens"],
    }


def measure_loader(shard_dir: Path, batches: int = 3000, batch_size: int = 8, max_length: int = 256) -> float:
    """Training batches per second from `create_dataloader` (one process, as the trainer uses it)."""
    loader = create_dataloader(shard_dir, max_length=max_length, batch_size=batch_size, seed=0)
    iterator = iter(loader)
    next(iterator)  # exclude one-time setup
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def run_data_benchmarks(quick: bool = False, workdir: str | Path | None = None) -> dict[str, float]:
    """All data metrics; `quick` encodes ~100 MB instead of >= 1 GB."""
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-data-", dir=workdir) as tmp:
        tmp = Path(tmp)
        acquire(ShakespeareSource(), tmp / "docs.parquet", progress=False)
        texts = [doc["text"] for doc in iter_documents(tmp / "docs.parquet", columns=["text"])]
        build_repeated_corpus(
            tmp / "docs.parquet", tmp / "big.parquet", QUICK_CORPUS_BYTES if quick else FULL_CORPUS_BYTES
        )

        # The baseline is measured before and after the stage and averaged, so a
        # change in machine load during the run biases the speed-up less.
        seconds = 2.0 if quick else 5.0
        before = measure_single_thread(texts, seconds)
        metrics = measure_tokenize(tmp / "big.parquet", tmp / "tokens")
        single = (before + measure_single_thread(texts, seconds)) / 2
        metrics["tokenize.single_thread_mb_per_s"] = single
        metrics["tokenize.speedup"] = metrics["tokenize.mb_per_s"] / single
        metrics["loader.batches_per_s"] = measure_loader(tmp / "tokens")
    return {key: round(value, 2) for key, value in sorted(metrics.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="encode ~100 MB instead of >= 1 GB")
    parser.add_argument(
        "--workdir", help="where to build the temporary corpus (needs ~2 GB free for the full run)"
    )
    args = parser.parse_args(argv)
    print(json.dumps(run_data_benchmarks(quick=args.quick, workdir=args.workdir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
