"""`make headline`: the numbers the README and conf comments quote, measured again.

    python -m benchmarks.headline                  # a fresh clone of HEAD in a temp folder
    python -m benchmarks.headline --keep /tmp/hl   # ... kept there afterwards

Clones the committed HEAD (uncommitted changes are not measured: it says so), runs the
default pipeline there exactly as a new user would (`make run`, setup included, timed),
then the default finetune again under each further seed of `finetune_seeds`
(`dvc exp run finetune_evaluate -S finetune.train.seed=S`). It prints every number of
`benchmarks/headline.json` measured beside expected and its tolerance, writes
reports/headline.json (the measured values), and exits 1 when one drifted beyond its
tolerance. Minutes of training: a benchmark, not a test. Run it whenever a default changes.

A tolerance is absolute (`tolerance`), or for durations a factor (`ratio`): these
machines differ 2x from day to day, so a time is only wrong beyond that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt.io import write_json_atomic

HEADLINE = Path(__file__).with_name("headline.json")
OUT = Path("reports/headline.json")
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Expected:
    """One quoted number: what it should be and how far it may move."""

    name: str
    expected: float
    tolerance: float | None = None  # |measured - expected| <= tolerance
    ratio: float | None = None  # expected / ratio <= measured <= expected * ratio
    minimum: float | None = None  # a floor the number must also clear (a target)
    quote: str = "{:g}"  # how the files in `quoted_in` write it
    quoted_in: tuple[str, ...] = ()  # files that quote it: a test checks they say `quote.format(expected)`
    about: str = ""

    def quoted(self) -> str:
        return self.quote.format(self.expected)

    def holds(self, measured: float) -> bool:
        if self.minimum is not None and measured < self.minimum:
            return False
        if self.ratio is not None:
            return self.expected / self.ratio <= measured <= self.expected * self.ratio
        return abs(measured - self.expected) <= (self.tolerance or 0.0)

    def allowed(self) -> str:
        band = f"x/÷ {self.ratio:g}" if self.ratio is not None else f"± {self.tolerance:g}"
        return band + (f", ≥ {self.minimum:g}" if self.minimum is not None else "")


def load_expected(path: Path = HEADLINE) -> tuple[list[Expected], list[int]]:
    """The expected numbers and the finetune seeds whose mean the spam scores are."""
    spec = json.loads(path.read_text())
    seeds = spec["finetune_seeds"]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: finetune_seeds: expected distinct seeds, got {seeds}")
    numbers = []
    for name, entry in spec["numbers"].items():
        if (entry.get("tolerance") is None) == (entry.get("ratio") is None):
            raise ValueError(f"{path}: numbers.{name}: expected exactly one of tolerance or ratio")
        numbers.append(Expected(name, entry["expected"], entry.get("tolerance"), entry.get("ratio"),
                                entry.get("minimum"), entry.get("quote", "{:g}"), tuple(entry.get("quoted_in", ())),
                                entry.get("about", "")))
    return numbers, seeds


def compare(expected: list[Expected], measured: dict[str, float]) -> list[dict[str, Any]]:
    """One row per expected number: measured beside expected; `ok` False for a drift or a gap."""
    rows = []
    for number in expected:
        value = measured.get(number.name)
        rows.append({"name": number.name, "expected": number.expected, "allowed": number.allowed(),
                     "measured": value, "ok": value is not None and number.holds(value)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (what a closing note quotes)."""
    def show(value: float | None) -> str:
        if value is None:
            return "missing"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4f}".rstrip("0").rstrip(".")

    lines = ["| number | expected | allowed | measured | |", "|:--|--:|:--|--:|:--|"]
    lines += [f"| {r['name']} | {show(r['expected'])} | {r['allowed']} | {show(r['measured'])} | "
              f"{'ok' if r['ok'] else '**DRIFT**'} |" for r in rows]
    return "\n".join(lines)


def spam_scores(reports: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Per-seed and mean test accuracy / macro F1 of the finetune reports, by seed."""
    out: dict[str, float] = {}
    for seed, report in reports.items():
        out[f"spam_test_accuracy_seed{seed}"] = report["accuracy"]
        out[f"spam_test_macro_f1_seed{seed}"] = report["macro"]["f1"]
    out["spam_test_accuracy_mean"] = statistics.fmean(r["accuracy"] for r in reports.values())
    out["spam_test_macro_f1_mean"] = statistics.fmean(r["macro"]["f1"] for r in reports.values())
    return out


def _run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run `cmd` in `cwd` with its output appended to `log`; seconds it took. A failure stops
    the headline with the command and the log's last lines."""
    env = {**os.environ, "PATH": f"{cwd / '.venv/bin'}:{os.environ['PATH']}"}
    for key in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV"):  # the clone's own store and venv
        env.pop(key, None)
    start = time.perf_counter()
    with log.open("a") as out:
        print(f"headline: {' '.join(cmd)}", file=sys.stderr)
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"{tail}\nheadline: error: `{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}); "
                         f"log: {log}")
    return time.perf_counter() - start


def measure(workdir: Path, seeds: list[int]) -> dict[str, float]:
    """Run the default pipeline in `workdir` (a fresh clone) and read what the README quotes."""
    log = workdir / "headline.log"
    measured = {"make_run_seconds": _run(["make", "run"], workdir, log)}
    reports = workdir / "reports"
    train_report = json.loads((reports / "train.json").read_text())
    eval_report = json.loads((reports / "eval.json").read_text())
    measured |= {"pretrain_train_seconds": train_report["train_seconds"],
                 "val_loss": eval_report["val_loss"], "val_bits_per_byte": eval_report["val_bits_per_byte"]}
    finetune = {seeds[0]: json.loads((reports / "finetune_eval.json").read_text())}
    for seed in seeds[1:]:
        _run(["dvc", "exp", "run", "finetune_evaluate", "-S", f"finetune.train.seed={seed}"], workdir, log)
        finetune[seed] = json.loads((reports / "finetune_eval.json").read_text())
    return measured | spam_scores(finetune)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="clone into this folder and keep it")
    args = parser.parse_args(argv)
    expected, seeds = load_expected()
    if subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip():
        print("headline: the working tree has uncommitted changes; measuring the committed HEAD", file=sys.stderr)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="minigpt-headline-"))
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"headline: error: --keep {workdir}: the folder is not empty")
    subprocess.run(["git", "clone", "-q", str(REPO), str(workdir)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=workdir, capture_output=True,
                            text=True, check=True).stdout.strip()
    print(f"headline: measuring {commit} in {workdir} (log: {workdir / 'headline.log'})", file=sys.stderr)
    try:
        measured = measure(workdir, seeds)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = compare(expected, measured)
    write_json_atomic(OUT, {"measured": measured, "rows": rows})
    print(table(rows))
    per_seed = {k: v for k, v in measured.items() if "_seed" in k}
    print("per seed: " + ", ".join(f"{k.removeprefix('spam_test_')} {v:.4f}" for k, v in per_seed.items()))
    drifted = [r["name"] for r in rows if not r["ok"]]
    if drifted:
        print(f"headline: drift beyond tolerance: {', '.join(drifted)} (fix the code, or the numbers and "
              f"every place that quotes them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
