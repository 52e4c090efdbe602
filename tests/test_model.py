"""The model and its attention temperatures: SSA as docs/method.md specifies it."""

import math

import pytest
import torch
from helpers import FAMILIES, TEMPERATURE_MODES, randomize_temperatures

from lit_gpt import GPT, Config
from lit_gpt.analysis import recording_attention
from lit_gpt.kernels import LinearCrossEntropy, faster_linear_path, onednn_available, use_onednn_linear

SSA_VARIANTS = {
    "ssa-shared": dict(attention_temperature="ssa"),
    "ssa-separate": dict(attention_temperature="ssa", ssa_token_weights="separate"),
    "ssa-all-sides": dict(attention_temperature="ssa", ssa_key="position+token"),
    "ssa-position-only": dict(attention_temperature="ssa", ssa_query="position", ssa_value="position"),
    "ssa-token-only": dict(attention_temperature="ssa", ssa_query="token", ssa_value="token"),
    "ssa-query-only": dict(attention_temperature="ssa", ssa_value="none"),
    "ssa-value-only": dict(attention_temperature="ssa", ssa_query="none"),
    "ssa-query-both-value-token": dict(attention_temperature="ssa", ssa_value="token"),
    "ssa-sigmoid-slope": dict(attention_temperature="ssa", ssa_slope_form="sigmoid"),
    "ssa-official-slope": dict(attention_temperature="ssa", ssa_slope_form="official"),
    **{mode: dict(attention_temperature=mode) for mode in TEMPERATURE_MODES if mode != "ssa"},
}


def build(family: str, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config(**{**FAMILIES[family], **overrides})).eval()


def with_weights_of(vanilla: GPT, **overrides) -> GPT:
    """The same backbone with another attention temperature; new parameters keep their initialisation."""
    model = GPT(Config(**{**vanilla.config.to_dict(), **overrides})).eval()
    missing, unexpected = model.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected and set(missing) == model.added_parameter_names()
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_switched_off_is_bit_identical_to_vanilla(family):
    vanilla = build(family)
    off = with_weights_of(vanilla, attention_temperature="none", ssa_key="position+token",
                          ssa_token_weights="separate")
    assert set(off.state_dict()) == set(vanilla.state_dict())
    idx = torch.randint(0, 97, (2, 24))
    assert torch.equal(off(idx), vanilla(idx))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("weights", ["shared", "separate"])
def test_token_term_alone_starts_exactly_as_vanilla(family, weights):
    vanilla = build(family)
    ssa = with_weights_of(vanilla, attention_temperature="ssa", ssa_query="token", ssa_value="token",
                          ssa_token_weights=weights)
    idx = torch.randint(0, 97, (2, 24))
    torch.testing.assert_close(ssa(idx), vanilla(idx), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_ssa_at_initialisation_stays_close_to_vanilla(family):
    """With the fine-tuning start (sigmoid(alpha) = 6e-4) the temperatures are 1 + 6e-4 log(n) <= 1.003 at n = 64:
    the next-token distributions may move by at most 1e-3 in total variation."""
    vanilla = build(family)
    ssa = with_weights_of(vanilla, attention_temperature="ssa", ssa_position_init=6e-4)
    idx = torch.randint(0, 97, (2, 64))
    with torch.no_grad():
        p, q = vanilla(idx).softmax(-1), ssa(idx).softmax(-1)
    assert 0 < (p - q).abs().sum(-1).max() / 2 < 1e-3


def test_initial_temperatures_are_the_position_term():
    ssa = build("llama", attention_temperature="ssa", ssa_key="position+token")
    with recording_attention(ssa) as details:
        ssa(torch.randint(0, 97, (1, 10)))
    expected = 1 + 1e-2 * torch.log(torch.arange(1, 11, dtype=torch.float32))
    for layer in details:
        for name in ("query_temperature", "key_temperature", "value_temperature"):
            torch.testing.assert_close(layer[name][0, 0], expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", SSA_VARIANTS)
def test_explicit_path_equals_fused_path(family, variant):
    model = build(family, **SSA_VARIANTS[variant])
    randomize_temperatures(model)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        with recording_attention(model) as details:
            explicit = model(idx)
        torch.testing.assert_close(explicit, model(idx), rtol=1e-5, atol=1e-5)
    assert len(details) == model.config.n_layer
    probs = details[0]["attention"]
    assert probs.shape == (2, model.config.n_head, 30, 30)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, model.config.n_head, 30))
    assert probs.triu(diagonal=1).abs().max() == 0  # causal


