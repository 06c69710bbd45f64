"""`make headline`'s arithmetic, and that the numbers the README and conf comments quote are
the ones `benchmarks/headline.json` expects (and `make headline` re-measures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import headline

ROOT = Path(__file__).resolve().parents[1]


def test_a_number_within_tolerance_holds_and_one_beyond_it_drifts():
    bpb = headline.Expected("val_bits_per_byte", 1.8975, tolerance=0.002)
    accuracy = headline.Expected("spam_test_accuracy_mean", 0.955, tolerance=0.01, minimum=0.95)
    seconds = headline.Expected("make_run_seconds", 600.0, ratio=2.0)
    rows = headline.compare([bpb, accuracy, seconds],
                            {"val_bits_per_byte": 1.8990, "spam_test_accuracy_mean": 0.948, "make_run_seconds": 1250})
    assert [(r["name"], r["ok"]) for r in rows] == [("val_bits_per_byte", True), ("spam_test_accuracy_mean", False),
                                                    ("make_run_seconds", False)]
    assert seconds.holds(300.0) and seconds.holds(1200.0) and not seconds.holds(299.0)
    assert not bpb.holds(1.9) and accuracy.holds(0.96) and not accuracy.holds(0.966)


def test_a_missing_number_is_a_drift_and_the_table_says_so():
    rows = headline.compare([headline.Expected("val_loss", 4.12, tolerance=0.01)], {})
    assert rows[0]["ok"] is False and "missing" in headline.table(rows) and "**DRIFT**" in headline.table(rows)


def test_spam_scores_are_per_seed_and_their_mean():
    reports = {1: {"accuracy": 0.95, "macro": {"f1": 0.94}}, 2: {"accuracy": 0.97, "macro": {"f1": 0.96}}}
    scores = headline.spam_scores(reports)
    assert scores["spam_test_accuracy_seed2"] == 0.97 and scores["spam_test_macro_f1_seed1"] == 0.94
    assert scores["spam_test_accuracy_mean"] == pytest.approx(0.96)
    assert scores["spam_test_macro_f1_mean"] == pytest.approx(0.95)


def test_the_committed_expectations_load_and_every_number_has_a_tolerance(tmp_path):
    numbers, seeds = headline.load_expected()
    assert len(seeds) == 3 and {"val_bits_per_byte", "spam_test_accuracy_mean", "spam_test_macro_f1_mean",
                                "make_run_seconds"} <= {n.name for n in numbers}
    bad = tmp_path / "headline.json"
    bad.write_text('{"finetune_seeds": [1], "numbers": {"x": {"expected": 1}}}')
    with pytest.raises(ValueError, match="numbers.x: expected exactly one of tolerance or ratio"):
        headline.load_expected(bad)


@pytest.mark.parametrize("number", headline.load_expected()[0], ids=lambda n: n.name)
def test_files_quote_the_expected_numbers(number):
    """A number quoted in the README or a conf comment is the one `make headline` checks:
    changing one without the other fails here."""
    for name in number.quoted_in:
        assert number.quoted() in (ROOT / name).read_text(), f"{name} does not quote {number.name} as {number.quoted()}"
