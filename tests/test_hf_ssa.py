"""SSA inside a transformers model (lit_gpt.hf_ssa.add_ssa) against our own model with the same parameters: outputs
and gradients in float64, cached decoding and beam search with transformers' own cache, left padding."""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lit_gpt import GPT  # noqa: E402
from lit_gpt.hf import lit_weights_from_hf  # noqa: E402
from lit_gpt.hf_ssa import add_selective, add_ssa, selective_layer_class  # noqa: E402
from lit_gpt.model import slope_parameter  # noqa: E402
from lit_gpt.remote.modeling import CACHE_NAME  # noqa: E402

SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
             max_position_embeddings=128, vocab_size=96)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=False),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16, use_sliding_window=False),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
                                                   rotary_pct=0.25, use_parallel_residual=True),
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=96, n_positions=128,
                                            bos_token_id=0, eos_token_id=0),
}
VARIANTS = {
    "ssa": {},
    "ssa separate": {"ssa_token_weights": "separate"},
    "ssa official slope, key position+token": {"ssa_slope_form": "official", "ssa_key": "position+token"},
    "ssa_position": {"attention_temperature": "ssa_position"},
    "ssmax": {"attention_temperature": "ssmax"},
    "logn": {"attention_temperature": "logn", "logn_length": 4},
    "gate headwise": {"attention_temperature": "none", "attention_gate": "headwise", "attention_gate_scale": 2.0},
    "ssa with gate elementwise": {"attention_gate": "elementwise", "attention_gate_scale": 2.0},
    "selective": {"attention_temperature": "none", "selective_mask": "leviathan"},
    "selective with gate headwise": {"attention_temperature": "none", "selective_mask": "leviathan",
                                     "attention_gate": "headwise", "attention_gate_scale": 2.0},
}
SELECTIVE = VARIANTS["selective"]
WITHOUT_PARAMETERS = ("logn", "selective")  # Qwen's logn and selective attention have none


def added(name: str) -> bool:
    """A parameter that add_ssa or add_gate put on the model."""
    return "temperature" in name or ".gate." in name


def hf_model(family: str, attention: str = "eager", **fields):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=attention).double()
    with torch.no_grad():  # biases and q/k norms away from their start, so that the order of each is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "_norm" in name:
                p.normal_(mean=1.0 if "_norm" in name else 0.0, std=0.1)
    add_ssa(model, **fields)
    set_away_from_start(model)
    return model.eval()


def set_away_from_start(model, slope: float = 0.05, seed: int = 3) -> None:
    """The added parameters away from their start (the model itself): slopes near `slope`, token weights and gates
    random, drawn in each parameter's own dtype."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if added(name):
                start = p
                if name.endswith("position_param"):
                    start = slope_parameter(torch.tensor(slope, dtype=p.dtype), model.ssa_config.ssa_slope_form)
                p.copy_(start + torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)


def our_name(key: str) -> str:
    """A temperature's name in our model: model.layers.0.self_attn.X (gpt_neox.layers.0.attention.X) is
    transformer.h.0.attn.X."""
    layer, rest = re.match(r".*(?:layers|\.h)\.(\d+)\.(?:self_attn|attention|attn)\.(.+)", key).groups()
    return f"transformer.h.{layer}.attn.{rest}"


def ours_of(model) -> GPT:
    """Our model with the transformers model's weights and temperatures."""
    ours = GPT(model.ssa_config).double().eval()
    state = model.state_dict()
    backbone = [(k, v) for k, v in state.items() if not added(k)]
    weights = dict(lit_weights_from_hf(model.ssa_config, backbone))
    for key, value in state.items():
        if added(key):
            weights[our_name(key)] = value
    missing, unexpected = ours.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if added(k)]
    return ours


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_add_ssa_equals_our_model_in_outputs_and_gradients(family, variant):
    model = hf_model(family, **VARIANTS[variant])
    ours = ours_of(model)
    has_parameters = variant not in WITHOUT_PARAMETERS
    assert (sum(added(k) for k in model.state_dict()) > 0) == has_parameters
    idx = torch.randint(0, 96, (2, 24))
    theirs_logits, our_logits = model(idx).logits, ours(idx)
    # transformers computes RoPE's angles in float32 (1e-8 apart from ours in float64): what the tolerance allows
    torch.testing.assert_close(theirs_logits, our_logits, rtol=1e-6, atol=1e-6)
    (theirs_logits**2).mean().backward()
    (our_logits**2).mean().backward()
    torch.testing.assert_close(model.get_input_embeddings().weight.grad, ours.transformer.wte.weight.grad,
                               rtol=1e-5, atol=1e-8)
    ours_params = dict(ours.named_parameters())
    compared = 0
    for key, p in model.named_parameters():
        if added(key):
            torch.testing.assert_close(p.grad, ours_params[our_name(key)].grad, rtol=1e-5, atol=1e-8)
            compared += 1
    assert compared >= 2 or not has_parameters
    if variant.startswith("selective"):  # without F (the family's own eager attention) it computes something else
        model.set_attn_implementation("eager")
        assert not torch.allclose(model(idx).logits, our_logits, rtol=1e-6, atol=1e-6)
    if not has_parameters:
        return
    # a model whose temperatures differ computes something else: the comparison can fail
    with torch.no_grad():
        next(p for k, p in model.named_parameters() if added(k)).add_(0.5)
    assert not torch.allclose(model(idx).logits, our_logits, rtol=1e-6, atol=1e-6)  # the tolerance passed above