def generate_greedy(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> torch.Tensor:
    tokens = prompt
    if use_cache:
        model.set_kv_cache(batch_size=prompt.size(0))
        logits = model(prompt, input_pos=torch.arange(prompt.size(1)))
    for step in range(new_tokens):
        if not use_cache:
            logits = model(tokens)
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat((tokens, next_token), dim=1)
        if use_cache and step < new_tokens - 1:
            logits = model(next_token, input_pos=torch.tensor([tokens.size(1) - 1]))
    model.clear_kv_cache()
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", SSA_VARIANTS)
def test_kv_cache_decoding_equals_full_recomputation(family, variant):
    model = build(family, **SSA_VARIANTS[variant])
    randomize_temperatures(model)
    prompt = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        cached = generate_greedy(model, prompt, 20, use_cache=True)
        full = generate_greedy(model, prompt, 20, use_cache=False)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("variant", SSA_VARIANTS)
def test_kv_cache_logits_use_absolute_positions(variant):
    """Chunked prefill through the cache gives the logits of one full pass (the reference code's log(1) bug)."""
    model = build("llama", **SSA_VARIANTS[variant])
    randomize_temperatures(model)
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=1)
        first = model(idx[:, :12], input_pos=torch.arange(12))
        rest = model(idx[:, 12:], input_pos=torch.arange(12, 20))
    torch.testing.assert_close(torch.cat((first, rest), dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [v for v in SSA_VARIANTS if v not in ("none", "logn")])
def test_gradients_reach_every_temperature_parameter(variant):
    model = build("llama", **SSA_VARIANTS[variant]).train()
    randomize_temperatures(model)
    params = model.temperature_parameters()
    assert params
    idx = torch.randint(0, 97, (2, 16))
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    for name, p in model.named_parameters():
        if any(p is q for q in params):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_reach_zero_initialised_token_weights():
    model = build("llama", attention_temperature="ssa").train()  # u = 0 at initialisation
    idx = torch.randint(0, 97, (2, 16))
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    u = model.transformer.h[0].attn.query_temperature.token_weight
    assert u.abs().sum() == 0 and u.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["gpt2", "pythia-160m"])
def test_shared_ssa_adds_under_half_a_percent(name):
    with torch.device("meta"):
        vanilla = sum(p.numel() for p in GPT(Config.from_name(name)).parameters())
        shared = sum(p.numel() for p in GPT(Config.from_name(name, attention_temperature="ssa")).parameters())
        separate = sum(
            p.numel()
            for p in GPT(Config.from_name(name, attention_temperature="ssa", ssa_token_weights="separate")).parameters()
        )
    assert 0 < (shared - vanilla) / vanilla < 0.005
    assert (separate - vanilla) / vanilla > 0.05


def test_baseline_temperatures_follow_their_formulas():
    config = dict(attention_temperature="logn", logn_length=4)
    model = build("llama", **config)
    with recording_attention(model) as details:
        model(torch.randint(0, 97, (1, 16)))
    n = torch.arange(1, 17, dtype=torch.float32)
    torch.testing.assert_close(details[0]["query_temperature"][0, 0], (n.log() / math.log(4)).clamp(min=1))
    model = build("llama", attention_temperature="ssmax", ssmax_init=0.5)
    with recording_attention(model) as details:
        model(torch.randint(0, 97, (1, 16)))
    torch.testing.assert_close(details[0]["query_temperature"][0, 3], 0.5 * n.log())
    assert details[0]["value_temperature"] is None
    model = build("llama", attention_temperature="ssa_position")
    assert model.transformer.h[0].attn.query_temperature.position_param.shape == (1,)


