"""SSA against an independent reference written from the method (docs/method.md), in float64 with the T x T matrix:

    logits_ij = tau_q(i) * tau_k(j) * q_i . k_j / sqrt(d),  causal softmax over j,  out_i = sum_j p_ij tau_v(j) v_j
    tau(n) = 1 + slope * log(n) + tanh(u . gelu(f)),  slope = exp(p) | sigmoid(p) | exp(-exp(p))

with grouped-query attention by repeating key and value heads. It reads the module's parameters and nothing else of
lit_gpt.model: outputs and every gradient (inputs and all parameters) must agree to 1e-9 relative."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, assert_attention_matches, rotate

from lit_gpt import GPT, Config
from lit_gpt.analysis import recording_attention

FAMILIES_WITH_MQA = {**FAMILIES, "llama-mqa": dict(FAMILIES["llama"], n_query_groups=1),
                     # Qwen3's per-head RMSNorm of q and k: the temperatures act after it, and the token term reads q
                     # as normalised (the norm would undo a temperature applied before it)
                     "qwen3-qk-norm": dict(FAMILIES["llama"], norm_qk=True, attn_bias=True)}
TERMS = ("none", "position", "token", "position+token")
SSA_COMBINATIONS = {
    f"q={q},v={v}": dict(attention_temperature="ssa", ssa_query=q, ssa_value=v)
    for q, v in itertools.product(TERMS, TERMS) if (q, v) != ("none", "none")
}
SSA_COMBINATIONS.update({
    "keys-too": dict(attention_temperature="ssa", ssa_key="position+token"),
    "key-only": dict(attention_temperature="ssa", ssa_query="none", ssa_value="none", ssa_key="position"),
    "separate": dict(attention_temperature="ssa", ssa_token_weights="separate", ssa_key="token"),
    "sigmoid": dict(attention_temperature="ssa", ssa_slope_form="sigmoid"),
    "official": dict(attention_temperature="ssa", ssa_slope_form="official"),
    "official-position": dict(attention_temperature="ssa_position"),
    "logn": dict(attention_temperature="logn", logn_length=4),
    "ssmax": dict(attention_temperature="ssmax"),
    "constant": dict(attention_temperature="constant"),
})
SLOPES = {"log": lambda p: torch.exp(p), "sigmoid": lambda p: 1 / (1 + torch.exp(-p)),
          "official": lambda p: torch.exp(-torch.exp(p))}


def reference_tau(temperature, config: Config, x, features, n, heads: int):
    """tau per (batch, token, head), written from the formulas; None for a side without a temperature."""
    if temperature is None:
        return None
    log_n = torch.log(n.double())[None, :, None]  # (1, T, 1)
    mode = config.attention_temperature
    if mode == "logn":
        return torch.clamp(log_n / math.log(config.logn_length), min=1.0).expand(x.size(0), -1, heads)
    if mode == "ssmax":
        return temperature.scale * log_n
    if mode == "constant":
        return temperature.scale.expand(x.size(0), x.size(1), -1)
    tau = torch.ones(x.size(0), x.size(1), heads, dtype=torch.float64)
    if temperature.position_param is not None:
        tau = tau + SLOPES[config.ssa_slope_form](temperature.position_param) * log_n
    if temperature.token_weight is not None:
        if temperature.token_proj is not None:
            features = F.linear(x, temperature.token_proj.weight, temperature.token_proj.bias)
            features = features.view(x.size(0), x.size(1), heads, -1)
        tau = tau + torch.tanh((F.gelu(features) * temperature.token_weight).sum(-1))
    return tau


def reference_attention(attn, config: Config, x, cos, sin):
    B, T, _ = x.shape
    nh, ng, hs = config.n_head, config.n_query_groups, config.head_size
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv[..., : nh * hs], qkv[..., nh * hs : (nh + ng) * hs], qkv[..., (nh + ng) * hs :]
    q, k, v = q.view(B, T, nh, hs), k.view(B, T, ng, hs), v.view(B, T, ng, hs)
    if config.norm_qk:  # RMSNorm over each head's channels
        rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + config.norm_eps) * w  # noqa: E731
        q, k = rms(q, attn.norm_q.weight), rms(k, attn.norm_k.weight)
    n = torch.arange(1, T + 1)
    tau_q = reference_tau(attn.query_temperature, config, x, q, n, nh)
    tau_k = reference_tau(attn.key_temperature, config, x, k, n, ng)
    tau_v = reference_tau(attn.value_temperature, config, x, v, n, ng)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    repeat = nh // ng
    k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)  # (B, T, nh, hs)
    if tau_k is not None:
        tau_k = tau_k.repeat_interleave(repeat, dim=2)
    if tau_v is not None:
        tau_v = tau_v.repeat_interleave(repeat, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hs)  # (B, nh, T, T)
    if tau_q is not None:
        logits = logits * tau_q.permute(0, 2, 1)[..., :, None]  # row i
    if tau_k is not None:
        logits = logits * tau_k.permute(0, 2, 1)[..., None, :]  # column j
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    if tau_v is not None:
        v = v * tau_v[..., None]
    y = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(B, T, nh * hs)
    return F.linear(y, attn.proj.weight, attn.proj.bias)


def randomize(model: GPT, seed: int = 3) -> None:
    """Every temperature parameter far from its start: slopes of 0.1 to 0.9, token weights of size 0.5 (and the q, k
    norms' weights away from one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm_q." in name or ".norm_k." in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            if name.endswith("position_param"):
                p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) * 1.5 - 2.0)
            elif "temperature" in name:
                shift = 1.0 if name.endswith("scale") else 0.0
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5 + shift)


