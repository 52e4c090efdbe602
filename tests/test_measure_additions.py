"""study/measure_additions.py: the sizes of SSA's temperature terms, and the gate's values, against references written
from their formulas, and the loss with each switched off against a vanilla model with the same weights."""

import math

import numpy as np
import pytest
import torch
from torch.nn.functional import gelu

from lit_gpt.config import Config
from lit_gpt.model import GPT
from study.measure_additions import addition, losses, main, measure_gates, measure_terms, switched_off
from tests.helpers import FAMILIES, randomize_temperatures

WINDOW = 16


def tiny_ssa(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(**{**FAMILIES["llama"], "attention_temperature": "ssa"})).eval()
    randomize_temperatures(model)
    with torch.no_grad():  # larger slopes and token weights, so that the terms move a tiny model's loss
        for name, p in model.named_parameters():
            if name.endswith("position_param"):
                p.add_(1.0)
            elif name.endswith("token_weight"):
                p.mul_(4.0)
    return model


def reference_terms(model: GPT, rows: torch.Tensor) -> dict:
    """|tau - 1|, |slope log n| and |tanh(u . gelu(f))| per side, from SSA.md's formula on the projections before RoPE
    (read with hooks on every layer's qkv), with n the 1-indexed position."""
    c = model.config
    nh, ng, hs = c.n_head, c.n_query_groups, c.head_size
    features = []
    hooks = [block.attn.qkv.register_forward_hook(lambda m, i, o: features.append(o))
             for block in model.transformer.h]
    with torch.no_grad():
        model(rows)
    for h in hooks:
        h.remove()
    log_n = torch.arange(1, rows.size(1) + 1, dtype=torch.float64).log()[None, :, None]  # (1, T, 1)
    out = {"query": {"tau - 1": [], "position term": [], "token term": []},
           "value": {"tau - 1": [], "position term": [], "token term": []}}
    for block, qkv in zip(model.transformer.h, [f.detach() for f in features]):
        q, _, v = qkv.double().split((nh * hs, ng * hs, ng * hs), dim=-1)
        for side, f, heads in (("query", q, nh), ("value", v, ng)):
            t = getattr(block.attn, f"{side}_temperature")
            slope = t.position_param.detach().double().exp()  # the default slope form: slope = exp(p)
            position = slope * log_n  # (1, T, heads)
            token = torch.tanh((gelu(f.view(*f.shape[:2], heads, hs)) * t.token_weight.detach().double()).sum(-1))
            tau = 1 + position + token
            out[side]["tau - 1"].append((tau - 1).abs().flatten())
            out[side]["position term"].append(position.abs().expand_as(tau).flatten())
            out[side]["token term"].append(token.abs().flatten())
    return {side: {name: torch.cat(v) for name, v in terms.items()} for side, terms in out.items()}


def test_terms_match_the_formula():
    model = tiny_ssa()
    tokens = np.random.default_rng(0).integers(0, 97, 3 * WINDOW + 1).astype(np.int64)
    measured = measure_terms(model, tokens, WINDOW, batch=2)
    rows = torch.from_numpy(tokens[: 3 * WINDOW]).view(3, WINDOW)
    reference = reference_terms(model, rows)
    assert set(measured) == {"query", "value"}
    for side, terms in reference.items():
        for name, values in terms.items():
            got = measured[side][name]
            assert got["mean"] == pytest.approx(values.mean().item(), rel=1e-4, abs=1e-7), (side, name)
            assert got["max"] == pytest.approx(values.max().item(), rel=1e-4, abs=1e-7), (side, name)
            assert got["p99"] == pytest.approx(np.percentile(values.numpy(), 99), rel=1e-4, abs=1e-7), (side, name)
    assert measured["query"]["token term"]["max"] > 0.01  # the fixture's temperatures are far from 1