@pytest.mark.parametrize("variant", ["ssa", "selective"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_and_beam_search_equal_full_recomputation(family, variant):
    """With transformers' own DynamicCache, token by token: the logits of a full forward pass; beam search with the
    cache chooses what it chooses without one (selective attention: F's running sums live on the cache)."""
    model = hf_model(family, **VARIANTS[variant])
    idx = torch.randint(0, 96, (1, 16))
    full = model(idx).logits
    cache = transformers.DynamicCache()
    out = model(idx[:, :10], **{CACHE_NAME: cache}, use_cache=True)
    steps = [out.logits]
    for t in range(10, 16):
        steps.append(model(idx[:, t : t + 1], **{CACHE_NAME: getattr(out, CACHE_NAME)}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-6, atol=1e-6)
    settings = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    with_cache = model.generate(idx[:, :6], use_cache=True, **settings)
    without = model.generate(idx[:, :6], use_cache=False, **settings)
    assert torch.equal(with_cache, without)
    hidden = model(idx, output_hidden_states=True).hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("variant", ["ssa", "selective"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_left_padded_row_equals_the_row_unpadded(family, variant):
    """SSA's position term is absolute: positions come from the attention mask, so three pads change nothing; nor do
    they to selective attention, whose first real token is never masked and whose pads mask nothing. (sdpa:
    transformers' eager attention gives NaN for left-padded float64 rows, with or without SSA.)"""
    model = hf_model(family, "sdpa", **VARIANTS[variant])
    row = torch.randint(1, 96, (1, 12))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1)
    batch = torch.cat([padded, torch.randint(1, 96, (1, 15))])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    alone = model(row).logits[0]
    # GPT-2's learned position embedding is absolute too, and transformers numbers a plain call's tokens from 0
    # whatever the mask: its callers pass the positions (generate does); SSA takes them from there
    positions = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if family == "gpt2" else {}
    in_batch = model(batch, attention_mask=mask, **positions).logits[0, 3:]
    torch.testing.assert_close(in_batch, alone, rtol=1e-6, atol=1e-6)
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[0, 3:], model.generate(row, max_new_tokens=5, do_sample=False, pad_token_id=0)[0])


def test_beam_search_reorders_selective_attentions_sums_with_the_keys(monkeypatch):
    """Beam search reorders the cache between steps; F's running sums must follow their keys. With larger query and
    key weights (F matters), cached beam search equals beam search without a cache, and it does not when the sums stay
    in their old order."""
    model = hf_model("llama", **SELECTIVE)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    torch.manual_seed(0)
    idx = torch.randint(1, 96, (6, 8))
    settings = dict(max_new_tokens=16, num_beams=4, do_sample=False, pad_token_id=0)
    without = model.generate(idx, use_cache=False, **settings)
    assert torch.equal(model.generate(idx, use_cache=True, **settings), without)
    layer = selective_layer_class()
    monkeypatch.setattr(layer, "reorder_cache", layer.__base__.reorder_cache)  # the keys reordered, not the sums
    assert not torch.equal(model.generate(idx, use_cache=True, **settings), without)


def test_selective_attentions_sums_follow_the_caches_batch_operations():
    """add_selective puts selective attention on the model; its cache layers carry, per key, the sum of S over the
    queries seen (each row's own), and reorder, repeat and select them with the keys; taking tokens back is refused."""
    model = add_selective(transformers.AutoModelForCausalLM.from_config(FAMILIES["llama"]()).double().eval())
    assert model.config._attn_implementation == "lit_gpt_selective" and model.ssa_config.selective_mask == "leviathan"
    idx = torch.randint(0, 96, (3, 7))
    cache = transformers.DynamicCache()
    model(idx, **{CACHE_NAME: cache}, use_cache=True)
    layer = cache.layers[1]
    assert type(layer) is selective_layer_class() and layer.sums.shape == (3, 7)
    alone = transformers.DynamicCache()
    model(idx[2:], **{CACHE_NAME: alone}, use_cache=True)  # a row's sums are its own
    torch.testing.assert_close(layer.sums[2:], alone.layers[1].sums)
    sums, keys = layer.sums.clone(), layer.keys.clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.sums, sums[[2, 0, 1]]) and torch.equal(layer.keys, keys[[2, 0, 1]])
    cache.batch_repeat_interleave(2)
    assert torch.equal(layer.sums, sums[[2, 2, 0, 0, 1, 1]])
    cache.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(layer.sums, sums[[2, 1]]) and torch.equal(layer.keys, keys[[2, 1]])
    with pytest.raises(ValueError, match="cannot take tokens back out of its cache"):
        cache.crop(-2)


def test_selective_attention_takes_a_boolean_an_additive_or_no_mask_alike():
    """The attention function gets sdpa's boolean mask from its own mask function; a caller's 4D additive mask
    (transformers masks with the dtype's minimum) or none at all (plain causal attention) give the same output."""
    from lit_gpt.hf_ssa import selective_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 6, 8, dtype=torch.float64).unbind(0)  # (B, heads, T, hs) each
    allowed = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    additive = torch.zeros(2, 1, 6, 6, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    module = torch.nn.Module()
    outputs = [selective_attention(module, q, k, v, mask, scaling=8**-0.5)[0] for mask in (allowed, additive, None)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=0, atol=0)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert not torch.allclose(outputs[0], plain, atol=1e-3)  # F changed something


def test_selective_attention_in_a_sliding_window_equals_ours_without_a_cache_and_refuses_the_windows_cache():
    """Mistral with a window of 8 over 24 tokens: F sees the window's keys, as in our model; the window's cache drops
    keys whose sums F needs, so a call that would fill it is refused in one line, saying what works instead."""
    from lit_gpt.hf_ssa import add_selective

    torch.manual_seed(0)
    config = transformers.MistralConfig(**SMALL, sliding_window=8)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double().eval()
    add_selective(model)
    idx = torch.randint(0, 96, (2, 24))
    torch.testing.assert_close(model(idx, use_cache=False).logits, ours_of(model)(idx), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer .* pass use_cache=False, or convert the model"):
        model(idx)


def test_a_cache_selective_attention_cannot_use_is_refused_in_one_line():
    """A cache filled without selective attention has no sums; a static cache keeps none: one line each."""
    model = hf_model("llama", **SELECTIVE)
    idx = torch.randint(0, 96, (1, 6))
    cache = transformers.DynamicCache()
    model.set_attn_implementation("eager")
    model(idx, **{CACHE_NAME: cache}, use_cache=True)  # plain attention fills it
    model.set_attn_implementation("lit_gpt_selective")
    with pytest.raises(ValueError, match="sums do not match the cache: it holds 6 keys for 1 rows, the sums none"):
        model(idx[:, :1], **{CACHE_NAME: cache}, use_cache=True)
    with pytest.raises(ValueError, match=r"StaticLayer \(a static cache or a sliding window\): use DynamicCache"):
        model.generate(idx, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


@pytest.mark.parametrize("family, variant", [("llama", "ssa separate"), ("gpt2", "selective with gate headwise")])
def test_gradient_checkpointing_gives_the_same_gradients(family, variant):
    """transformers' gradient checkpointing (the Trainer's gradient_checkpointing=True) runs each layer again in the
    backward pass: the hooks and the attention function run again, with what they read then, and every gradient is
    the one without checkpointing."""
    model = hf_model(family, "sdpa", **VARIANTS[variant]).train()
    for module in model.modules():  # GPT-2's dropout would draw other masks in the second run
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    idx = torch.randint(0, 96, (2, 16))
    model(idx, labels=idx).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()  # its name by version
    model(idx, labels=idx).loss.backward()
    assert any(added(n) for n in plain)
    for name, p in model.named_parameters():
        if name in plain:
            torch.testing.assert_close(p.grad, plain[name], rtol=1e-9, atol=1e-12)


def test_bad_fields_and_unsupported_models_are_one_line():
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES["llama"]())
    with pytest.raises(ValueError, match="not an attention field"):
        add_ssa(model, n_layer=3)
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
                                                             ffn_dim=32, vocab_size=32, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="add_ssa supports model_type .*this model is 'opt'"):
        add_ssa(opt)
    with pytest.raises(ValueError, match="selective_mask='leviathan' with attention_temperature='ssa' is not defined"):
        add_ssa(transformers.AutoModelForCausalLM.from_config(FAMILIES["llama"]()), selective_mask="leviathan")
    add_ssa(model)
    with pytest.raises(ValueError, match="already has SSA"):
        add_ssa(model)


LOADER = """
import sys
sys.modules["lit_gpt"] = None  # the folders must stand on their own: this project cannot be imported here
import torch, transformers
ids, results = torch.load(sys.argv[1]), {}
for folder in sys.argv[3:]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float64)
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    hidden = model(ids, output_hidden_states=True).hidden_states
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
    results[folder] = {
        "logits": model(ids).logits, "beams": beams, "class": type(model).__name__,
        "attention": model.config._attn_implementation, "bases": [c.__name__ for c in type(model).__mro__],
        "hidden": len(hidden),
        "temperatures": {k: v for k, v in model.state_dict().items() if "temperature" in k or ".gate." in k},
        "dtypes": {k: v.dtype for k, v in loaded.state_dict().items()
                   if "temperature" in k or ".gate." in k or "mlp" in k}}
torch.save(results, sys.argv[2])
"""
SAVED = {"llama": ("llama", {}), "qwen3": ("qwen3", {}), "gpt_neox": ("gpt_neox", {}), "gpt2": ("gpt2", {}),
         "llama gate": ("llama", {"attention_gate": "headwise", "attention_gate_scale": 2.0}),
         "gpt2 gate": ("gpt2", {"attention_gate": "headwise", "attention_gate_scale": 2.0}),
         "qwen2 selective with gate": ("qwen2", VARIANTS["selective with gate headwise"]),
         "gpt_neox selective": ("gpt_neox", SELECTIVE)}


@pytest.fixture(scope="module")
def saved_and_loaded(tmp_path_factory):
    """Each case of SAVED saved with save_pretrained, then all loaded in one fresh process that cannot import
    lit_gpt; returns {case: (model, what that process computed)} and the token ids."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("saved")
    models = {case: hf_model(family, **fields) for case, (family, fields) in SAVED.items()}
    folders = {case: str(root / f"saved-{i}") for i, case in enumerate(SAVED)}
    for case, model in models.items():
        model.save_pretrained(folders[case])
    ids = torch.randint(0, 96, (1, 10))
    torch.save(ids, root / "ids.pt")
    result = subprocess.run([sys.executable, "-c", LOADER, str(root / "ids.pt"), str(root / "out.pt"),
                             *folders.values()], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(root / "out.pt")
    return {case: (models[case], got[folders[case]]) for case in SAVED}, ids


@pytest.mark.parametrize("case", SAVED)
def test_a_saved_ssa_model_loads_as_its_family_with_ssa_without_this_project(saved_and_loaded, case):
    """save_pretrained writes the temperatures and remote code that subclasses the family's own class: loaded in a
    process where lit_gpt cannot be imported, it is a Llama (or Qwen3) with SSA, computes what the saved model did,
    runs beam search and returns hidden states; in bf16 the temperatures and the gate stay float32 (and the MLP's
    gate_proj does not). A model with selective attention loads with its attention function."""
    loaded, ids = saved_and_loaded
    model, got = loaded[case]
    fields = SAVED[case][1]
    base_class = type(model).__name__
    ssa_class = base_class.replace("ForCausalLM", "SSAForCausalLM").replace("LMHeadModel", "SSALMHeadModel")
    assert got["class"] == ssa_class and base_class in got["bases"]
    torch.testing.assert_close(got["logits"], model(ids).logits, rtol=1e-6, atol=1e-6)  # sdpa there, eager here
    assert got["attention"] == ("lit_gpt_selective" if "selective_mask" in fields else "sdpa")
    expected = {k: v for k, v in model.state_dict().items() if added(k)}
    assert got["temperatures"].keys() == expected.keys() and (expected or fields == SELECTIVE)
    assert all(torch.equal(got["temperatures"][k], v) for k, v in expected.items())
    assert torch.equal(got["beams"], model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False,
                                                    pad_token_id=0))
    assert got["hidden"] == model.config.num_hidden_layers + 1
    dtypes = got["dtypes"]
    assert {dtype for name, dtype in dtypes.items() if "mlp" not in name} == ({torch.float32} if expected else set())
    assert {dtype for name, dtype in dtypes.items() if "mlp" in name} == {torch.bfloat16}


def lora_model(family: str = "llama", **fields):
    peft = pytest.importorskip("peft")
    from lit_gpt.hf_ssa import ADDED_MODULES

    model = hf_model(family, **fields)
    targets = {"gpt_neox": ["query_key_value", "dense"], "gpt2": ["c_attn", "c_proj"]}.get(
        family, ["q_proj", "k_proj", "v_proj", "o_proj"])
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # B random: an update
                             target_modules=targets,
                             modules_to_save=list(ADDED_MODULES))
    return model, peft.get_peft_model(model, config)


def moved_by_a_step(model, idx) -> set[str]:
    """The names of the trainable parameters that one AdamW step on the language-modelling loss changed."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(idx, labels=idx).loss.backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}


@pytest.mark.parametrize("family, fields", [("llama", {}), ("qwen3", {}), ("gpt_neox", {}), ("gpt2", {}),
                                            ("qwen2", {"attention_gate": "headwise", "attention_gate_scale": 2.0})])
def test_lora_through_peft_trains_adapters_and_temperatures_and_merges_with_ssa(family, fields):
    """SSA (and a gate) before PEFT, in modules_to_save: the hooks scale the projection with its LoRA update (a hook
    left on the base layer would scale the base alone), all train, and merge_and_unload keeps SSA and the gate."""
    import copy

    _, model = lora_model(family, **fields)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("temperature" in n for n in trainable)
    assert not any("embed" in n or n.endswith("proj.base_layer.weight") or n.endswith("value.base_layer.weight")
                   for n in trainable)
    idx = torch.randint(0, 96, (2, 16))
    adapted = model(idx).logits
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert sum("temperature" in name for name, _ in merged.named_parameters()) > 0
    torch.testing.assert_close(merged(idx).logits, adapted, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours_of(merged)(idx), adapted, rtol=1e-6, atol=1e-6)  # our model, merged weights
    changed = moved_by_a_step(model, idx)
    assert any("lora_B" in n for n in changed) and any("temperature" in n for n in changed)
    assert any(".gate." in n for n in changed) == bool(fields)


def test_lora_through_peft_with_selective_attention_and_a_gate():
    """Selective attention builds F from the queries and keys with their LoRA update (the attention function gets what
    the adapted projections give): the adapted model equals our model with the merged weights; adapters and gate
    train, and the merged model keeps the attention function."""
    import copy

    _, model = lora_model("llama", **VARIANTS["selective with gate headwise"])
    idx = torch.randint(0, 96, (2, 16))
    adapted = model(idx).logits
    merged = copy.deepcopy(model).merge_and_unload()
    assert merged.config._attn_implementation == "lit_gpt_selective"
    torch.testing.assert_close(ours_of(merged)(idx), adapted, rtol=1e-6, atol=1e-6)
    changed = moved_by_a_step(model, idx)
    assert any("lora_B" in n for n in changed) and any(".gate." in n for n in changed)


def test_the_trainer_trains_a_step_of_lora_with_ssa(tmp_path):
    """transformers' Trainer on a PEFT model with SSA: a step runs, and the saved adapter holds the temperatures."""
    from safetensors.torch import load_file

    _, model = lora_model()
    model = model.float()
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (8, 16)).tolist()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True,
                                          save_strategy="no")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "temperature" in n and p.requires_grad}
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("temperature" in k for k in saved) and any("lora_A" in k for k in saved)


