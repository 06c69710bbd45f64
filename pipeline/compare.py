"""`make compare`: which run was best, and why: the runs of the experiment side by side.

    python -m pipeline.compare                      # the latest sweep's pretrain runs
    python -m pipeline.compare --all                # every pretrain run of the experiment
    python -m pipeline.compare --filter "params.train.lr > '0.001'"
    python -m pipeline.compare RUN_ID RUN_ID ...    # these runs
    python -m pipeline.compare --stage finetune     # finetune runs (sorted by test accuracy)
    python -m pipeline.compare --stage finetune --mean-over finetune.train.seed
                                                    # one row per candidate: scores averaged over seeds

Writes reports/compare.md (the params that differ between the runs + their scores, best
first) and reports/compare.png (their val-loss and train-loss curves overlaid), and prints
the table. Works against the local SQLite store and against MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from minigpt.io import atomic_path, write_text_atomic
from pipeline import paths
from pipeline.common import StageError, load_config, stage_main
from pipeline.run import connect

COMPARE_MD = paths.REPORTS / "compare.md"
COMPARE_PNG = paths.REPORTS / "compare.png"
# What a stage's runs are ranked by (lower is better for losses, higher for accuracy).
SCORES = {"pretrain": (["val_bits_per_byte", "val_perplexity", "val_loss_full", "train_bits_per_byte"], True),
          "finetune": (["test_accuracy", "test_macro_f1", "test_loss", "test_rouge_l"], False)}


def select_runs(runs: pd.DataFrame, run_ids: list[str], everything: bool) -> pd.DataFrame:
    """The given runs; else all; else the latest sweep (the `sweep` tag of the newest run)."""
    if run_ids:
        missing = sorted(set(run_ids) - set(runs["run_id"]))
        if missing:
            raise StageError(f"no such run in the experiment: {', '.join(missing)}")
        return runs[runs["run_id"].isin(run_ids)]
    if everything or "tags.sweep" not in runs or runs["tags.sweep"].isna().all():
        return runs
    latest = runs.sort_values("start_time")["tags.sweep"].dropna().iloc[-1]
    return runs[runs["tags.sweep"] == latest]


def differing_params(runs: pd.DataFrame) -> list[str]:
    """The params whose values are not all the same across the runs."""
    columns = [c for c in runs.columns if c.startswith("params.")]
    return sorted(c for c in columns if runs[c].astype(str).nunique(dropna=False) > 1)


def comparison_table(runs: pd.DataFrame, stage: str) -> pd.DataFrame:
    """One row per run: name, the differing params, the scores; best first."""
    scores, ascending = SCORES[stage]
    scores = [s for s in scores if f"metrics.{s}" in runs]
    table = pd.DataFrame({"run": runs["tags.mlflow.runName"], "run_id": runs["run_id"].str[:8]})
    for column in differing_params(runs):
        table[column.removeprefix("params.")] = runs[column]
    for score in scores:
        table[score] = runs[f"metrics.{score}"].round(4)
    # What each score cost: a recipe is judged at equal wall-clock, not equal steps.
    for tag in ("train.train_seconds", "train.tokens_per_s"):
        if f"tags.{tag}" in runs:
            table[tag.removeprefix("train.")] = pd.to_numeric(runs[f"tags.{tag}"], errors="coerce").round(0)
    return table.sort_values(scores[0], ascending=ascending) if scores else table


def mean_over(table: pd.DataFrame, param: str, stage: str) -> pd.DataFrame:
    """One row per candidate, i.e. per combination of the other differing params: its scores
    averaged over the runs that differ only in `param` (e.g. a seed), the per-run values
    beside them (`<score> per <param>`), and how many runs each mean is of."""
    if param not in table:
        raise StageError(f"--mean-over {param}: the compared runs do not differ in params.{param}")
    scores, ascending = SCORES[stage]
    scores = [s for s in scores if s in table]
    keys = [c for c in table.columns if c not in ("run", "run_id", param, *scores, "train_seconds", "tokens_per_s")]
    ordered = table.sort_values(param, key=lambda column: pd.to_numeric(column, errors="coerce"))
    groups = ordered.groupby(keys, dropna=False, sort=False) if keys else [((), ordered)]
    rows = []
    for values, group in groups:
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        row["runs"] = len(group)
        for score in scores:
            row[score] = round(group[score].mean(), 4)
        if scores:  # the first score per run, in the order of `param`
            row[f"{scores[0]} per {param.split('.')[-1]}"] = " ".join(f"{v:.4f}" for v in group[scores[0]])
        rows.append(row)
    means = pd.DataFrame(rows)
    return means.sort_values(scores[0], ascending=ascending) if scores else means


def plot_curves(client: MlflowClient, runs: pd.DataFrame, path: Path) -> None:
    """val_loss (points) and train_loss (lines) over steps, one colour per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for i, (_, run) in enumerate(runs.iterrows()):
        color = f"C{i % 10}"
        for key, style in (("train_loss", "-"), ("val_loss", "o--")):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run["run_id"], key))
            if history:
                ax.plot(*zip(*history), style, color=color, linewidth=1, markersize=3,
                        label=f"{run['tags.mlflow.runName']} {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_ids", nargs="*", help="runs to compare (default: the latest sweep)")
    parser.add_argument("--all", action="store_true", help="every run of the stage")
    parser.add_argument("--filter", default="", help="an MLflow search filter, e.g. \"params.train.lr = '0.001'\"")
    parser.add_argument("--stage", choices=sorted(SCORES), default="pretrain")
    parser.add_argument("--mean-over", metavar="PARAM", help="average the scores over runs differing only in "
                                                            "this param, e.g. finetune.train.seed")
    args = parser.parse_args(sys.argv[1:])

    tracking = load_config("tracking").tracking
    experiment_id = connect(tracking)
    stage_filter = f"tags.stage = '{args.stage}'" + (f" and {args.filter}" if args.filter else "")
    try:
        runs = mlflow.search_runs([experiment_id], filter_string=stage_filter, max_results=1000)
    except MlflowException as err:  # a malformed --filter
        raise StageError(f"--filter: {err.message.splitlines()[0]}") from None
    if runs.empty:
        raise StageError(f"no {args.stage} run in experiment {tracking.experiment!r} matches {stage_filter!r}")
    runs = select_runs(runs, args.run_ids, args.all)
    table = comparison_table(runs, args.stage)
    if args.mean_over:
        table = mean_over(table, args.mean_over, args.stage)
    markdown = table.to_markdown(index=False)
    write_text_atomic(COMPARE_MD, f"# {len(table)} {args.stage} runs of `{tracking.experiment}`\n\n"
                                  f"Params that differ, and scores (best first).\n\n{markdown}\n")
    plot_curves(MlflowClient(), runs, COMPARE_PNG)
    print(markdown)
    print(f"\ncompare: wrote {COMPARE_MD} and {COMPARE_PNG}")


if __name__ == "__main__":
    main()
