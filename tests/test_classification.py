"""Classification finetuning: the classifier (last-token and mean pooling), batches, loss, exact resume, metrics, plot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigpt.config import TrainConfig
from minigpt.flops import flops_per_token
from minigpt.io import DataError
from minigpt.tasks.batches import create_task_loader
from minigpt.tasks.classification import (
    ClassificationLoss,
    SequenceClassifier,
    classification_metrics,
    collate_classification,
    plot_confusion_matrix,
    predict,
)
from minigpt.tasks.trainable import set_trainable
from minigpt.tokenizer import EOT_ID, N_VOCAB
from minigpt.train import train
from train_helpers import base_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(n_classes: int = 3, pooling: str = "last", **overrides) -> SequenceClassifier:
    """A tiny GPT-2-vocabulary backbone (it must know end-of-text, the padding id) and a head."""
    return SequenceClassifier(tiny_model(vocab_size=N_VOCAB, **overrides), n_classes, pooling)


def _rows(n: int, n_classes: int = 3, seed: int = 0) -> list[dict]:
    """`n` rows of 1..12 random token ids; the label is the first id modulo `n_classes`."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 1000, (int(torch.randint(1, 13, (1,), generator=gen)),), generator=gen).tolist()
        rows.append({"ids": ids, "label_id": ids[0] % n_classes})
    return rows


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_never_changes_a_prediction(pooling):
    model = _classifier(pooling=pooling).eval()
    rows = [{"ids": [5, 6, 7], "label_id": 0}, {"ids": [9, 8, 7, 6, 5, 4, 3], "label_id": 1},
            {"ids": [11], "label_id": 2}]
    with torch.no_grad():
        alone = torch.cat([model(*collate_classification([row])[:2]) for row in rows])  # (3, n_classes)
        padded = model(*collate_classification(rows)[:2])  # (3, n_classes), padded with end-of-text
        other_pad = model(*collate_classification(rows, pad_id=123)[:2])
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(other_pad, alone, rtol=0, atol=1e-6)
    assert not torch.allclose(alone[0], alone[1])  # the rows do get different logits


def test_mean_pooling_reads_the_mean_of_the_real_tokens_features():
    torch.manual_seed(0)
    model = _classifier(pooling="mean").eval()
    idx, lengths, _ = collate_classification([{"ids": [5, 6, 7], "label_id": 0}, {"ids": [9, 8], "label_id": 1}])
    with torch.no_grad():
        hidden = model.backbone.hidden_states(idx)  # (2, 3, emb)
        expected = model.head(torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)]))
        torch.testing.assert_close(model(idx, lengths), expected)
        last = SequenceClassifier(model.backbone, 3, "last")
        last.head.load_state_dict(model.head.state_dict())
        assert not torch.allclose(last(idx, lengths), expected)  # the two poolings do differ
    with pytest.raises(ValueError, match="pooling must be 'last' or 'mean', got 'max'"):
        SequenceClassifier(model.backbone, 3, "max")


def test_collate_pads_to_the_longest_row_and_keeps_lengths_and_labels():
    rows = [{"ids": [1, 2], "label_id": 1}, {"ids": [3, 4, 5], "label_id": 0}]
    idx, lengths, labels = collate_classification(rows)
    assert idx.tolist() == [[1, 2, EOT_ID], [3, 4, 5]]
    assert lengths.tolist() == [2, 3] and labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="no token ids"):
        collate_classification([{"ids": [], "label_id": 0}])


def test_sizes_for_the_trainer_flops_code():
    model = _classifier()
    head = model.head.weight.numel() + model.head.bias.numel()
    assert model.cfg is model.backbone.cfg
    assert model.num_parameters() == model.backbone.num_parameters() + head
    positions = model.cfg.context_length * model.cfg.emb_dim
    assert model.num_parameters(exclude_position_embeddings=True) == model.num_parameters() - positions
    assert flops_per_token(model, 16) > 0
    # An untied vocabulary head is not used by the classifier, so it is not counted.
    untied = _classifier(tie_weights=False)
    vocab_head = untied.backbone.out_head.weight.numel()
    assert untied.num_parameters() == untied.backbone.num_parameters() - vocab_head + head


def test_loss_is_the_cross_entropy_of_the_logits():
    model = _classifier()
    batch = collate_classification(_rows(5))
    expected = F.cross_entropy(model(batch[0], batch[1]), batch[2])
    torch.testing.assert_close(ClassificationLoss()(model, batch, torch.device("cpu")), expected)


# --------------------------------------------------------------------------- batches
def _label_batches(loader, n: int | None = None) -> list[list[int]]:
    """The first `n` batches' rows, identified by their first token id."""
    out = []
    for idx, _, _ in loader:
        out.append(idx[:, 0].tolist())
        if n is not None and len(out) == n:
            break
    return out


