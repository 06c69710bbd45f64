import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same RNG state and a small thread count (CI has 2 cores)."""
    torch.manual_seed(0)
    yield
