"""`make bench`'s own arithmetic on given timings (it must hold on any machine at any load),
and one smoke test of the measuring code."""

from __future__ import annotations

import math

import pytest

from benchmarks import bench
from minigpt.flops import flops_per_token
from minigpt.model import GPTModel

SHAPE = ("gpt2-tiny", 16, 2)  # preset, context, batch
PEAK = 1000.0  # GFLOP/s


def at_peak(product: bench.Matmul, repeats: int) -> float:
    """A matmul timer that says every product ran at exactly PEAK."""
    return product.flop / (PEAK * 1e9)


def no_loss(rows: int, vocab: int, tokens: int, repeats: int) -> float:
    return 0.0


def test_the_step_matmuls_are_the_flops_the_mfu_counts():
    """Timed at the peak with a free loss, a step's bound is 1: `step_matmuls` lists the same
    products as `flops_per_token` counts (biases and norms, 6 FLOPs each, make up the rest)."""
    bound = bench.mfu_bound(SHAPE, PEAK, time_matmul=at_peak, time_loss=no_loss)
    assert bound["matmuls"] == pytest.approx(1.0, rel=1e-3) and bound["matmuls_and_loss"] == bound["matmuls"]
    model = GPTModel.from_preset("gpt2-tiny", context_length=16)
    matmul_flop = sum(p.count * p.flop for p in bench.step_matmuls(model, 16, 2))
    assert matmul_flop == pytest.approx(flops_per_token(model, 16) * 32, rel=1e-3)


def test_the_loss_pass_lowers_the_bound_by_its_share_of_the_time():
    """A loss pass as long as all the matmuls together halves the bound; twice the peak halves it too."""
    model = GPTModel.from_preset("gpt2-tiny", context_length=16)
    matmul_s = sum(p.count * at_peak(p, 1) for p in bench.step_matmuls(model, 16, 2))
    chunks = 32 / min(bench.CHUNK, 32)

    def as_long_as_the_matmuls(rows: int, vocab: int, tokens: int, repeats: int) -> float:
        assert (rows, vocab, tokens) == (32, model.cfg.vocab_size, 32)
        return matmul_s / chunks

    bound = bench.mfu_bound(SHAPE, PEAK, time_matmul=at_peak, time_loss=as_long_as_the_matmuls)
    assert bound["matmuls_and_loss"] == pytest.approx(bound["matmuls"] / 2, rel=1e-12)
    doubled_peak = bench.mfu_bound(SHAPE, 2 * PEAK, time_matmul=at_peak, time_loss=as_long_as_the_matmuls)
    assert doubled_peak["matmuls"] == pytest.approx(bound["matmuls"] / 2, rel=1e-12)


def test_each_matmul_is_timed_once_and_counted_as_often_as_the_step_runs_it():
    timed: list[bench.Matmul] = []

    def one_ms(product: bench.Matmul, repeats: int) -> float:
        timed.append(product)
        return 1e-3

    bound = bench.mfu_bound(SHAPE, PEAK, repeats=3, time_matmul=one_ms, time_loss=no_loss)
    assert len(timed) == len(set(timed)) == 3 + 4 * 3 + 2  # head, 4 linear layers x 3, attention
    layers = GPTModel.from_preset("gpt2-tiny").cfg.n_layers
    step_s = 1e-3 * (3 + (4 * 3) * layers + 2 * 3 * layers)  # one head chunk; attention fwd + 2 bwd
    model = GPTModel.from_preset("gpt2-tiny", context_length=16)
    assert bound["matmuls"] == pytest.approx(flops_per_token(model, 16) * 32 / 1e9 / step_s / PEAK, rel=1e-12)


def test_a_peak_is_the_best_repetition_of_the_best_shape():
    assert bench.peak_of({"square": [400.0, 900.0, 500.0], "head": [950.0, 100.0]}) == 950.0


def test_a_spread_is_min_median_max_rounded():
    assert bench.spread([3.14159, 1.0, 2.71828, 100.0, 2.5]) == [1.0, 2.7, 100.0]
    assert bench.spread([0.12345], digits=3) == [0.123, 0.123, 0.123]


def results(tokens_per_s: float) -> list[dict]:
    return [{"tokens_per_s": tokens_per_s, "flops_per_token": 1e6, "settings": {"precision": "bf16"}},
            {"tokens_per_s": tokens_per_s / 4, "flops_per_token": 1e6, "settings": {"precision": "fp32"}}]


def test_mfu_is_model_flops_over_the_peak_of_its_precision():
    measured = results(50_000)  # 50 GFLOP/s of model FLOPs in bf16, 12.5 in fp32
    peaks = bench.set_mfus(measured, {"bf16": 100.0, "fp32": 50.0}, remeasure=pytest.fail, log=lambda _: None)
    assert peaks == {"bf16": 100.0, "fp32": 50.0}
    assert [r["mfu"] for r in measured] == [0.5, 0.25]


def test_an_mfu_above_one_re_measures_the_peak_and_keeps_the_higher():
    measured, calls = results(150_000), []  # 1.5 of a 100 GFLOP/s peak: the peak was low

    def remeasure() -> dict[str, float]:
        calls.append(1)
        return {"bf16": 300.0, "fp32": 20.0}

    peaks = bench.set_mfus(measured, {"bf16": 100.0, "fp32": 50.0}, remeasure, log=lambda _: None)
    assert len(calls) == 1 and peaks == {"bf16": 300.0, "fp32": 50.0}
    assert [r["mfu"] for r in measured] == [0.5, 0.75]


def test_an_mfu_still_above_one_fails_the_bench():
    with pytest.raises(RuntimeError, match="MFU 1.5 > 1 even against a re-measured peak"):
        bench.set_mfus(results(150_000), {"bf16": 100.0, "fp32": 50.0},
                       remeasure=lambda: {"bf16": 90.0, "fp32": 40.0}, log=lambda _: None)


def test_the_measuring_code_runs_and_returns_finite_positive_numbers():
    """Smoke only: real timings on a loaded machine may be anything positive."""
    bound = bench.mfu_bound(SHAPE, PEAK, repeats=1)
    assert set(bound) == {"matmuls", "matmuls_and_loss"}
    assert all(math.isfinite(v) and v > 0 for v in bound.values())
