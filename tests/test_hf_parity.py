"""Our model against `transformers` (the reference implementation) through the converter's own mapping functions."""

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from lit_gpt import GPT  # noqa: E402
from lit_gpt.checkpoint import load_state_dict  # noqa: E402
from lit_gpt.hf import config_from_hf, hf_config_from_lit, hf_weights_from_lit, lit_weights_from_hf  # noqa: E402


def gpt2():
    return transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=101)


def neox(parallel_residual: bool):
    return transformers.GPTNeoXConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=80, vocab_size=101,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=parallel_residual,
    )


def llama(tied: bool, rope_scaling: bool):
    extra = {}
    if rope_scaling:  # Llama-3.1 frequency scaling, with an original length short enough to matter here
        extra["rope_scaling"] = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=16)
    return transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=72,
        vocab_size=101, max_position_embeddings=64, tie_word_embeddings=tied, rope_theta=500000.0, **extra,
    )


def qwen2():
    return transformers.Qwen2Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=72,
        vocab_size=101, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1000000.0,
        use_sliding_window=False,
    )


def qwen3():
    return transformers.Qwen3Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=16,
        intermediate_size=72, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=False,
        rope_theta=1000000.0, use_sliding_window=False,
    )


def mistral(window: int | None):
    return transformers.MistralConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32, intermediate_size=72,
        vocab_size=101, max_position_embeddings=64, sliding_window=window, tie_word_embeddings=False,
    )


CASES = {
    "gpt2": gpt2,
    "pythia-parallel": lambda: neox(True),
    "pythia-sequential": lambda: neox(False),
    "llama-gqa-untied": lambda: llama(False, False),
    "llama-tied": lambda: llama(True, False),
    "llama31-rope-scaling": lambda: llama(False, True),
    "qwen2-qkv-bias": qwen2,
    "qwen3-qk-norm": qwen3,
    "mistral-window-8": lambda: mistral(8),  # prompts of 33 and 40 tokens: the window matters
    "mistral-no-window": lambda: mistral(None),
}


def build_pair(case: str):
    hf_config = CASES[case]()
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():  # the random init leaves biases at zero and norms at one; make them count
        for name, p in hf_model.named_parameters():
            if name.endswith("bias") or name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    config = config_from_hf(hf_config.to_dict())
    model = GPT(config).eval()
    load_state_dict(model, dict(lit_weights_from_hf(config, hf_model.state_dict().items())), set(), source=case)
    return hf_model, model


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    hf_model, model = build_pair(case)
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        expected = hf_model(idx).logits
        actual = model(idx)[..., : expected.size(-1)]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_reverse_mapping_loads_into_transformers(case, tmp_path):
    hf_model, model = build_pair(case)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_lit(model.config)))
    save_file(dict(hf_weights_from_lit(model.config, model.state_dict().items())), tmp_path / "model.safetensors")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    idx = torch.randint(0, 101, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, hf_model(idx).logits, rtol=1e-5, atol=1e-5)


def test_unknown_hf_tensor_is_named():
    hf_model, model = build_pair("llama-gqa-untied")
    items = list(hf_model.state_dict().items()) + [("model.layers.0.self_attn.rotary.weight", torch.ones(8))]
    with pytest.raises(ValueError, match="rotary"):
        dict(lit_weights_from_hf(model.config, items))


def test_missing_kv_projection_is_named():
    hf_model, model = build_pair("llama-gqa-untied")
    items = [(k, v) for k, v in hf_model.state_dict().items() if k != "model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ValueError, match=r"h\.1\.attn\.qkv"):
        dict(lit_weights_from_hf(model.config, items))


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError, match="supported: gpt2, gpt_neox, llama"):
        config_from_hf({"model_type": "mamba"})


# config.json as published for these models (the fields that matter)
PUBLISHED = {
    "gpt2": {"activation_function": "gelu_new", "model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12,
             "n_positions": 1024, "vocab_size": 50257, "layer_norm_epsilon": 1e-05,
             "_name_or_path": "openai-community/gpt2"},
    "pythia-160m": {"hidden_act": "gelu", "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                    "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 12,
                    "num_hidden_layers": 12, "rotary_emb_base": 10000, "rotary_pct": 0.25,
                    "tie_word_embeddings": False, "use_parallel_residual": True, "vocab_size": 50304,
                    "_name_or_path": "EleutherAI/pythia-160m"},
    "Llama-3.1-8B": {"hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
                     "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
                     "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                     "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "tie_word_embeddings": False, "vocab_size": 128256, "_name_or_path": "meta-llama/Llama-3.1-8B"},
    "SmolLM2-135M": {"hidden_size": 576, "intermediate_size": 1536, "max_position_embeddings": 8192,
                     "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
                     "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_theta": 100000, "tie_word_embeddings": True,
                     "vocab_size": 49152, "_name_or_path": "HuggingFaceTB/SmolLM2-135M"},
}


PUBLISHED.update({
    "Qwen2.5-0.5B": {"hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
                     "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
                     "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
                     "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
                     "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
                     "_name_or_path": "Qwen/Qwen2.5-0.5B"},
    "Qwen3-0.6B": {"attention_bias": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
                   "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
                   "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
                   "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
                   "_name_or_path": "Qwen/Qwen3-0.6B"},
    "Mistral-7B-v0.1": {"hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
                        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
                        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
                        "sliding_window": 4096, "tie_word_embeddings": False, "vocab_size": 32000,
                        "_name_or_path": "mistralai/Mistral-7B-v0.1"},
    "Mistral-7B-v0.3": {"hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
                        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
                        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
                        "vocab_size": 32768, "_name_or_path": "mistralai/Mistral-7B-v0.3"},
})


def test_qwen_with_its_sliding_window_on_is_refused_in_one_line():
    values = dict(PUBLISHED["Qwen2.5-0.5B"], use_sliding_window=True)
    with pytest.raises(ValueError, match="use_sliding_window is true"):
        config_from_hf(values)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("qwen", "mistral"))])
def test_cached_decoding_equals_the_full_forward_for_the_new_families(case):
    _, model = build_pair(case)
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(2, 40)
        chunks = [model(idx[:, a:b], input_pos=torch.arange(a, b)) for a, b in ((0, 5), (5, 6), (6, 19), (19, 40))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_json_gives_the_preset(name):
    from lit_gpt import Config

    assert config_from_hf(PUBLISHED[name]) == Config.from_name(name)
