"""`make bench`'s own arithmetic, on shapes small enough for a test."""

from __future__ import annotations

from benchmarks import bench


def test_mfu_bound_counts_the_loss_pass_on_top_of_the_matmuls():
    """The bound is model FLOPs over the step's matmul time at a given peak: adding the fused
    loss pass can only lower it, and a peak twice as high about halves it."""
    bound = bench.mfu_bound(("gpt2-tiny", 16, 2), peak_gflops=1000.0, repeats=2)
    assert 0 < bound["matmuls_and_loss"] < bound["matmuls"]
    doubled_peak = bench.mfu_bound(("gpt2-tiny", 16, 2), peak_gflops=2000.0, repeats=2)
    assert doubled_peak["matmuls"] < bound["matmuls"]
