"""Fixtures and markers. Shared helpers are in helpers.py."""

import os

import pytest
import torch


def pytest_configure(config):
    """A suite started where Ctrl-C is ignored (a background job of a script) passes that on to pytest-xdist's workers
    and to every tool a test starts, and a tool that ignores SIGINT carries on where a test interrupts it (prepare's
    SIGINT test failed so in every parallel run started that way). Restore Python's own handler, as in a terminal."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    share_the_cores()


def share_the_cores() -> None:
    """Each pytest-xdist worker, and every process its tests start, computes on the worker's share of the cores
    (OMP_NUM_THREADS, unless it is set already). PyTorch otherwise gives each process a thread per core, so `-n 2` on
    two cores ran two to six threads at once, each waiting on the others: tests/test_pretrain.py and test_tools.py
    took 129 s that way and 108 s with a thread per worker (Intel Xeon, 2 cores). A two-process training run's ranks
    take this value too, where Lightning would have divided the cores between them (one thread each on two cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The files that took longest in `pytest --durations` on two cores (each starts many training processes), longest
# first. pytest-xdist's --dist loadfile hands out files in collection order, so none of these is the last file handed
# out while the other worker has nothing left (measured alone, this changed the suite's time by less than its spread).
LONGEST_FILES = ("test_distributed.py", "test_study.py", "test_pretrain.py", "test_tools.py", "test_hf_export.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FILES), the rest in their order. Tests marked `cuda` run where a GPU is present
    and skip, saying why, where none is."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present (scripts/gpu_check.sh runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """120,000 characters of Austen from the bundled corpus, as a text file."""
    import lzma

    from lit_gpt.data.prepare import BUNDLED_CORPUS

    path = tmp_path_factory.mktemp("text") / "austen.txt"
    path.write_text(lzma.decompress(BUNDLED_CORPUS[1].read_bytes()).decode()[:120_000])
    return path


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory, text_file):
    """One trained vanilla checkpoint (helpers.trained_checkpoint) for the fine-tuning and LoRA tests, which only read
    it: training it costs about 20 seconds, so the session trains it once."""
    from helpers import trained_checkpoint

    return trained_checkpoint(tmp_path_factory.mktemp("trained") / "base", text_file)