def test_extra_boolean_and_additive_masks_agree():
    model = build("llama", attention_temperature="ssa")
    randomize_temperatures(model)
    idx = torch.randint(0, 97, (1, 12))
    keep = torch.rand(12, 12) > 0.3
    keep.fill_diagonal_(True)
    additive = torch.zeros(12, 12).masked_fill(~keep, float("-inf"))
    with torch.no_grad():
        boolean_logits = model(idx, mask=keep)
        torch.testing.assert_close(model(idx, mask=additive), boolean_logits)
        with recording_attention(model) as details:
            explicit = model(idx, mask=keep)
        torch.testing.assert_close(explicit, boolean_logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(boolean_logits, model(idx))
    assert details[0]["attention"][0, 0][~keep].abs().max() == 0


def test_extra_mask_of_wrong_shape_is_refused():
    model = build("llama")
    with pytest.raises(ValueError, match=r"\(queries, keys\) = \(12, 12\)"):
        model(torch.randint(0, 97, (1, 12)), mask=torch.ones(12, 5, dtype=torch.bool))


def test_empty_input_is_refused_and_one_token_works():
    model = build("pythia", attention_temperature="ssa")
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    assert model(torch.tensor([[5]])).shape == (1, 1, 128)


def test_too_long_input_is_refused():
    model = build("gpt2")
    with pytest.raises(ValueError, match="exceeds the model's max_seq_length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("head", [dict(), dict(tie_embeddings=True), dict(lm_head_bias=True)])
def test_fused_cross_entropy_equals_logits_then_cross_entropy(head):
    """model(idx, targets=...) never materialises the logits; loss and every gradient equal the plain path."""
    model = build("pythia", **head).double()
    idx = torch.randint(0, 97, (3, 20))
    targets = idx.roll(-1, dims=1)
    targets[0, :7] = -100  # positions without loss (an instruction prompt, padding)
    plain = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
    plain.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    fused = model(idx, targets=targets)
    (2 * fused).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad / 2, expected[name], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets=targets), plain.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("products", ["one", "per three chunks"])
def test_the_fused_loss_takes_chunks_sized_for_the_device_and_any_size_gives_the_same_loss(products, monkeypatch):
    """The softmax is taken over cache-sized chunks on the CPU and 64 times as many logits at a time on a GPU (a GPT-2
    micro-batch of 12 x 1,024 tokens in 10 chunks); the matrix products run over a buffer of 256 MB of logits. Chunk
    and buffer sizes change nothing but the speed: 7-token chunks of 60 tokens, in one product or in products of 21
    tokens (the last shorter), equal one chunk."""
    from lit_gpt import kernels

    assert kernels.loss_chunk_rows(50304, torch.device("cuda")) == 1334
    assert kernels.loss_chunk_rows(50304, torch.device("cpu")) == 20
    assert kernels.loss_chunk_rows(50304, torch.device("meta")) == 20
    assert kernels.loss_buffer_rows(50304, torch.device("cpu"), torch.float32) == 1320  # 66 chunks: 255 MB
    assert kernels.loss_buffer_rows(50304, torch.device("cpu"), torch.bfloat16) == 2660
    assert kernels.loss_buffer_rows(50304, torch.device("cuda"), torch.float32) == 1334
    assert kernels.loss_buffer_rows(50304, torch.device("cuda"), torch.bfloat16) == 2668
    assert kernels.loss_buffer_rows(10**6, torch.device("cuda"), torch.float32) == 67  # at least one chunk
    assert LinearCrossEntropy.apply(torch.zeros(0, 8), torch.randn(5, 8), None, torch.zeros(0, dtype=torch.long)) == 0
    model = build("pythia").double()
    idx = torch.randint(0, 97, (3, 20))
    one = model(idx, targets=idx)
    one.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setitem(kernels.LOSS_CHUNK_ELEMENTS, "cpu", 7 * 97)
    assert kernels.loss_chunk_rows(97, torch.device("cpu")) == 7
    if products == "per three chunks":
        monkeypatch.setattr(kernels, "LOSS_BUFFER_BYTES", 3 * 7 * 97 * 8 + 100)
        assert kernels.loss_buffer_rows(97, torch.device("cpu"), torch.float64) == 21
    chunked = model(idx, targets=idx)
    chunked.backward()
    torch.testing.assert_close(chunked, one, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("buffer", ["whole", "three parts"])
@pytest.mark.parametrize("head", [dict(), dict(lm_head_bias=True)])
def test_fused_cross_entropy_under_bf16_autocast_matches_the_float64_loss(head, buffer, monkeypatch):
    """--precision bf16-mixed: the fused loss multiplies in bf16 (the weight cast once, the softmax gradients kept in
    bf16 for one weight product per buffer, added in float32) and takes log-softmax and sums in float32. Its loss and
    gradients agree with the float64 computation from the same bf16-rounded inputs, over 35 chunks, with the buffer
    holding every row or about a third of them (the last part shorter)."""
    import lit_gpt.kernels as kernels

    if buffer == "three parts":
        monkeypatch.setattr(kernels, "LOSS_BUFFER_BYTES", 4500 * 3000 * 2)
        assert kernels.loss_buffer_rows(3000, torch.device("cpu"), torch.bfloat16) == 12 * 349
    torch.manual_seed(0)
    vocab, width, tokens = 3000, 64, 12_000  # 2**20 // 3000 = 349 rows a chunk
    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = (torch.randn(vocab, width) * 0.1).requires_grad_()
    bias = (torch.randn(vocab) * 0.1).requires_grad_() if head else None
    targets = torch.randint(0, vocab, (tokens,))
    targets[:100] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropy.apply(hidden, weight, bias, targets, -100, True)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    h64, w64 = (t.detach().bfloat16().double().requires_grad_() for t in (hidden, weight))
    b64 = bias.detach().bfloat16().double().requires_grad_() if head else None
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h64, w64, b64), targets, ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    # the products' inputs are bf16 (8 bits of mantissa): gradients agree to bf16's rounding of the softmax gradient
    for got, want in [(hidden.grad, h64.grad), (weight.grad, w64.grad)] + ([(bias.grad, b64.grad)] if head else []):
        torch.testing.assert_close(got.double(), want, rtol=0.02, atol=0.02 * want.abs().max().item())


@pytest.mark.parametrize("form", ["log", "sigmoid", "official"])
@pytest.mark.parametrize("case", ["shared", "separate", "position-per-layer", "token-only"])
def test_hand_written_temperature_backward_passes_gradcheck(case, form):
    from lit_gpt.model import ScaleByTemperature

    B, T, h, d = 2, 5, 3, 4
    double = dict(dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, T, h, d, **double)
    features = target if case == "shared" else torch.randn(B, T, h, d, **double)
    weight = None if case == "position-per-layer" else torch.randn(h, d, **double)
    logit = None if case == "token-only" else -torch.rand(1 if case == "position-per-layer" else h, **double) - 0.5
    log_n = torch.log(torch.arange(1, T + 1, dtype=torch.float64))
    if case == "position-per-layer":
        features = None
    inputs = (target, features, weight, logit, log_n)
    assert torch.autograd.gradcheck(lambda *a: ScaleByTemperature.apply(*a, form), inputs)


@pytest.mark.parametrize("variant", SSA_VARIANTS)
def test_every_variant_starts_from_the_same_backbone(variant):
    vanilla, other = build("llama", seed=3), build("llama", seed=3, **SSA_VARIANTS[variant])
    temperature = other.added_parameter_names()
    for name, tensor in other.state_dict().items():
        if name not in temperature:
            assert torch.equal(tensor, vanilla.state_dict()[name]), name


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_loss_without_grad_mode_does_no_gradient_work(mode, monkeypatch):
    """Validation runs under no_grad while the weights still require grad: the fused loss must not compute the
    gradients a backward pass would need (the weight gradient accumulates with addmm_)."""
    model = build("pythia")
    idx = torch.randint(0, 97, (2, 16))
    calls = []
    original = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with getattr(torch, mode)():
        loss = model(idx, targets=idx)
    assert not calls and loss.grad_fn is None
    model(idx, targets=idx).backward()
    assert calls  # with grad mode on, the gradient work happens in the forward pass
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets=idx), loss)


