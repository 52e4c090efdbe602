"""The bridge to Hugging Face: configs and weight names of GPT-2, GPT-NeoX (Pythia) and Llama-family models (Llama,
Mistral, Qwen2 / Qwen2.5 and Qwen3 share the Llama layout of weights).

Weights are mapped one tensor at a time (a generator in, a generator out) so that conversion streams; only the
three Llama q/k/v projections of one layer are held until they can be fused into our `qkv`.
"""

import re
from collections.abc import Iterable, Iterator

import torch

from lit_gpt.checkpoint import check_tied
from lit_gpt.config import Config, configs, name_to_config

SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3")
LAYER = re.compile(r"\.(\d+)\.")

# Hugging Face key (after its family prefix, layers as {}) -> our key. "T": a GPT-2 Conv1D weight, transposed.
WEIGHT_MAPS = {
    "gpt2": {
        "wte.weight": "transformer.wte.weight",
        "wpe.weight": "transformer.wpe.weight",
        "h.{}.ln_1.weight": "transformer.h.{}.norm_1.weight",
        "h.{}.ln_1.bias": "transformer.h.{}.norm_1.bias",
        "h.{}.attn.c_attn.weight": ("transformer.h.{}.attn.qkv.weight", "T"),
        "h.{}.attn.c_attn.bias": "transformer.h.{}.attn.qkv.bias",
        "h.{}.attn.c_proj.weight": ("transformer.h.{}.attn.proj.weight", "T"),
        "h.{}.attn.c_proj.bias": "transformer.h.{}.attn.proj.bias",
        "h.{}.ln_2.weight": "transformer.h.{}.norm_2.weight",
        "h.{}.ln_2.bias": "transformer.h.{}.norm_2.bias",
        "h.{}.mlp.c_fc.weight": ("transformer.h.{}.mlp.fc.weight", "T"),
        "h.{}.mlp.c_fc.bias": "transformer.h.{}.mlp.fc.bias",
        "h.{}.mlp.c_proj.weight": ("transformer.h.{}.mlp.proj.weight", "T"),
        "h.{}.mlp.c_proj.bias": "transformer.h.{}.mlp.proj.bias",
        "ln_f.weight": "transformer.ln_f.weight",
        "ln_f.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
    "gpt_neox": {
        "embed_in.weight": "transformer.wte.weight",
        "layers.{}.input_layernorm.weight": "transformer.h.{}.norm_1.weight",
        "layers.{}.input_layernorm.bias": "transformer.h.{}.norm_1.bias",
        "layers.{}.attention.query_key_value.weight": ("transformer.h.{}.attn.qkv.weight", "neox_qkv"),
        "layers.{}.attention.query_key_value.bias": ("transformer.h.{}.attn.qkv.bias", "neox_qkv"),
        "layers.{}.attention.dense.weight": "transformer.h.{}.attn.proj.weight",
        "layers.{}.attention.dense.bias": "transformer.h.{}.attn.proj.bias",
        "layers.{}.post_attention_layernorm.weight": "transformer.h.{}.norm_2.weight",
        "layers.{}.post_attention_layernorm.bias": "transformer.h.{}.norm_2.bias",
        "layers.{}.mlp.dense_h_to_4h.weight": "transformer.h.{}.mlp.fc.weight",
        "layers.{}.mlp.dense_h_to_4h.bias": "transformer.h.{}.mlp.fc.bias",
        "layers.{}.mlp.dense_4h_to_h.weight": "transformer.h.{}.mlp.proj.weight",
        "layers.{}.mlp.dense_4h_to_h.bias": "transformer.h.{}.mlp.proj.bias",
        "final_layer_norm.weight": "transformer.ln_f.weight",
        "final_layer_norm.bias": "transformer.ln_f.bias",
        "embed_out.weight": "lm_head.weight",  # the name in Pythia's checkpoints
        "lm_head.weight": "lm_head.weight",  # the name in transformers >= 5
    },
    "llama": {
        "embed_tokens.weight": "transformer.wte.weight",
        "layers.{}.input_layernorm.weight": "transformer.h.{}.norm_1.weight",
        "layers.{}.self_attn.q_proj.weight": ("transformer.h.{}.attn.qkv.weight", "q"),
        "layers.{}.self_attn.k_proj.weight": ("transformer.h.{}.attn.qkv.weight", "k"),
        "layers.{}.self_attn.v_proj.weight": ("transformer.h.{}.attn.qkv.weight", "v"),
        "layers.{}.self_attn.q_proj.bias": ("transformer.h.{}.attn.qkv.bias", "q"),
        "layers.{}.self_attn.k_proj.bias": ("transformer.h.{}.attn.qkv.bias", "k"),
        "layers.{}.self_attn.v_proj.bias": ("transformer.h.{}.attn.qkv.bias", "v"),
        "layers.{}.self_attn.o_proj.weight": "transformer.h.{}.attn.proj.weight",
        "layers.{}.self_attn.o_proj.bias": "transformer.h.{}.attn.proj.bias",
        "layers.{}.self_attn.q_norm.weight": "transformer.h.{}.attn.norm_q.weight",  # Qwen3
        "layers.{}.self_attn.k_norm.weight": "transformer.h.{}.attn.norm_k.weight",
        "layers.{}.post_attention_layernorm.weight": "transformer.h.{}.norm_2.weight",
        "layers.{}.mlp.gate_proj.weight": "transformer.h.{}.mlp.fc_1.weight",
        "layers.{}.mlp.up_proj.weight": "transformer.h.{}.mlp.fc_2.weight",
        "layers.{}.mlp.down_proj.weight": "transformer.h.{}.mlp.proj.weight",
        "norm.weight": "transformer.ln_f.weight",
        "lm_head.weight": "lm_head.weight",
    },
}
PREFIXES = {"gpt2": "transformer.", "gpt_neox": "gpt_neox.", "llama": "model."}
UNPREFIXED = ("lm_head.weight", "embed_out.weight")
# buffers some checkpoints carry that hold nothing to convert
IGNORED = re.compile(r".*\.(attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")


def hf_family(config: Config) -> str:
    """Which Hugging Face architecture a config corresponds to; an error where none does."""
    layer_norm, learned = config.norm_class_name == "LayerNorm", config.position_embedding == "learned"
    if learned and layer_norm and config.mlp_class_name == "GptNeoxMLP" and not config.parallel_residual:
        return "gpt2"
    if not learned and layer_norm and config.mlp_class_name == "GptNeoxMLP":
        return "gpt_neox"
    if config.norm_class_name == "RMSNorm" and config.mlp_class_name == "LLaMAMLP" and config.rotary_percentage == 1.0:
        return "llama"
    raise ValueError(f"Config {config.name!r} matches none of the Hugging Face layouts gpt2, gpt_neox and llama.")


def hf_model_type(config: Config) -> str:
    """The Hugging Face model type of a config: gpt2 or gpt_neox, or for the Llama layout what its extra fields say
    (llama, mistral, qwen2, qwen3)."""
    family = hf_family(config)
    if family != "llama":
        return family
    if config.norm_qk:
        return "qwen3"
    if config.attn_bias and not config.bias:
        return "qwen2"
    if config.sliding_window is not None:
        return "mistral"
    return "llama"


def split_layer(key: str) -> tuple[str, int | None]:
    match = LAYER.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + ".{}." + key[match.end() :], int(match.group(1))


def neox_qkv_to_lit(t: torch.Tensor, config: Config) -> torch.Tensor:
    """GPT-NeoX interleaves per head (nh, [q, k, v], hs, ...); we keep [q; k; v]."""
    t = t.reshape(config.n_head, 3, config.head_size, *t.shape[1:])
    return t.transpose(0, 1).reshape(-1, *t.shape[3:])


def lit_qkv_to_neox(t: torch.Tensor, config: Config) -> torch.Tensor:
    t = t.reshape(3, config.n_head, config.head_size, *t.shape[1:])
    return t.transpose(0, 1).reshape(-1, *t.shape[3:])


def lit_weights_from_hf(
    config: Config, items: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face (name, tensor) pairs -> ours. Unknown names raise; a tied lm_head is dropped."""
    family = hf_family(config)
    table, prefix = WEIGHT_MAPS[family], PREFIXES[family]
    pending: dict[str, dict[str, torch.Tensor]] = {}  # Llama q/k/v parts waiting for their siblings
    tied: dict[str, torch.Tensor] = {}  # a tied model's embedding and any output layer the file also holds
    for hf_key, tensor in items:
        if IGNORED.match(hf_key):
            continue
        template, layer = split_layer(hf_key.removeprefix(prefix))
        if template not in table:
            raise ValueError(f"Unexpected tensor {hf_key!r} for a {family} model: it has no counterpart in ours.")
        target, transform = table[template] if isinstance(table[template], tuple) else (table[template], None)
        target = target.format(layer)
        if config.tie_embeddings and target in ("lm_head.weight", "transformer.wte.weight"):
            tied[target] = tensor
            if len(tied) == 2:
                check_tied(tied["lm_head.weight"], tied["transformer.wte.weight"], "the checkpoint",
                           "tie_word_embeddings: true in its config.json")
            if target == "lm_head.weight":
                continue
        tensor = tensor if dtype is None else tensor.to(dtype)
        if transform == "T":
            tensor = tensor.T.contiguous()
        elif transform == "neox_qkv":
            tensor = neox_qkv_to_lit(tensor, config)
        elif transform in ("q", "k", "v"):
            parts = pending.setdefault(target, {})
            parts[transform] = tensor
            if len(parts) < 3:
                continue
            parts = pending.pop(target)
            tensor = torch.cat([parts["q"], parts["k"], parts["v"]])
        yield target, tensor
    if pending:
        raise ValueError(f"Incomplete attention projections: {sorted(pending)} lack some of q_proj, k_proj, v_proj.")


def hf_weights_from_lit(
    config: Config, items: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs -> Hugging Face names as its `from_pretrained` expects them."""
    family = hf_family(config)
    inverse = {}
    for hf_template, target in WEIGHT_MAPS[family].items():
        lit_template, transform = target if isinstance(target, tuple) else (target, None)
        if lit_template in inverse and lit_template == "lm_head.weight":
            continue  # write Pythia's own name, which every transformers version reads
        full = hf_template if hf_template in UNPREFIXED else PREFIXES[family] + hf_template
        inverse.setdefault(lit_template, []).append((full, transform))
    nh, ng, hs = config.n_head, config.n_query_groups, config.head_size
    for key, tensor in items:
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        template, layer = split_layer(key)
        if template not in inverse:
            raise ValueError(f"Tensor {key!r} has no counterpart in a Hugging Face {family} model.")
        for hf_template, transform in inverse[template]:
            out = tensor
            if transform == "T":
                out = tensor.T.contiguous()
            elif transform == "neox_qkv":
                out = lit_qkv_to_neox(tensor, config)
            elif transform in ("q", "k", "v"):
                q, k, v = tensor.split((nh * hs, ng * hs, ng * hs))
                out = {"q": q, "k": k, "v": v}[transform].contiguous()
            yield hf_template.format(layer), out


def _rope(hf: dict) -> tuple[float, dict | None, float]:
    """rope base, Llama-3 scaling and rotary fraction from either the v4 or the v5 layout of config.json."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or params
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = params.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 1.0)))
    adjustments = None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        adjustments = dict(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_seq_len=int(scaling["original_max_position_embeddings"]),
        )
    elif rope_type not in ("default", None):
        raise ValueError(f"RoPE scaling of type {rope_type!r} is not supported (supported: default, llama3).")
    return float(base), adjustments, float(fraction)


def sliding_window(hf: dict, model_type: str) -> int | None:
    """Mistral's window, where it is shorter than the context; Qwen's windows (per layer) are refused when on."""
    window = hf.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise ValueError(f"config.json: sliding_window must be a whole number or null, got {window!r}.")
    if model_type in ("qwen2", "qwen3"):
        if hf.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window is true (a window on the layers from"
                             " max_window_layers on), which is not supported: set it to false for full attention.")
        return None
    return window if window is not None and window < hf["max_position_embeddings"] else None


def config_from_hf(hf: dict, name: str | None = None) -> Config:
    """A Config from a Hugging Face `config.json`. `name` picks a preset, which must agree with the file. A field of
    the wrong type (a string where a number or a mapping goes, zero heads) is one error naming it."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json should hold a mapping of the model's settings, found {type(hf).__name__}.")
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ValueError(f"config.json: {key} should be a mapping (or null), got {hf[key]!r}.")
    for key in ("num_attention_heads", "n_head", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
                "vocab_size", "num_key_value_heads", "head_dim", "max_position_embeddings", "n_positions"):
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"config.json: {key} should be a whole number of at least 1, got {value!r}.")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"Unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        values = dict(
            block_size=hf["n_positions"], padded_vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
            n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
            position_embedding="learned", parallel_residual=False, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            gelu_approximate="none" if act == "gelu" else "tanh", tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    elif model_type == "gpt_neox":
        base, adjustments, fraction = _rope(hf)
        values = dict(
            block_size=hf["max_position_embeddings"], padded_vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], rotary_percentage=fraction, rope_base=base,
            rope_adjustments=adjustments, parallel_residual=hf.get("use_parallel_residual", True),
            bias=hf.get("attention_bias", True), norm_eps=hf.get("layer_norm_eps", 1e-5),
            gelu_approximate="none" if hf.get("hidden_act", "gelu") == "gelu" else "tanh",
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )
    else:
        window = sliding_window(hf, model_type)
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
            raise ValueError("Only Llama MLPs with SiLU gating and no bias are supported.")
        base, adjustments, _ = _rope(hf)
        n_head = hf["num_attention_heads"]
        values = dict(
            block_size=hf["max_position_embeddings"], padded_vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=hf["hidden_size"],
            head_size=hf.get("head_dim") or hf["hidden_size"] // n_head,
            n_query_groups=hf.get("num_key_value_heads") or n_head, intermediate_size=hf["intermediate_size"],
            rotary_percentage=1.0, rope_base=base, rope_adjustments=adjustments, parallel_residual=False,
            bias=hf.get("attention_bias", False), norm_class_name="RMSNorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp_class_name="LLaMAMLP", tie_embeddings=hf.get("tie_word_embeddings", False),
            attn_bias=model_type == "qwen2", norm_qk=model_type == "qwen3", sliding_window=window,
        )
    values["vocab_size"] = values["padded_vocab_size"]
    preset = matching_preset(values, name, hf.get("_name_or_path", ""))
    if preset is not None:
        known = Config(**preset)
        values.update(name=known.name, hf_repo=known.hf_repo, vocab_size=known.vocab_size,
                      padding_multiple=known.padding_multiple)
    else:
        values["name"] = hf.get("_name_or_path", "").rstrip("/").split("/")[-1] or f"custom-{model_type}"
    return Config(**values)


