import os
import subprocess
import sys

import pytest

from minigpt.utils import retain_freed_memory

# Page faults per training step once warm. A step allocates ~100 MB of logits and their
# gradient; with glibc's default policy each step maps (and faults in) those pages again.
FAULTS_PER_STEP = """
import resource, sys, torch
from minigpt.model import GPTModel
from minigpt.utils import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.manual_seed(0)
model = GPTModel.from_preset("gpt2-tiny", n_layers=1)
optimizer = torch.optim.AdamW(model.parameters())
x = torch.randint(0, 50257, (4, 128))
def step():
    model(x, x).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def faults_per_step(policy: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, policy], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    return int(out.strip().splitlines()[-1])


@pytest.mark.slow  # two subprocesses of 8 training steps
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc malloc policy")
def test_retained_memory_spares_the_page_faults_of_every_step():
    default, retained = faults_per_step("default"), faults_per_step("retain")
    assert default > 20_000  # the cost being removed: ~100 MB mapped again per step
    assert retained < default / 4, (default, retained)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc malloc policy")
def test_retain_freed_memory_reports_that_it_applied():
    assert retain_freed_memory() is True