@pytest.mark.parametrize("family", FAMILIES_WITH_MQA)
@pytest.mark.parametrize("variant", SSA_COMBINATIONS)
def test_attention_equals_the_float64_reference_in_outputs_and_every_gradient(family, variant):
    torch.manual_seed(0)
    config = Config(**{**FAMILIES_WITH_MQA[family], **SSA_COMBINATIONS[variant]})
    model = GPT(config).double()
    randomize(model)
    *_, params = assert_attention_matches(model, reference_attention)
    assert any("temperature" in name for name in params) or config.attention_temperature == "logn"


@pytest.mark.parametrize("family", FAMILIES_WITH_MQA)
@pytest.mark.parametrize("variant", ["q=position+token,v=position+token", "keys-too", "separate", "official-position",
                                     "logn", "ssmax", "constant"])
def test_kv_cache_in_irregular_chunks_gives_the_logits_of_one_full_pass(family, variant):
    torch.manual_seed(0)
    model = GPT(Config(**{**FAMILIES_WITH_MQA[family], **SSA_COMBINATIONS[variant]})).double().eval()
    randomize(model)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2)
        pieces, start = [], 0
        for size in (5, 1, 7, 1, 1, 9, 2, 4):
            pieces.append(model(idx[:, start : start + size], input_pos=torch.arange(start, start + size)))
            start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_temperatures_stay_in_float32(family):
    """tau = 1 + 6e-4 log(n) is exactly 1 in bfloat16 for every n up to 634: computed in bf16, an SSA model would
    give the vanilla model's logits bit for bit. Computed in float32, it differs from vanilla as in float32 and
    agrees with its own float32 logits to bf16 tolerance."""
    torch.manual_seed(0)
    vanilla = GPT(Config(**FAMILIES[family])).eval()
    ssa = GPT(Config(**{**FAMILIES[family], "attention_temperature": "ssa", "ssa_position_init": 6e-4})).eval()
    missing, _ = ssa.load_state_dict(vanilla.state_dict(), strict=False)
    assert set(missing) == ssa.added_parameter_names()
    idx = torch.randint(0, 97, (2, 64))
    with torch.no_grad():
        assert not torch.equal(ssa(idx), vanilla(idx))
        ssa_float32 = ssa(idx)
        vanilla.bfloat16()
        ssa.bfloat16()
        ssa_bf16, vanilla_bf16 = ssa(idx), vanilla(idx)
    assert not torch.equal(ssa_bf16, vanilla_bf16)
    torch.testing.assert_close(ssa_bf16.float(), ssa_float32, rtol=0.05, atol=0.05)


def test_temperatures_are_float32_for_bfloat16_inputs():
    model = GPT(Config(**{**FAMILIES["llama"], "attention_temperature": "ssa", "ssa_position_init": 6e-4}))
    randomize(model)
    model.bfloat16()
    with torch.no_grad(), recording_attention(model) as details:
        model(torch.randint(0, 97, (1, 16)))
    assert details[0]["query_temperature"].dtype == torch.float32


@pytest.mark.parametrize("weights", ["shared", "separate"])
def test_building_temperatures_draws_no_random_numbers(weights):
    """Whatever the device, adding temperatures leaves the random stream the backbone is drawn from untouched:
    modules are built without drawing, and GPT.init_weights initialises the temperatures after the backbone."""
    from lit_gpt.model import build_temperature

    config = Config(**{**FAMILIES["llama"], "attention_temperature": "ssa", "ssa_token_weights": weights})
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        generator_state = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
        with torch.device(device):
            temperatures = [build_temperature(config, side) for side in ("query", "key", "value")]
        after = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
        assert torch.equal(generator_state, after) and any(t is not None for t in temperatures)