ARCHITECTURE_FIELDS = (
    "padded_vocab_size", "n_layer", "n_head", "n_embd", "head_size", "n_query_groups", "intermediate_size",
    "position_embedding", "rotary_percentage", "rope_base", "rope_adjustments", "parallel_residual", "bias",
    "attn_bias", "norm_qk", "sliding_window", "norm_class_name", "mlp_class_name", "tie_embeddings",
)


def first_difference(a: Config, b: Config) -> str | None:
    return next((f for f in ARCHITECTURE_FIELDS if getattr(a, f) != getattr(b, f)), None)


def matching_preset(values: dict, name: str | None, hf_name: str) -> dict | None:
    """The preset with the same architecture as `values`: the one named `name`, which must agree, or a match."""
    converted = Config(**values)
    if name is not None:
        preset = Config.from_name(name)
        field = first_difference(preset, converted)
        if field is not None:
            raise ValueError(
                f"config.json does not describe preset {name!r}: {field} is {getattr(converted, field)!r} there and"
                f" {getattr(preset, field)!r} in the preset. Leave out --model_name to infer the config from the file."
            )
        return name_to_config[name]
    candidates = [row for row in configs if first_difference(Config(**row), converted) is None]
    hf_base = hf_name.rstrip("/").split("/")[-1]
    for row in candidates:
        if hf_base in (row["name"], row.get("hf_repo", "").split("/")[-1]):
            return row
    return candidates[0] if candidates else None


