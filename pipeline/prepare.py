"""Stage 1: acquire the raw corpus into a table of documents."""

from minigpt.data.sources import acquire
from pipeline import paths
from pipeline.common import load_config, stage_main


@stage_main
def main() -> None:
    data = load_config("data").data
    n = acquire(data.source, paths.DOCUMENTS)
    print(f"prepare: {n} documents -> {paths.DOCUMENTS}")


if __name__ == "__main__":
    main()