def test_forward_refuses_to_mix_the_kv_cache_with_full_passes():
    model = build("llama")
    idx = torch.randint(0, 97, (1, 8))
    with pytest.raises(RuntimeError, match="input_pos is for decoding with the KV cache"):
        model(idx, input_pos=torch.arange(8))
    model.set_kv_cache(batch_size=1)
    with pytest.raises(RuntimeError, match="A KV cache is set: pass input_pos"):
        model(idx)
    model.clear_kv_cache()
    assert model(idx).shape == (1, 8, 128)


def test_recording_is_switched_off_after_the_block():
    model = build("llama", attention_temperature="ssa")
    with recording_attention(model) as records:
        model(torch.randint(0, 97, (1, 8)))
    model(torch.randint(0, 97, (1, 8)))
    assert len(records) == model.config.n_layer and all(b.attn.records is None for b in model.transformer.h)


@pytest.mark.parametrize("name", ["pythia-14m", "debug"])
def test_onednn_inference_matches_pytorchs_linear(name, monkeypatch):
    """use_onednn_linear runs inference products in oneDNN (forced here: on some machines PyTorch's own is the
    faster path and the probe keeps it): the same logits to float32 rounding, the same greedy tokens, the same
    parameters; with gradients on, exactly PyTorch's path."""
    from lit_gpt.generation import generate

    monkeypatch.setenv("LIT_GPT_LINEAR", "onednn")

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("PyTorch was built without oneDNN: use_onednn_linear does nothing")
    torch.manual_seed(0)
    plain = GPT(Config.from_name(name, attention_temperature="ssa")).eval()
    fast = GPT(Config.from_name(name, attention_temperature="ssa")).eval()
    fast.load_state_dict(plain.state_dict())
    use_onednn_linear(fast)
    assert any(type(m).__name__ == "OneDNNLinear" for m in fast.modules())
    x = torch.randint(0, plain.config.vocab_size, (2, 24))
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x, only_last=True), plain(x)[:, -1:], rtol=1e-5, atol=1e-5)
        tokens = [torch.cat(list(generate(m, x[:1], 16)), 1) for m in (plain, fast)]
    assert torch.equal(tokens[0], tokens[1])
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in plain.state_dict().items())
    fast(x, targets=x).backward()
    plain(x, targets=x).backward()
    for (name_, p), q in zip(fast.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name_


def test_compiled_blocks_train_like_eager_ones():
    """--compile (torch.compile of each block, on the CPU with its C compiler): the same loss and gradients as eager,
    and the same parameter names."""
    torch.manual_seed(0)
    eager = GPT(Config.from_name("debug", attention_temperature="ssa"))
    randomize_temperatures(eager)
    compiled = GPT(Config.from_name("debug", attention_temperature="ssa"))
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randint(0, 1000, (2, 32))
    losses = [m(x, targets=x) for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_temperatures_stay_float32_under_bf16_autocast():
    """--precision bf16-mixed on the CPU: matrix products in bf16, SSA's temperatures in float32."""
    torch.manual_seed(0)
    model = GPT(Config.from_name("debug", attention_temperature="ssa"))
    randomize_temperatures(model)
    x = torch.randint(0, 1000, (1, 16))
    with recording_attention(model) as plain:
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), recording_attention(model) as mixed:
        model(x)
    for a, b in zip(plain, mixed):
        assert b["query_temperature"].dtype == torch.float32
        torch.testing.assert_close(b["query_temperature"], a["query_temperature"], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fields", [
    {}, {"attention_temperature": "ssa"}, {"attention_temperature": "ssa", "ssa_token_weights": "separate"},
    {"attention_temperature": "ssa", "ssa_slope_form": "official"}, {"attention_temperature": "ssa_position"},
    {"attention_temperature": "logn"}, {"attention_temperature": "ssmax"}, {"attention_temperature": "constant"},
    {"attention_gate": "headwise"}, {"attention_gate": "elementwise"}, {"selective_mask": "leviathan"},
], ids=lambda fields: "-".join(fields.values()) or "vanilla")
def test_torch_compile_traces_each_block_as_one_graph(fields):
    """A graph break splits a compiled block and costs a return to Python per step: SSA's default form passed one
    tensor twice to its autograd Function, which Dynamo cannot trace (10 graphs per block). Counted in training mode,
    where that Function runs."""
    import torch._dynamo

    model = GPT(Config.from_name("debug", vocab_size=64, block_size=16, **fields))
    block, x = model.transformer.h[0], torch.randn(2, 16, model.config.n_embd, requires_grad=True)
    torch._dynamo.reset()
    positions = torch.arange(16)
    explained = torch._dynamo.explain(block)(x, model.cos[:16], model.sin[:16], positions, positions)
    assert explained.graph_count == 1, [str(reason.reason).splitlines()[0] for reason in explained.break_reasons]


