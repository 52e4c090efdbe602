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


CASES = {
    "gpt2": gpt2,
    "pythia-parallel": lambda: neox(True),
    "pythia-sequential": lambda: neox(False),
    "llama-gqa-untied": lambda: llama(False, False),
    "llama-tied": lambda: llama(True, False),
    "llama31-rope-scaling": lambda: llama(False, True),
}


def build_pair(case: str):
    hf_config = CASES[case]()
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():  # the random init leaves biases at zero; make them count
        for name, p in hf_model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
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
    items = list(hf_model.state_dict().items()) + [("model.layers.0.self_attn.q_norm.weight", torch.ones(8))]
    with pytest.raises(ValueError, match="q_norm"):
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


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_json_gives_the_preset(name):
    from lit_gpt import Config

    assert config_from_hf(PUBLISHED[name]) == Config.from_name(name)
