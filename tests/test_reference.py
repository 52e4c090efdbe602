"""Frozen logits of small SSA models (tests/fixtures/make_ssa_reference.py wrote them): the math must not drift.

The fixture was written before the position slope had its forms (it stores sigmoid(`position_logit`) and boolean
sides in its config), so it also checks that such checkpoints still load, strictly, and give the same logits."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lit_gpt import GPT, Config
from lit_gpt.checkpoint import load_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "ssa_reference.safetensors"


def load_reference():
    with safe_open(FIXTURE, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return metadata, tensors


@pytest.mark.parametrize("key", ["llama_ssa_shared", "pythia_ssa_separate"])
def test_logits_match_frozen_reference(key):
    metadata, tensors = load_reference()
    model = GPT(Config.from_dict(json.loads(metadata[key]))).eval()
    prefix = f"{key}/weights/"
    weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    assert any(k.endswith("position_logit") for k in weights)
    load_state_dict(model, weights, allow_missing=set(), source=str(FIXTURE))
    assert model.temperature_parameters()
    with torch.no_grad():
        torch.testing.assert_close(model(tensors[f"{key}/idx"]), tensors[f"{key}/logits"], rtol=1e-5, atol=1e-5)
