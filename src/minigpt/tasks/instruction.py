"""Instruction following: next-token batches with a loss on the response, greedy answers, scores.

A row is `prompt_ids` (the Alpaca prompt, tasks/prompts.py) and `response_ids`
(ending with end-of-text, unless the data stage truncated the response:
minigpt.data.tasks keeps at least its first token). `collate_instructions` makes `(inputs, targets)` batches
whose ignored targets are -100, so the loss is the trainer's default
`minigpt.train.LanguageModelLoss`, which averages over the other targets only:
plug it in with loaders from `create_task_loader(rows, batch_size,
functools.partial(collate_instructions, mask_prompt=...), ...)`.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch

from minigpt.generate import generate
from minigpt.io import DataError
from minigpt.model import GPTModel
from minigpt.tasks.batches import Row, pad_right
from minigpt.tokenizer import EOT_ID, get_tokenizer

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: no loss at this target


def collate_instructions(rows: list[Row], *, mask_prompt: bool, pad_id: int = EOT_ID,
                         max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(inputs, targets)`, both `(batch, T)`, from rows with `prompt_ids` and `response_ids`.

    Each sequence is prompt + response; inputs are its tokens but the last, targets
    its tokens but the first (target j is the token after input j). Rows are padded
    with `pad_id` to the batch's longest. Targets are IGNORE_INDEX:
      - on padding. The response's own end-of-text is a real target, not padding: the
        model learns to stop;
      - with `mask_prompt`, wherever the target is a prompt token. The first response
        token, predicted from the last prompt token, stays a target.
    `max_length` keeps the first `max_length` positions of every row (the data stage
    normally truncates already; a row cut here loses its end-of-text target).
    """
    if not all(row["response_ids"] for row in rows):
        # with mask_prompt such a row has no target at all; a batch of them, a NaN loss
        raise DataError("instruction: a row has no response_ids")
    sequences = [[*row["prompt_ids"], *row["response_ids"]] for row in rows]
    ids = pad_right(sequences, pad_id)  # (batch, longest)
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (batch, T) each, T = longest - 1
    positions = torch.arange(targets.shape[1])[None, :]  # (1, T)
    real = torch.tensor([len(seq) - 1 for seq in sequences])[:, None]  # (batch, 1): real targets per row
    ignored = positions >= real  # (batch, T): padding
    if mask_prompt:
        prompt = torch.tensor([len(row["prompt_ids"]) for row in rows])[:, None]  # (batch, 1)
        ignored |= positions < prompt - 1  # (batch, T): target j is token j + 1, a prompt token
    targets = targets.masked_fill(ignored, IGNORE_INDEX)  # (batch, T)
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]  # (batch, <= max_length)
    return inputs, targets


@torch.no_grad()
def generate_responses(model: GPTModel, rows: Sequence[Row], *, max_new_tokens: int, device: torch.device,
                       batch_size: int = 8) -> list[str]:
    """Greedy responses to each row's `prompt_ids`, decoded up to (not including) end-of-text.

    A prompt longer than `context_length - max_new_tokens` keeps its last tokens (the
    response header is at its end), so the whole answer is written without the window
    sliding. `generate` has no padding mask, and left-padding would shift the
    positions a prompt was trained at: a batch therefore holds prompts of one length
    only (up to `batch_size` of them), so every response is what the model gives that
    prompt alone. Responses come back in the order of `rows`, whitespace-stripped.
    """
    room = model.cfg.context_length - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"context_length {model.cfg.context_length}")
    prompts = [list(row["prompt_ids"][-room:]) for row in rows]
    by_length: dict[int, list[int]] = defaultdict(list)  # prompt length -> row numbers
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)

    tokenizer = get_tokenizer()
    responses = [""] * len(rows)
    for length, members in by_length.items():
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            idx = torch.tensor([prompts[i] for i in batch], device=device)  # (batch, length)
            out = generate(model, idx, max_new_tokens, eos_id=EOT_ID)  # (batch, length + new)
            for i, new in zip(batch, out[:, length:].tolist()):
                end = new.index(EOT_ID) if EOT_ID in new else len(new)
                responses[i] = tokenizer.decode(new[:end]).strip()
    return responses


# --------------------------------------------------------------------------- scores
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    """Lowercase alphanumeric runs: punctuation and case do not count (rouge-score's tokens)."""
    return _WORD.findall(text.lower())


def _f_measure(overlap: int, n_prediction: int, n_reference: int) -> float:
    """Harmonic mean of overlap / n_prediction and overlap / n_reference; 0.0 without overlap."""
    if overlap == 0:  # also when a text has no words
        return 0.0
    precision, recall = overlap / n_prediction, overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, one row of the DP table at a time."""
    previous = [0] * (len(b) + 1)  # previous[j]: LCS of the words of `a` so far and b[:j]
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: LCS of the two word sequences against each one's length.

    Equals rouge-score's `rougeL` fmeasure without stemming; 0.0 when a text has no words.
    """
    pred, ref = _words(prediction), _words(reference)
    return _f_measure(_lcs_length(pred, ref), len(pred), len(ref))


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 (SQuAD's): shared words, each counted as often as both texts have it.

    Words as in `rouge_l`; unlike SQuAD's script, articles are kept, and two texts without
    words score 0.0 rather than 1.0.
    """
    pred, ref = _words(prediction), _words(reference)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return _f_measure(overlap, len(pred), len(ref))
