"""Stage 9: score the finetuned model on the test split -> reports/finetune_eval.json (+ a PNG and
one prediction per test example), logged into the finetune run.

classification: accuracy, precision / recall / F1 per class and macro, the confusion matrix.
instruction: the loss on the reference responses, greedy responses (stopped at
end-of-text) and their ROUGE-L and token F1 against the references.
"""

from __future__ import annotations

import json
import statistics

import mlflow
import torch

from minigpt.checkpoint import load_checkpoint, read_checkpoint_state
from minigpt.config import FinetuneConfig, ModelConfig
from minigpt.data.tasks import read_tokenized_split
from minigpt.io import atomic_path, write_json_atomic, write_text_atomic
from minigpt.model import GPTModel
from minigpt.tasks.classification import classification_metrics, plot_confusion_matrix, predict
from minigpt.tasks.instruction import generate_responses, rouge_l, token_f1
from minigpt.tasks.lora import is_lora_checkpoint, load_merged
from minigpt.train import LanguageModelLoss, evaluate
from pipeline import paths
from pipeline.common import load_config, stage_device, stage_main
from pipeline.finetune import task_architecture, task_loaders
from pipeline.run import join_run
from pipeline.tracking import log_results
from pipeline.trained import best_checkpoint


def finetuned_model(ft: FinetuneConfig, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The best finetune checkpoint in the architecture it was trained in (its run_info
    says which backbone: this pipeline's model or HF weights of another size)."""
    checkpoint = best_checkpoint(paths.FINETUNE_CHECKPOINTS)
    state = read_checkpoint_state(checkpoint)
    model = task_architecture(ft, GPTModel(ModelConfig(**state["run_info"]["model_config"])))
    if is_lora_checkpoint(checkpoint):  # adapters: on their base, folded in
        model = load_merged(checkpoint, model, state)
    else:
        load_checkpoint(checkpoint, model)
    return model.to(device).eval(), str(checkpoint)


def classification_report(ft: FinetuneConfig, model: torch.nn.Module, device: torch.device) -> dict:
    (test_loader,) = task_loaders(ft, splits=("test",))
    labels, predicted = predict(model, test_loader, device)
    metrics = classification_metrics(labels, predicted, ft.data.classes)
    plot_confusion_matrix(metrics["confusion_matrix"], ft.data.classes, paths.FINETUNE_EVAL_PNG)
    rows = read_tokenized_split(paths.FINETUNE_TOKENS, "test", ft.task)
    order = test_loader.batch_sampler.order(0).tolist()  # the rows in the order predicted: fixed, seeded
    lines = [{"text": rows[i]["text"], "label": rows[i]["label"], "predicted": ft.data.classes[p]}
             for i, p in zip(order, predicted)]
    write_text_atomic(paths.FINETUNE_PREDICTIONS, "".join(json.dumps(line) + "\n" for line in lines))
    print(f"finetune_evaluate: test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro']['f1']:.4f} "
          f"over {len(labels)} examples")
    return metrics


def instruction_report(ft: FinetuneConfig, model: torch.nn.Module, device: torch.device) -> dict:
    (test_loader,) = task_loaders(ft, splits=("test",))
    test_loss = evaluate(model, test_loader, device, loss_fn=LanguageModelLoss(ft.train.loss_chunk_size))
    rows = read_tokenized_split(paths.FINETUNE_TOKENS, "test", ft.task)
    # The prompt needs room in the context: on a small model, fewer new tokens.
    max_new = min(ft.max_new_tokens, model.cfg.context_length // 2)
    responses = generate_responses(model, rows, max_new_tokens=max_new, device=device)
    lines = [{"instruction": r["instruction"], "input": r["input"], "reference": r["output"], "response": response,
              "rouge_l": rouge_l(response, r["output"]), "token_f1": token_f1(response, r["output"])}
             for r, response in zip(rows, responses)]
    write_text_atomic(paths.FINETUNE_PREDICTIONS, "".join(json.dumps(line) + "\n" for line in lines))
    _plot_scores([line["rouge_l"] for line in lines])
    report = {"test_loss": test_loss, "rouge_l": statistics.fmean(line["rouge_l"] for line in lines),
              "token_f1": statistics.fmean(line["token_f1"] for line in lines), "max_new_tokens": max_new,
              "examples": len(lines)}
    print(f"finetune_evaluate: test loss {test_loss:.4f}, ROUGE-L {report['rouge_l']:.4f}, "
          f"token F1 {report['token_f1']:.4f} over {len(lines)} responses")
    return report


def _plot_scores(scores: list[float]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.hist(scores, bins=20, range=(0, 1))
    ax.set_xlabel("ROUGE-L F of a test response against its reference")
    ax.set_ylabel("responses")
    fig.tight_layout()
    with atomic_path(paths.FINETUNE_EVAL_PNG) as tmp:
        fig.savefig(tmp, dpi=110)


@stage_main
def main() -> None:
    cfg = load_config("finetune", "tracking")
    ft = cfg.finetune
    device = stage_device(ft.train.device)
    model, checkpoint = finetuned_model(ft, device)
    report_fn = classification_report if ft.task == "classification" else instruction_report
    report = {"task": ft.task, "checkpoint": checkpoint, **report_fn(ft, model, device)}
    write_json_atomic(paths.FINETUNE_EVAL, report)
    with join_run(cfg.tracking, paths.FINETUNE_RUN):
        scores = {k: v for k, v in report.items() if k in ("accuracy", "test_loss", "rouge_l", "token_f1")}
        scores |= {f"macro_{k}": v for k, v in report.get("macro", {}).items()}
        scores |= {f"f1_{name}": c["f1"] for name, c in report.get("per_class", {}).items()}
        examples = report["examples"] if ft.task == "instruction" else sum(map(sum, report["confusion_matrix"]))
        log_results({k if k.startswith("test_") else f"test_{k}": v for k, v in scores.items()},
                    {"test.examples": examples})
        for path in (paths.FINETUNE_EVAL, paths.FINETUNE_EVAL_PNG, paths.FINETUNE_PREDICTIONS):
            mlflow.log_artifact(str(path))


if __name__ == "__main__":
    main()
