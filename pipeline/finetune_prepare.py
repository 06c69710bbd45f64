"""Stage 7: the finetuning task's data -> deduplicated, split and tokenized examples + manifests."""

from __future__ import annotations

from minigpt.data.tasks import prepare_classification, prepare_instructions, tokenize_task_splits
from pipeline import paths
from pipeline.common import load_config, stage_main
from pipeline.trained import init_context_length


@stage_main
def main() -> None:
    cfg = load_config("model", "finetune")
    ft = cfg.finetune
    context_length = init_context_length(ft, cfg.model)  # a bad `init` fails before anything is written
    prepare = prepare_classification if ft.task == "classification" else prepare_instructions
    split = prepare(ft.data, paths.FINETUNE_SPLITS)
    tokens = tokenize_task_splits(paths.FINETUNE_SPLITS, paths.FINETUNE_TOKENS, ft.task,
                                  context_length=context_length, max_length=ft.max_length, truncate=ft.truncate)
    print(f"finetune_prepare: {split['rows']} rows, {split['duplicates_removed']} duplicates removed")
    for name in ("train", "val", "test"):
        counts = split.get("counts", {}).get(name)
        print(f"finetune_prepare: {name}: {tokens['examples'][name]} examples"
              + (f" {counts}" if counts else "")
              + f", {tokens['truncated'][name]} cut to {tokens['max_length']} tokens")


if __name__ == "__main__":
    main()
