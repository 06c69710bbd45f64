"""Stage 2: train/validation split by whole documents, with a manifest."""

from minigpt.data.split import split_documents
from pipeline import paths
from pipeline.common import load_config, stage_main


@stage_main
def main() -> None:
    data = load_config("data").data
    manifest = split_documents(paths.DOCUMENTS, paths.SPLIT_DIR, data.val_fraction, data.split_seed)
    counts = manifest.groupby("split")["chars"].agg(["count", "sum"])
    for split, row in counts.iterrows():
        print(f"split: {split}: {row['count']} documents, {row['sum']:,} characters")


if __name__ == "__main__":
    main()
