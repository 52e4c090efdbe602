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


def write_sums_task(folder, name: str):
    """A local lm-evaluation-harness task (four multiple-choice sums) in folder/tasks; returns that folder."""
    import json

    records = [{"question": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}"], "answer": 0}
               for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (folder / "tasks").mkdir()
    (folder / "tasks" / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    return folder / "tasks"


TEMPERATURE_MODES = ["none", "ssa", "ssa_position", "logn", "ssmax", "constant"]


def randomize_temperatures(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every temperature parameter a non-trivial value, so that tests see SSA at work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.temperature_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5 + p)
