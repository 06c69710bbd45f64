"""Where each stage reads and writes (dvc.yaml names the same paths; a test checks)."""

from pathlib import Path

PARAMS = Path("params.yaml")
DOCUMENTS = Path("data/raw/documents.parquet")
SPLIT_DIR = Path("data/split")
TOKENS_DIR = Path("data/tokens")
TRAIN_TOKENS = TOKENS_DIR / "train"
VAL_TOKENS = TOKENS_DIR / "val"
CHECKPOINTS = Path("checkpoints")
REPORTS = Path("reports")
TRAIN_METRICS = REPORTS / "train.json"
TRAIN_CURVE = REPORTS / "train_curve.csv"
TRAIN_CURVE_PNG = REPORTS / "train_curve.png"
MLFLOW_RUN = REPORTS / "mlflow_run.json"
EVAL_METRICS = REPORTS / "eval.json"
SAMPLES_MD = REPORTS / "samples.md"
SAMPLES_JSON = REPORTS / "samples.json"

# Finetuning (the stages after sample)
FINETUNE_DATA = Path("data/finetune")
FINETUNE_SPLITS = FINETUNE_DATA / "splits"
FINETUNE_TOKENS = FINETUNE_DATA / "tokens"
FINETUNE_CHECKPOINTS = Path("checkpoints-finetune")
FINETUNE_METRICS = REPORTS / "finetune_train.json"
FINETUNE_CURVE = REPORTS / "finetune_curve.csv"
FINETUNE_CURVE_PNG = REPORTS / "finetune_curve.png"
FINETUNE_RUN = REPORTS / "finetune_mlflow_run.json"
FINETUNE_EVAL = REPORTS / "finetune_eval.json"
FINETUNE_EVAL_PNG = REPORTS / "finetune_eval.png"  # confusion matrix, or the ROUGE-L histogram
FINETUNE_PREDICTIONS = REPORTS / "finetune_predictions.jsonl"  # one line per test example
