"""Gated attention and selective attention against independent float64 references written from their formulas:

    gated (Qiu et al. 2025):      y'_i = y_i * scale * sigmoid(x_i W_g)       (per head, or per channel)
    selective (Leviathan et al.):  S = ReLU(head 0's causal logits); S[:, 0] = 0; S * (1 - I); S shifted down by one
                                   query; F = cumsum over queries; every head's logits minus F before the softmax

with grouped-query attention by repeating key and value heads. The references read the module's parameters and
nothing else of lit_gpt.model: outputs and every gradient (inputs and all parameters) agree to 1e-9 relative."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, assert_attention_matches, randomize_temperatures, rotate

from lit_gpt import GPT, Config
from lit_gpt.analysis import recording_attention

FAMILIES_WITH_MQA = {**FAMILIES, "llama-mqa": dict(FAMILIES["llama"], n_query_groups=1)}
VARIANTS = {
    "gate-headwise": dict(attention_gate="headwise"),
    "gate-elementwise": dict(attention_gate="elementwise", attention_gate_scale=2.0),
    "selective": dict(selective_mask="leviathan"),
    "selective+gate": dict(selective_mask="leviathan", attention_gate="headwise"),
}


def reference_selective_f(logits: torch.Tensor) -> torch.Tensor:
    """F (B, T, T) from the logits (B, nh, T, T), as the paper's listing computes it."""
    T = logits.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    s = torch.where(causal, logits[:, 0], torch.tensor(float("-inf"), dtype=logits.dtype))
    s = torch.relu(s)
    s = s.clone()
    s[..., 0] = 0  # the first token is never masked
    s = s * (1 - torch.eye(T, dtype=s.dtype))  # no token masks itself
    s = torch.roll(s, 1, dims=-2)
    s[..., 0, :] = 0  # a token's decision reaches strictly later queries only
    return s.cumsum(dim=-2)


def reference_attention(attn, config: Config, x, cos, sin):
    B, T, _ = x.shape
    nh, ng, hs = config.n_head, config.n_query_groups, config.head_size
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv[..., : nh * hs], qkv[..., nh * hs : (nh + ng) * hs], qkv[..., (nh + ng) * hs :]
    q, k, v = q.view(B, T, nh, hs), k.view(B, T, ng, hs), v.view(B, T, ng, hs)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k, v = k.repeat_interleave(nh // ng, dim=2), v.repeat_interleave(nh // ng, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hs)  # (B, nh, T, T)
    if config.selective_mask == "leviathan":
        logits = logits - reference_selective_f(logits)[:, None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    y = torch.einsum("bhij,bjhd->bihd", probs, v)  # (B, T, nh, hs)
    if config.attention_gate != "none":
        gate = torch.sigmoid(x @ attn.gate.proj.weight.T) * config.attention_gate_scale
        y = y * gate.view(B, T, nh, -1)
    return F.linear(y.reshape(B, T, nh * hs), attn.proj.weight, attn.proj.bias)


def build(family: str, variant: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(**{**FAMILIES_WITH_MQA[family], **VARIANTS[variant]})).double()
    randomize_temperatures(model, seed=seed + 1)
    return model


@pytest.mark.parametrize("family", FAMILIES_WITH_MQA)
@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_equals_the_float64_reference_in_outputs_and_every_gradient(family, variant):
    model = build(family, variant)
    config, attn, T = model.config, model.transformer.h[0].attn, 12
    x, cos, sin, _ = assert_attention_matches(model, reference_attention, T)
    if config.selective_mask != "none":  # F is not zero on this input: the test could fail
        q = rotate(F.linear(x, attn.qkv.weight, attn.qkv.bias)[..., : config.head_size].view(2, T, 1, -1), cos, sin)
        assert reference_selective_f(torch.einsum("bihd,bjhd->bhij", q, q)).abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES_WITH_MQA)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_in_irregular_chunks_equals_the_full_forward(family, variant):
    model = build(family, variant).float().eval()
    x = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(x)
        model.set_kv_cache(2, 30)
        chunks = [model(x[:, a:b], input_pos=torch.arange(a, b)) for a, b in ((0, 7), (7, 8), (8, 19), (19, 20),
                                                                               (20, 30))]
        again = model(x[:, :5], input_pos=torch.arange(5))  # slot 0 starts a new sequence
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, full[:, :5], rtol=1e-5, atol=1e-5)


def test_selective_cache_refuses_slots_out_of_order():
    model = build("llama", "selective").float().eval()
    x = torch.randint(0, model.config.vocab_size, (1, 10))
    model.set_kv_cache(1, 10)
    with torch.no_grad():
        model(x[:, :4], input_pos=torch.arange(4))
        with pytest.raises(ValueError, match="decode slot 4 next"):
            model(x[:, 6:8], input_pos=torch.arange(6, 8))


@pytest.mark.parametrize("variant", ["selective", "selective+gate"])
def test_recording_shows_f_and_equals_the_fused_path(variant):
    model = build("llama", variant).float().eval()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        fused = model(x)
        with recording_attention(model) as records:
            explicit = model(x)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    f = records[0]["selective_mask"]
    assert f.shape == (2, 16, 16) and f.abs().max() > 0
    assert torch.all(f.triu(0) == 0) or torch.all(f.diagonal(dim1=-2, dim2=-1) == 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_adding_a_neighbour_does_not_shift_the_backbones_initialisation(variant):
    torch.manual_seed(7)
    vanilla = GPT(Config.from_name("debug")).state_dict()
    torch.manual_seed(7)
    other = GPT(Config.from_name("debug", **VARIANTS[variant])).state_dict()
    assert set(vanilla) <= set(other)
    for name, tensor in vanilla.items():
        assert torch.equal(tensor, other[name]), name


def test_the_gate_starts_as_the_identity_with_scale_two_and_can_learn():
    torch.manual_seed(0)
    vanilla = GPT(Config.from_name("debug")).eval()
    gated = GPT(Config.from_name("debug", attention_gate="headwise", attention_gate_scale=2.0)).eval()
    gated.load_state_dict(vanilla.state_dict(), strict=False)
    x = torch.randint(0, 1000, (2, 24))
    assert torch.equal(gated(x), vanilla(x))
    gated(x, targets=x).backward()
    assert gated.transformer.h[0].attn.gate.proj.weight.grad.abs().sum() > 0


def test_parameters_added_and_refused_combinations():
    base = Config.from_name("pythia-160m")
    counts = {}
    for name, values in {"headwise": dict(attention_gate="headwise"), "elementwise": dict(attention_gate="elementwise"),
                         "selective": dict(selective_mask="leviathan")}.items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in GPT(Config(**{**base.to_dict(), **values})).added_parameters())
    assert counts == {"headwise": 12 * 768 * 12, "elementwise": 12 * 768 * 768, "selective": 0}
    with pytest.raises(ValueError, match="selective_mask='leviathan' with attention_temperature='ssa' is not defined"):
        Config.from_name("debug", selective_mask="leviathan", attention_temperature="ssa")
    Config.from_name("debug", attention_gate="headwise", attention_temperature="ssa")  # a gate combines
    with pytest.raises(ValueError, match="attention_gate_scale"):
        Config.from_name("debug", attention_gate="headwise", attention_gate_scale=0.0)