def recipe(doc: str, heading: str) -> str:
    """The first python block after `heading` in a doc."""
    text = doc.split(heading, 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_peft_trainer_recipe_in_the_docs_runs_as_written(tmp_path, text_file, monkeypatch):
    """docs/finetuning.md's recipe on a tiny Llama with a 512-token BPE of the text instead of SmolLM2 (the three names
    are all that change; a vocabulary of 50k made the 100 steps the slowest test of the suite): it trains, and the
    merged folder loads as a Llama with SSA whose slopes moved."""
    import json
    from pathlib import Path

    from lit_gpt.data.prepare import train_bpe

    pytest.importorskip("peft")
    pytest.importorskip("datasets")
    torch.manual_seed(0)
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, "vocab_size": 512}))
    tiny.save_pretrained(tmp_path / "tiny")
    train_bpe([text_file.read_text()], 512, tmp_path / "tiny")
    settings = json.loads((tmp_path / "tiny" / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    (tmp_path / "tiny" / "tokenizer_config.json").write_text(json.dumps(settings))
    code = recipe((Path(__file__).parents[1] / "docs" / "finetuning.md").read_text(), "## In transformers")
    names = '"HuggingFaceTB/SmolLM2-135M", "my_text.txt", "out/smollm2-ssa-lora"'
    assert names in code
    code = code.replace(names, f'"{tmp_path / "tiny"}", "{text_file}", "{tmp_path / "out"}"')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/finetuning.md", "exec"), {})
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(loaded).__name__ == "LlamaSSAForCausalLM"
    slopes = [p for n, p in loaded.named_parameters() if n.endswith("query_temperature.position_param")]
    assert slopes and not torch.allclose(slopes[0].exp(), torch.full_like(slopes[0], 6e-4))


def test_qlora_a_4bit_base_with_ssa_equals_its_dequantized_model_and_trains(tmp_path):
    """QLoRA as docs/finetuning.md gives it: a Llama loaded in 4 bits (bitsandbytes, NF4) with SSA computes what the
    same model with the dequantized weights and the same temperatures does (the hooks see the quantized projections'
    outputs), and after PEFT's k-bit preparation a step moves the adapters and the temperatures, not the 4-bit base."""
    config = lambda: transformers.LlamaConfig(**{**SMALL, "hidden_size": 64})  # noqa: E731  bitsandbytes' CPU path
    # fails on a projection of 16 outputs (k_proj at width 32)
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from lit_gpt.hf_ssa import ADDED_MODULES

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config()).save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization)
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert any(name.endswith("self_attn.q_proj") for name in quantized)
    add_ssa(model)
    set_away_from_start(model, slope=0.5)
    # the reference: a float Llama with the dequantized weights and the same temperatures
    reference = transformers.LlamaForCausalLM(config())
    add_ssa(reference)
    weights = {k: v for k, v in model.state_dict().items() if k in reference.state_dict()}
    for name, module in quantized.items():
        weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    reference.load_state_dict(weights)
    plain = transformers.LlamaForCausalLM(config())
    plain.load_state_dict({k: v for k, v in weights.items() if not added(k)})
    ids = torch.randint(0, 96, (2, 12))
    # not under torch.no_grad: bitsandbytes 0.50 then repacks the 4-bit weights for its CPU inference kernel, which has
    # no backward, and nothing trains after (docs/finetuning.md says so); bitsandbytes' CPU kernel computes in bf16:
    # 0.002 from the dequantized model, with or without SSA
    effect = (plain(ids).logits - reference(ids).logits).abs().max()
    error = (model(ids).logits - reference(ids).logits).abs().max()
    assert error < 5e-3 and error < effect / 20, (error, effect)

    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       modules_to_save=list(ADDED_MODULES)))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in model.named_parameters() if n.endswith("base_layer.weight")]
    assert frozen and not set(frozen) & set(trainable)  # the 4-bit base is not trained
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])}
    assert any("lora_B" in n for n in changed) and any("query_temperature" in n for n in changed)


def test_a_bf16_model_with_ssa_and_lora_keeps_float32_temperatures_and_trains():
    """Loaded in bf16 (every real checkpoint), add_ssa's temperatures are float32 and stay so under PEFT; a step on
    bf16 activations moves the adapters and the slopes."""
    peft = pytest.importorskip("peft")
    from lit_gpt.hf_ssa import ADDED_MODULES

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(FAMILIES["llama"]()).to(torch.bfloat16)
    add_ssa(model, attention_gate="headwise", attention_gate_scale=2.0)
    assert {p.dtype for n, p in model.named_parameters() if added(n)} == {torch.float32}
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       modules_to_save=list(ADDED_MODULES)))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for n, p in trainable.items() if added(n)} == {torch.float32}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    ids = torch.randint(0, 96, (2, 12))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    torch.optim.AdamW(trainable.values(), lr=1e-2).step()
    changed = {n for n, p in trainable.items() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and any(n.endswith("position_param") for n in changed)
    assert any(".gate." in n for n in changed)