@pytest.mark.skipif(not onednn_available(), reason="PyTorch was built without oneDNN: there is no choice to make")
def test_the_linear_path_of_inference_is_the_one_measured_faster(monkeypatch):
    """Decoding takes oneDNN's product or PyTorch's own, whichever the probe timed faster on this machine (each wins
    on some CPU); LIT_GPT_LINEAR forces one, and a misspelt value is one line naming both."""
    monkeypatch.delenv("LIT_GPT_LINEAR", raising=False)
    config = Config.from_name("debug")
    weight = torch.randn(config.padded_vocab_size, config.n_embd)  # the debug model's largest: its output layer
    for faster, slower in (("onednn", "torch"), ("torch", "onednn")):
        seconds = {faster: 1.0, slower: 2.0}
        assert faster_linear_path(weight, timer=seconds.__getitem__) == faster
        model = use_onednn_linear(GPT(config).eval())  # the probe's answer for this shape is kept per process
        assert any(type(m).__name__ == "OneDNNLinear" for m in model.modules()) == (faster == "onednn")
    for forced in ("onednn", "torch"):
        monkeypatch.setenv("LIT_GPT_LINEAR", forced)
        assert faster_linear_path(weight, timer=lambda path: pytest.fail("measured although forced")) == forced
    monkeypatch.setenv("LIT_GPT_LINEAR", "mkl")
    with pytest.raises(ValueError, match="expected onednn or torch"):
        faster_linear_path(weight)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_keeps_small_tensors_off_onednn_and_equals_torchs(monkeypatch, approximate):
    """oneDNN's CPU GELU costs 0.1-12 ms on the few hundred values of a decoding step (PyTorch's own 1.4 us): small
    tensors go to PyTorch's own, large ones (training's activations) stay with oneDNN, the setting restored."""
    import torch.nn.functional as F

    import lit_gpt.kernels as kernels

    seen, enabled = [], torch._C._get_mkldnn_enabled()
    real = F.gelu

    def recording(x, approximate="none"):
        seen.append(torch._C._get_mkldnn_enabled())
        return real(x, approximate=approximate)

    monkeypatch.setattr(kernels.F, "gelu", recording)
    small, large = torch.randn(2, 1, 9, 64), torch.randn(kernels.ONEDNN_GELU_FROM)
    for x in (small, large):
        torch.testing.assert_close(kernels.gelu(x, approximate), real(x, approximate=approximate), rtol=1e-6,
                                   atol=1e-6)
    assert seen == [False, enabled] and torch._C._get_mkldnn_enabled() == enabled
