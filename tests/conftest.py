import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_ASSETS = Path(os.environ.get("SSA_SHARED_ASSETS", SHARED / "assets"))

# every tokenizer folder in ../shared/assets/tokenizers, for tests that need a real one
needs_shared_assets = pytest.mark.skipif(
    not SHARED_ASSETS.is_dir(), reason=f"real assets folder {SHARED_ASSETS} is absent"
)


@pytest.fixture(autouse=True)
def deterministic():
    torch.manual_seed(0)
    yield


TEMPERATURE_MODES = ["none", "ssa", "ssa_position", "logn", "ssmax", "constant"]


def randomize_temperatures(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every temperature parameter a non-trivial value, so that tests see SSA at work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.temperature_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5 + p)
