import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same RNG state and a small thread count (CI has 2 cores)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For training tests: tiny models gain nothing from a second thread, and on a busy
    machine two threads spin-wait for each other. The torchrun ranks and subprocesses get
    OMP_NUM_THREADS=1, so the in-process reference must compute on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