def test_switched_off_is_the_vanilla_model_and_restores_the_weights():
    model = tiny_ssa()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vanilla = GPT(Config(**FAMILIES["llama"])).eval()
    vanilla.load_state_dict({k: v for k, v in before.items() if k in vanilla.state_dict()})
    tokens = np.random.default_rng(1).integers(0, 97, 4 * WINDOW + 1).astype(np.int64)
    result = losses(model, tokens, WINDOW)
    rows = torch.from_numpy(tokens)
    with torch.no_grad():
        x = torch.stack([rows[i * WINDOW: (i + 1) * WINDOW + 1] for i in range(4)])
        expected = torch.nn.functional.cross_entropy(vanilla(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()
    assert result["neither (vanilla)"] == pytest.approx(expected, rel=1e-6)
    assert abs(result["learned"] - expected) > 1e-4  # 20x the tolerance above: the check can fail
    assert len({round(v, 6) for v in result.values()}) == 4  # each term on its own changes it too
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with switched_off(model, ("token",)):
        assert all(t.token_weight.abs().sum() == 0 for b in model.transformer.h
                   for t in (b.attn.query_temperature, b.attn.value_temperature))
    assert math.isfinite(result["no token term"])


def tiny_gate(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(**{**FAMILIES["llama"], "attention_gate": "headwise", "attention_gate_scale": 2.0})).eval()
    with torch.no_grad():  # gate weights far from their zero start, so that the gates move the loss
        for block in model.transformer.h:
            block.attn.gate.proj.weight.normal_(0.0, 0.5)
    return model


def test_gates_match_the_formula_and_switched_off_is_the_vanilla_model():
    model = tiny_gate()
    tokens = np.random.default_rng(2).integers(0, 97, 3 * WINDOW + 1).astype(np.int64)
    terms, extremes = measure_gates(model, tokens, WINDOW, batch=2)
    inputs = []  # the attention's input x of every layer, read before the gate sees it
    hooks = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
             for b in model.transformer.h]
    with torch.no_grad():
        model(torch.from_numpy(tokens[: 3 * WINDOW]).view(3, WINDOW))
    for h in hooks:
        h.remove()
    g = torch.cat([(2 * torch.sigmoid(x.double() @ b.attn.gate.proj.weight.detach().double().T)).flatten()
                   for b, x in zip(model.transformer.h, inputs)])
    got = terms["gate"]["g - 1"]
    assert got["mean"] == pytest.approx((g - 1).abs().mean().item(), rel=1e-4)
    assert got["max"] == pytest.approx((g - 1).abs().max().item(), rel=1e-4)
    assert got["p99"] == pytest.approx(np.percentile((g - 1).abs().numpy(), 99), rel=1e-4)
    assert extremes == pytest.approx({"lowest": g.min().item(), "highest": g.max().item()}, rel=1e-5)
    assert got["max"] > 0.1  # the fixture's gates are far from 1

    before = {k: v.clone() for k, v in model.state_dict().items()}
    vanilla = GPT(Config(**FAMILIES["llama"])).eval()
    vanilla.load_state_dict({k: v for k, v in before.items() if k in vanilla.state_dict()})
    result = losses(model, tokens, WINDOW)
    with torch.no_grad():
        x = torch.stack([torch.from_numpy(tokens[i * WINDOW: (i + 1) * WINDOW + 1]) for i in range(3)])
        expected = torch.nn.functional.cross_entropy(vanilla(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()
    assert set(result) == {"learned", "gate off, W = 0 (vanilla)"}
    assert result["gate off, W = 0 (vanilla)"] == pytest.approx(expected, rel=1e-6)
    assert abs(result["learned"] - expected) > 1e-4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_refuses_an_existing_record_and_a_model_without_one_addition(tmp_path):
    existing = tmp_path / "t.json"
    existing.write_text("{}")
    with pytest.raises(ValueError, match="never overwritten"):
        main(tmp_path, existing, seed=1)
    assert existing.read_text() == "{}"
    with pytest.raises(ValueError, match="expected a new .json"):
        main(tmp_path, tmp_path / "t.txt", seed=1)
    with pytest.raises(ValueError, match="expected exactly one of an SSA temperature or a gate"):
        addition(GPT(Config(**FAMILIES["llama"])))
    with pytest.raises(ValueError, match="expected 2"):
        addition(GPT(Config(**{**FAMILIES["llama"], "attention_gate": "headwise"})))
    assert addition(tiny_ssa()) == "ssa" and addition(tiny_gate()) == "gate"
