"""Stage 3: encode each split into uint16 token shards with a manifest."""

from minigpt.data.shards import tokenize_split
from pipeline import paths
from pipeline.common import load_config, stage_main


@stage_main
def main() -> None:
    data = load_config("data").data
    for split, out_dir in (("train", paths.TRAIN_TOKENS), ("val", paths.VAL_TOKENS)):
        manifest = tokenize_split(
            paths.SPLIT_DIR / f"{split}.parquet", out_dir,
            tokenizer=data.tokenizer, shard_tokens=data.shard_tokens, num_proc=data.num_proc,
        )
        print(f"tokenize: {split}: {manifest['tokens']:,} tokens in {len(manifest['shards'])} shard(s)")


if __name__ == "__main__":
    main()
