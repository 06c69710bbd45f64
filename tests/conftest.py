import functools
import http.server
import os
import signal
import threading

import pytest
import torch


# pytest-xdist's workers ignore SIGINT, and the processes they start would inherit that: the tests
# that press Ctrl-C (chat, search) need the default back.
signal.signal(signal.SIGINT, signal.default_int_handler)

# Each xdist worker computes on one core: two threads per process oversubscribe the 2 cores
# (pipeline_helpers.THREADS has the numbers).
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

# `make test` runs whole modules on 2 processes (pytest-xdist --dist loadfile) in the order
# collected: the longest modules go first, so the run does not end waiting on one of them.
LONGEST_FIRST = ("test_team_stack.py", "test_mlflow_ui.py", "test_search.py", "test_finetune_pipeline.py",
                 "test_notebooks.py", "test_pipeline_e2e.py", "test_faults.py", "test_ddp.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its order


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


@pytest.fixture(scope="session")
def tokenized_template(tmp_path_factory):
    """A clone with the smoke params whose data stages have run, made once a session: the
    pipeline tests start from a copy of it (`pipeline_helpers.copy_repo`) instead of each
    preparing and tokenizing the same data again (~20 s a time)."""
    from pipeline_helpers import clone_checkout, compose_smoke, run

    repo = clone_checkout(tmp_path_factory.mktemp("tokenized"))
    compose_smoke(repo)
    run(repo, "dvc", "repro", "tokenize")
    return repo


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty minigpt cache for this test (MINIGPT_CACHE_DIR)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(path))
    return path


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