def test_task_loader_shuffles_resumes_and_serves_every_row():
    rows = [{"ids": [i, 1], "label_id": 0} for i in range(10)]
    loader = create_task_loader(rows, 3, collate_classification, train=True, seed=7)
    epoch0 = _label_batches(loader)
    assert len(epoch0) == 3 and len({i for b in epoch0 for i in b}) == 9  # last partial batch dropped
    epoch1 = _label_batches(loader)
    assert epoch1 != epoch0  # a new permutation each epoch

    fresh = create_task_loader(rows, 3, collate_classification, train=True, seed=7)
    _label_batches(fresh, 2)
    state = fresh.state_dict()
    resumed = create_task_loader(rows, 3, collate_classification, train=True, seed=7)
    resumed.load_state_dict(state)
    assert _label_batches(resumed) == epoch0[2:]
    assert _label_batches(resumed) == epoch1

    val = create_task_loader(rows, 4, collate_classification, train=False, seed=7)
    served = _label_batches(val)
    assert sorted(i for b in served for i in b) == list(range(10)) and _label_batches(val) == served

    ranks = [_label_batches(create_task_loader(rows, 2, collate_classification, train=True, seed=7,
                                               rank=r, world_size=2)) for r in (0, 1)]
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    with pytest.raises(DataError, match="10 rows"):
        create_task_loader(rows, 11, collate_classification, train=True, seed=7)


def test_finetune_through_train_resumes_bit_identically(tmp_path):
    """N/2 steps, then a resumed run to N, give the very weights of one N-step run."""
    rows, val_rows = _rows(40), _rows(12, seed=1)

    def run(out: Path, max_steps: int) -> tuple[SequenceClassifier, list[int]]:
        """The trained model and the steps this call trained."""
        model = _classifier(dropout=0.1)
        set_trainable(model, "last_block")
        cfg = TrainConfig(**base_config(max_steps=max_steps, lr_decay_steps=8, resume="auto"))
        loaders = [create_task_loader(r, cfg.micro_batch_size, collate_classification, train=t, seed=3)
                   for r, t in ((rows, True), (val_rows, False))]
        records: list[dict] = []
        train(model, cfg, *loaders, out, loss_fn=ClassificationLoss(), callbacks=(records.append,),
              device=torch.device("cpu"), max_length=12, progress=False)
        return model, [r["step"] for r in records if r["kind"] == "train"]

    whole, _ = run(tmp_path / "whole", 8)
    run(tmp_path / "split", 4)
    resumed, steps = run(tmp_path / "split", 8)
    assert steps == [5, 6, 7, 8]  # it did continue from step 4 (a fresh start would trivially match)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


# --------------------------------------------------------------------------- evaluation
def test_predict_returns_labels_and_argmax_in_loader_order():
    model, rows = _classifier(), _rows(7)
    loader = create_task_loader(rows, 3, collate_classification, train=False, seed=0)
    labels, predictions = predict(model, loader, torch.device("cpu"))
    expected_labels, expected = [], []
    with torch.no_grad():
        for idx, lengths, batch_labels in loader:
            expected += model(idx, lengths).argmax(-1).tolist()
            expected_labels += batch_labels.tolist()
    assert labels == expected_labels and predictions == expected
    assert sorted(labels) == sorted(r["label_id"] for r in rows)
    assert model.training  # predict put it back in training mode


def test_metrics_of_a_hand_made_confusion_matrix():
    matrix = [  # rows: true a, b, c, d; columns: predicted a, b, c, d
        [5, 1, 0, 0],
        [2, 3, 1, 0],
        [0, 0, 0, 0],  # c never occurs: its recall is 0/0
        [1, 0, 0, 0],  # d is never predicted: its precision is 0/0
    ]
    labels = [t for t in range(4) for p in range(4) for _ in range(matrix[t][p])]
    predictions = [p for t in range(4) for p in range(4) for _ in range(matrix[t][p])]
    m = classification_metrics(labels, predictions, ["a", "b", "c", "d"])

    assert m["confusion_matrix"] == matrix
    assert m["accuracy"] == pytest.approx(8 / 13)  # diagonal 5 + 3 of 13 rows
    # a: 5 right of 8 predicted a (column) and of 6 truly a (row); F1 = 2PR/(P+R) = 5/7
    assert m["per_class"]["a"] == pytest.approx({"precision": 5 / 8, "recall": 5 / 6, "f1": 5 / 7, "support": 6})
    # b: 3 of 4 predicted b, 3 of 6 truly b; F1 = 2 (3/4)(1/2) / (5/4) = 3/5
    assert m["per_class"]["b"] == pytest.approx({"precision": 3 / 4, "recall": 1 / 2, "f1": 3 / 5, "support": 6})
    # c: predicted once, wrongly (0/1); absent (0/0 -> 0); d: never predicted (0/0 -> 0), 0 of 1 found
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # macro: plain means over the 4 classes
    assert m["macro"] == pytest.approx({"precision": (5 / 8 + 3 / 4) / 4, "recall": (5 / 6 + 1 / 2) / 4,
                                        "f1": (5 / 7 + 3 / 5) / 4})
    with pytest.raises(ValueError, match="class ids"):
        classification_metrics([0, 4], [0, 0], ["a", "b", "c", "d"])


def test_confusion_matrix_plot_is_a_png_written_atomically(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib comes with the pipeline extra")
    path = plot_confusion_matrix([[5, 1], [2, 3]], ["ham", "spam"], tmp_path / "plots" / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["confusion.png"]  # no temporary file left