def hf_config_from_lit(config: Config) -> dict:
    """The `config.json` that `transformers.AutoConfig` reads back into the same architecture."""
    family = hf_family(config)
    common = dict(vocab_size=config.padded_vocab_size, tie_word_embeddings=config.tie_embeddings, dtype="float32")
    if family == "gpt2":
        return dict(
            common, architectures=["GPT2LMHeadModel"], model_type="gpt2", n_positions=config.block_size,
            n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head, n_inner=config.intermediate_size,
            layer_norm_epsilon=config.norm_eps,
            activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        )
    rope = {"rope_theta": config.rope_base, "rope_type": "default"}
    if config.rope_adjustments:
        a = config.rope_adjustments
        rope.update(rope_type="llama3", factor=a["factor"], low_freq_factor=a["low_freq_factor"],
                    high_freq_factor=a["high_freq_factor"], original_max_position_embeddings=a["original_max_seq_len"])
    if family == "gpt_neox":
        return dict(
            common, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", hidden_size=config.n_embd,
            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            intermediate_size=config.intermediate_size, max_position_embeddings=config.block_size,
            rotary_pct=config.rotary_percentage, rotary_emb_base=config.rope_base,
            rope_parameters=dict(rope, partial_rotary_factor=config.rotary_percentage),
            use_parallel_residual=config.parallel_residual, layer_norm_eps=config.norm_eps,
            hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_new", attention_bias=config.bias,
        )
    model_type = hf_model_type(config)
    llama = dict(
        common, architectures=[ARCHITECTURES[model_type]], model_type=model_type, hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, head_dim=config.head_size,
        num_key_value_heads=config.n_query_groups, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_base,
        rope_scaling=rope if config.rope_adjustments else None, rope_parameters=rope, attention_bias=config.bias,
        mlp_bias=False, hidden_act="silu",
    )
    if model_type == "mistral":
        llama.update(sliding_window=config.sliding_window)
    elif model_type in ("qwen2", "qwen3"):
        llama.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return llama


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel"}
