"""Instruction finetuning: masked next-token batches, greedy responses, ROUGE-L and token F1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigpt.generate import generate
from minigpt.io import DataError
from minigpt.tasks.instruction import IGNORE_INDEX, collate_instructions, generate_responses, rouge_l, token_f1
from minigpt.tokenizer import EOT_ID, N_VOCAB, get_tokenizer
from minigpt.train import LanguageModelLoss
from train_helpers import tiny_model

E, X = EOT_ID, IGNORE_INDEX
CPU = torch.device("cpu")
# Sequence A = prompt [1, 2, 3] + response [4, 5, E]; B = prompt [7, 8] + response [9, E].
ROWS = [{"prompt_ids": [1, 2, 3], "response_ids": [4, 5, E]}, {"prompt_ids": [7, 8], "response_ids": [9, E]}]


# --------------------------------------------------------------------------- batches
def test_targets_ignore_padding_but_keep_the_end_of_text():
    inputs, targets = collate_instructions(ROWS, mask_prompt=False)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, E, E]]  # B padded with end-of-text
    # B's first E (its response's end) is a target; the padding after it is not.
    assert targets.tolist() == [[2, 3, 4, 5, E], [8, 9, E, X, X]]


def test_mask_prompt_ignores_targets_inside_the_prompt():
    _, targets = collate_instructions(ROWS, mask_prompt=True)
    # A: targets 2, 3 are prompt tokens; 4 (predicted from the last prompt token 3) is the first kept.
    # B: target 8 is a prompt token; 9 is the first kept.
    assert targets.tolist() == [[X, X, 4, 5, E], [X, 9, E, X, X]]


def test_pad_id_and_max_length():
    inputs, targets = collate_instructions(ROWS, mask_prompt=False, pad_id=0, max_length=4)
    assert inputs.tolist() == [[1, 2, 3, 4], [7, 8, 9, E]]
    assert targets.tolist() == [[2, 3, 4, 5], [8, 9, E, X]]
    inputs, _ = collate_instructions(ROWS, mask_prompt=False, pad_id=0)
    assert inputs.tolist()[1] == [7, 8, 9, E, 0]
    with pytest.raises(DataError, match="no response_ids"):
        collate_instructions([{"prompt_ids": [1, 2], "response_ids": []}], mask_prompt=True)


def test_a_truncated_response_has_no_end_of_text_target():
    # The data stage cut this response after 2 tokens: the model is not taught to stop there.
    inputs, targets = collate_instructions([{"prompt_ids": [1, 2], "response_ids": [3, 4]}, ROWS[0]],
                                           mask_prompt=True)
    assert inputs.tolist() == [[1, 2, 3, 4, E], [1, 2, 3, 4, 5]]
    assert targets.tolist() == [[X, 3, 4, X, X], [X, X, 4, 5, E]]


def test_language_model_loss_averages_over_the_kept_targets_only():
    model = tiny_model(vocab_size=N_VOCAB)
    inputs, targets = collate_instructions(ROWS, mask_prompt=True)
    logits = model(inputs)  # (2, 5, vocab)
    kept = targets != X
    expected = F.cross_entropy(logits[kept], targets[kept])  # the 5 kept targets
    torch.testing.assert_close(LanguageModelLoss()(model, (inputs, targets), CPU), expected)


# --------------------------------------------------------------------------- generation
def _prompt_rows(lengths: list[int], seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(0, 1000, (n,), generator=gen).tolist(), "response_ids": [E]}
            for n in lengths]


def _greedy_alone(model, prompt: list[int], max_new_tokens: int) -> str:
    """The reference: one prompt, greedy, new tokens up to end-of-text, decoded."""
    new = generate(model, torch.tensor([prompt]), max_new_tokens, eos_id=E)[0, len(prompt):].tolist()
    return get_tokenizer().decode(new[: new.index(E)] if E in new else new).strip()


def test_responses_are_each_prompts_own_greedy_continuation_in_row_order():
    model = tiny_model(vocab_size=N_VOCAB, context_length=32)
    rows = _prompt_rows([5, 3, 5, 7, 3, 5])  # three lengths, interleaved
    expected = [_greedy_alone(model, r["prompt_ids"], 6) for r in rows]
    assert generate_responses(model, rows, max_new_tokens=6, device=CPU, batch_size=2) == expected
    assert generate_responses(model, rows, max_new_tokens=6, device=CPU, batch_size=1) == expected


def test_long_prompts_keep_their_last_tokens():
    model = tiny_model(vocab_size=N_VOCAB, context_length=32)
    row = _prompt_rows([40])[0]
    response = generate_responses(model, [row], max_new_tokens=8, device=CPU)
    assert response == [_greedy_alone(model, row["prompt_ids"][-24:], 8)]  # 32 - 8 tokens of room
    with pytest.raises(ValueError, match="no room"):
        generate_responses(model, [row], max_new_tokens=32, device=CPU)


def _always(token: int) -> torch.nn.Module:
    """A model that emits `token` at every step: constant final features along its (tied) row."""
    model = tiny_model(vocab_size=N_VOCAB, context_length=32)
    with torch.no_grad():
        model.tok_emb.weight[token] *= 100  # no other row can beat it
        model.final_norm.weight.zero_()
        model.final_norm.bias.copy_(model.tok_emb.weight[token])
    return model


def test_generation_stops_at_end_of_text_and_decodes_only_new_tokens():
    rows = _prompt_rows([4, 6])
    assert generate_responses(_always(E), rows, max_new_tokens=5, device=CPU) == ["", ""]
    hello = get_tokenizer().encode("hello")
    assert len(hello) == 1
    assert generate_responses(_always(hello[0]), rows, max_new_tokens=3, device=CPU) == ["hellohellohello"] * 2


# --------------------------------------------------------------------------- scores
def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 words on each side: P = R = F = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # [a b c d] vs [b d a]: LCS "b d" = 2; P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("A B C D", "b d a") == pytest.approx(4 / 7)
    assert rouge_l("Hello, World!", "hello world") == 1.0  # case and punctuation do not count
    assert rouge_l("b a", "a b") == pytest.approx(1 / 2)  # order matters: LCS 1 of 2
    assert rouge_l("", "anything") == 0.0 and rouge_l("!!!", "...") == 0.0


def test_token_f1_by_hand():
    # [the the cat] vs [the cat cat dog]: shared the x1, cat x1 = 2; P = 2/3, R = 2/4, F = 4/7
    assert token_f1("the the cat", "The cat, cat; dog") == pytest.approx(4 / 7)
    assert token_f1("b a", "a b") == 1.0  # a bag: order does not matter
    assert token_f1("x y", "z") == 0.0 and token_f1("", "") == 0.0


PAIRS = [
    ("The cat sat on the mat.", "The cat is on the mat."),
    ("A B C D", "b d a"),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("I don't know, maybe 42?", "The answer is 42."),
    ("Water boils at 100 degrees Celsius at sea level.", "At sea level, water boils at 100 °C."),
    ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the lazy fox"),
    ("Photosynthesis converts light into chemical energy.", "Plants use photosynthesis to make energy."),
    ("one two three four five", "five four three two one"),
    ("Hello!", "Goodbye."),
    ("Résumé: naïve café owner", "resume of a naive cafe owner"),
]


def test_rouge_l_matches_the_rouge_score_package():
    rouge_scorer = pytest.importorskip(
        "rouge_score.rouge_scorer", reason="the reference implementation, rouge-score, is not installed")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for prediction, reference in PAIRS:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (prediction, reference)
