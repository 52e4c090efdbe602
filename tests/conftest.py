"""Fixtures and markers. Shared helpers are in helpers.py."""

import pytest
import torch


def pytest_configure(config):
    """A suite started where Ctrl-C is ignored (a background job of a script) passes that on to pytest-xdist's workers
    and to every tool a test starts, and a tool that ignores SIGINT carries on where a test interrupts it (prepare's
    SIGINT test failed so in every parallel run started that way). Restore Python's own handler, as in a terminal."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where a GPU is present and skip, saying why, where none is."""
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
