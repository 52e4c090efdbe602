"""SSA (and the temperature baselines) inside a loaded transformers model, no conversion.

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    add_ssa(model)                      # SSA on every attention layer, starting as the model itself
    model.generate(..., num_beams=3)    # transformers' own cache, generation, hidden states, Trainer

The temperatures are the modules of lit_gpt/model.py (`build_temperature`: one implementation for both), attached to
each attention layer as `query_temperature`, `key_temperature` and `value_temperature`, with the same fields and
defaults as `Config`. They run in forward hooks on the projections, so they work with every attention implementation
transformers has (eager, sdpa, flash):

- a temperature is one scalar per (token, head), which commutes with RoPE, so scaling the query and key projections
  before RoPE (after Qwen3's q/k norm, as our model does) equals scaling after it; the token term reads the projection
  before RoPE, as in our model;
- the value temperature scales v_proj's output, before the cache, as in our model;
- log(n) takes each token's absolute position: `position_ids` where the caller passes them (generate does), else from
  the 2D attention mask (a left-padded row numbers its real tokens from 0, so its outputs equal the row unpadded),
  else from the cache's length.

`save_pretrained` writes the temperatures, their Config (config.json's `lit_gpt_ssa`) and remote code whose class is the
family's own with the temperatures; under PEFT, name TEMPERATURE_MODULES in `modules_to_save`. Supported: the Llama
family's attention (Llama, Mistral, Qwen2, Qwen3, SmolLM2), GPT-NeoX's (Pythia) and GPT-2's, whose one fused
projection gets one hook. `add_gate` puts gated attention on the same families (a hook before the output
projection).

Selective attention (`add_selective`) is an attention function instead, registered with transformers'
`AttentionInterface` (and its mask with `AttentionMaskInterface`) as "lit_gpt_selective": sdpa's attention with F,
built by our model's own `selective_mask`, subtracted from every head's logits. F needs, per key, the sum of S over
the earlier queries; with a cache these running sums live on transformers' own cache layer (`selective_layer_class`),
which beam search reorders with the keys.
"""

import types
from functools import cache, partial

import torch
import torch.nn as nn

from lit_gpt.config import ATTENTION_FIELDS, FINETUNE_GATE_SCALE, FINETUNE_SSA_INIT, Config
from lit_gpt.model import AttentionGate, allowed_keys, build_temperature, selective_mask

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2")
CONFIG_KEY = "lit_gpt_ssa"  # in config.json: the Config of the temperatures
TEMPERATURE_MODULES = ("query_temperature", "key_temperature", "value_temperature")
ADDED_MODULES = (*TEMPERATURE_MODULES, "gate")  # what add_ssa and add_gate put on a layer: PEFT's modules_to_save
OUTPUT_PROJECTIONS = ("o_proj", "dense", "c_proj")  # the attention's output projection (Llama, GPT-NeoX, GPT-2)
SELECTIVE = "lit_gpt_selective"  # selective attention's name in transformers' AttentionInterface
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")  # an attention layer's cache, by version
REMOTE_SOURCES = ("config.py", "kernels.py", "model.py", "hf_ssa.py", "remote/ssa_modeling.py")
MODELING_FILE = "modeling_lit_gpt_hf_ssa.py"
REMOTE_CLASSES = {"llama": "LlamaSSAForCausalLM", "mistral": "MistralSSAForCausalLM", "qwen2": "Qwen2SSAForCausalLM",
                  "qwen3": "Qwen3SSAForCausalLM", "gpt_neox": "GPTNeoXSSAForCausalLM", "gpt2": "GPT2SSALMHeadModel"}
SIDES = {"query": ("q_norm", "q_proj"), "key": ("k_norm", "k_proj"), "value": (None, "v_proj")}
# one projection for q, k and v: GPT-NeoX's output holds, per head, [q | k | v]; GPT-2's [q | k | v], each all heads
FUSED = {"query_key_value": "per head", "c_attn": "by part"}


def add_ssa(model: nn.Module, **fields) -> nn.Module:
    """Add SSA (attention_temperature "ssa" by default) or a temperature baseline (attention_temperature "logn",
    "ssmax", "constant", "ssa_position") to every attention layer of a transformers causal LM, in place. `fields` are
    Config's attention fields (ssa_token_weights, ssa_query, ssa_slope_form, ...). SSA's slope starts at the fine-tuning
    value (6e-4) and its token weights at zero, so the model starts as itself. Returns the model; the Config used is
    `model.ssa_config`."""
    unknown = sorted(set(fields) - set(ATTENTION_FIELDS))
    if unknown:
        raise ValueError(f"add_ssa got {unknown[0]!r}, which is not an attention field; expected some of:"
                         f" {', '.join(sorted(ATTENTION_FIELDS))}.")
    if getattr(model.config, CONFIG_KEY, None) is not None:
        raise ValueError("This model already has SSA's temperatures (add_ssa was called on it before).")
    return attach(model, ssa_config(model, fields))


def add_gate(model: nn.Module, attention_gate: str = "headwise", **fields) -> nn.Module:
    """Gated attention (Qiu et al., 2025) on every attention layer of a transformers causal LM, in place: the
    attention output, before the output projection, times 2 sigmoid(x W_g), one scalar per (token, head) (headwise)
    or per channel (elementwise). W_g starts at zero, so the model starts as itself. `fields` are further attention
    fields (a temperature too: attention_temperature="ssa"). Returns the model."""
    return add_ssa(model, attention_temperature=fields.pop("attention_temperature", "none"),
                   attention_gate=attention_gate, attention_gate_scale=FINETUNE_GATE_SCALE, **fields)


def add_selective(model: nn.Module, **fields) -> nn.Module:
    """Selective attention (Leviathan, Kalman & Matias 2024) on every attention layer of a transformers causal LM, in
    place: every head's logits minus F, the sum over earlier queries of ReLU of head 0's logits. It has no parameters,
    so the model does not start as itself. `fields` are further attention fields (a gate: attention_gate="headwise").
    The model's attention implementation becomes "lit_gpt_selective" (sdpa's kernel with F added). Returns the model."""
    return add_ssa(model, attention_temperature=fields.pop("attention_temperature", "none"),
                   selective_mask=fields.pop("selective_mask", "leviathan"), **fields)


def attach(model: nn.Module, config: Config) -> nn.Module:
    """The temperatures of `config` on every attention layer, with their hooks; the config goes into the model's own
    (config.json's `lit_gpt_ssa`), so that a saved model rebuilds them when loaded. Selective attention sets the
    model's attention implementation."""
    if config.selective_mask != "none":
        register_selective_attention()
        model.set_attn_implementation(SELECTIVE)
        if model.config._attn_implementation != SELECTIVE:  # never plain attention in its place, silently
            raise ValueError(f"{type(model).__name__} did not take the attention function {SELECTIVE!r} (it has"
                             f" {model.config._attn_implementation!r}): selective attention needs a family class whose"
                             " attention calls transformers' AttentionInterface.")
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    weight = next(model.parameters())  # temperatures in float32 at least (bf16 weights: float32 temperatures)
    device, dtype = weight.device, torch.promote_types(weight.dtype, torch.float32)
    state = {}  # the positions of the current call's tokens: set by the model's pre-hook, read by every layer
    base.register_forward_pre_hook(positions_hook(state), with_kwargs=True)
    for layer in base.layers if hasattr(base, "layers") else base.h:  # GPT-2 calls its layers h
        attn = next(getattr(layer, name) for name in ("self_attn", "attention", "attn") if hasattr(layer, name))
        for side in SIDES:
            module = build_temperature(config, side)
            if module is not None:
                module.to(device=device, dtype=dtype)
                module.reset_parameters()
                attn.register_module(f"{side}_temperature", module)
        if config.attention_gate != "none":
            gate = AttentionGate(config).to(device=device, dtype=dtype)
            gate.reset_parameters()
            attn.register_module("gate", gate)
        heads = {"query": config.n_head, "key": config.n_query_groups, "value": config.n_query_groups}
        attn._ssa = {"state": state, "hooks": {}, "heads": heads}
        attn.register_forward_pre_hook(attention_hook, with_kwargs=True)
        attn.register_forward_hook(forget_input)
    model.ssa_config = config
    setattr(model.config, CONFIG_KEY, config.to_dict())
    # the instance's own save_pretrained (Trainer and PEFT call it) writes the remote code too; a bound method, so a
    # deep copy saves itself
    model.save_pretrained = types.MethodType(save_pretrained, model)
    return model


def save_pretrained(model: nn.Module, folder, *args, **kwargs) -> None:
    """transformers' save_pretrained (the weights hold the temperatures, config.json their Config), plus the remote
    code: config.json's auto_map names the family's class with SSA, which the folder's modeling file defines."""
    import json
    from pathlib import Path

    type(model).save_pretrained(model, folder, *args, **kwargs)
    code = remote_code()
    if code is None:  # a model loaded from such a folder: transformers copied its modeling file and auto_map itself
        return
    folder = Path(folder)
    (folder / MODELING_FILE).write_text(code)
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values["auto_map"] = auto_map(values["model_type"])
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def auto_map(model_type: str) -> dict:
    """config.json's auto_map of a saved model with SSA: the family's class with the temperatures."""
    return {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{REMOTE_CLASSES[model_type]}"}


def ssa_config(model: nn.Module, fields: dict) -> Config:
    """Our Config of the model's architecture with the attention fields added."""
    from lit_gpt.hf import config_from_hf

    hf = model.config.to_dict()
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"add_ssa supports model_type {', '.join(SUPPORTED_MODEL_TYPES)}; this model is"
                         f" {hf.get('model_type')!r}: convert it with scripts/convert_hf_checkpoint.py instead.")
    values = config_from_hf(hf).to_dict() | {"attention_temperature": "ssa", "ssa_position_init": FINETUNE_SSA_INIT}
    return Config.from_dict(values | fields)


def positions_hook(state: dict):
    """Before the decoder runs: each token's absolute position, (B or 1, T)."""

    def hook(module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        B, T = tokens.shape[:2]
        positions = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if positions is None and mask is not None and mask.dim() == 2:  # a padded batch: count each row's tokens
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        if positions is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed it `cache`
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            positions = torch.arange(past, past + T, device=tokens.device).unsqueeze(0)
        state["positions"] = positions
        state["log_n"] = {}  # log(n) of these positions, by (device, dtype): computed once per call, not per layer
        return None

    return hook


def attention_hook(attn: nn.Module, args, kwargs):
    """Before each attention layer: keep its input (the token term of separate weights reads it) and make sure the
    projections it calls now carry the temperature and gate hooks (PEFT may have wrapped them since, and merging
    unwraps)."""
    attn._ssa["x"] = kwargs.get("hidden_states", args[0] if args else None)
    attn._ssa["cache"] = next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
    hooks = attn._ssa["hooks"]
    gate = getattr(attn, "gate", None)
    if gate is not None:
        output = next(getattr(attn, name) for name in OUTPUT_PROJECTIONS if hasattr(attn, name))
        keep_hooked(hooks, "gate", output, gate, partial(gate_hook, attn, gate), pre=True)
    fused = next((name for name in FUSED if hasattr(attn, name)), None)
    if fused is not None:
        temperatures = tuple(getattr(attn, f"{side}_temperature", None) for side in SIDES)
        keep_hooked(hooks, "fused", getattr(attn, fused), temperatures,
                    partial(fused_scale_hook, attn, temperatures, FUSED[fused] == "per head"))
        return None
    for side, names in SIDES.items():
        temperature = getattr(attn, f"{side}_temperature", None)  # PEFT's modules_to_save may have wrapped it
        if temperature is None:
            continue
        target = next(getattr(attn, name) for name in names if name is not None and hasattr(attn, name))
        keep_hooked(hooks, side, target, temperature, partial(scale_hook, attn, temperature, attn._ssa["heads"][side]))
    return None


def keep_hooked(hooks: dict, key: str, target: nn.Module, owner, make_hook, pre: bool = False) -> None:
    """`target` carries the hook `make_hook()` of `owner` (a temperature, a gate, or the temperatures of a fused
    projection), after its forward or, with `pre`, before it: registered once, and again (the old one removed) where
    PEFT has wrapped or replaced either since."""
    if key in hooks and hooks[key][0] is target and hooks[key][1] == owner:
        return
    if key in hooks:
        hooks[key][2].remove()
    register = target.register_forward_pre_hook if pre else target.register_forward_hook
    hooks[key] = (target, owner, register(make_hook()))


def gate_hook(attn: nn.Module, gate: nn.Module):
    """Before the output projection: its input, the heads' outputs (B, T, nh * hs), times the gate of the layer's
    input."""

    def hook(module, args):
        y = args[0]
        heads = attn._ssa["heads"]["query"]
        return (gate(y.view(*y.shape[:2], heads, -1), attn._ssa["x"]).view(y.shape), *args[1:])

    return hook


def fused_scale_hook(attn: nn.Module, temperatures: tuple, per_head: bool):
    """After a fused projection (B, T, 3 * nh * hs), laid out per head as [q | k | v] (GPT-NeoX) or as [q | k | v] of
    all heads each (GPT-2): each part times its side's temperature (None: unscaled)."""
    axis = 3 if per_head else 2

    def hook(module, inputs, output):
        shape, heads = output.shape, attn._ssa["heads"]["query"]
        log_n = position_log(attn, output)
        split = (heads, 3, -1) if per_head else (3, heads, -1)
        parts = output.view(*shape[:2], *split).unbind(axis)  # q, k, v: (B, T, nh, hs) each
        scaled = [part if t is None else t(part, attn._ssa["x"], log_n) for part, t in zip(parts, temperatures)]
        return torch.stack(scaled, axis).view(shape)

    return hook


def position_log(attn: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """log(n), n = position + 1, of the current call's tokens, in float32 at least (as our model has it): computed by
    the first layer that asks for it on this device, in this dtype."""
    dtype = torch.promote_types(output.dtype, torch.float32)
    state = attn._ssa["state"]
    key = (output.device, dtype)
    if key not in state["log_n"]:
        state["log_n"][key] = torch.log1p(state["positions"].to(output.device, dtype))
    return state["log_n"][key]


def forget_input(attn: nn.Module, args, output) -> None:
    """After each attention layer: its input and cache are not kept past the call (a deep copy of the model could not
    take them)."""
    attn._ssa.pop("x", None)
    attn._ssa.pop("cache", None)


def scale_hook(attn: nn.Module, temperature: nn.Module, heads: int):
    """After a projection (B, T, heads * hs), or Qwen3's norm of it (B, T, heads, hs): the output times the
    temperature of each (token, head)."""

    def hook(module, inputs, output):
        shape = output.shape
        target = output if output.dim() == 4 else output.view(*shape[:2], heads, -1)
        return temperature(target, attn._ssa["x"], position_log(attn, output)).view(shape)

    return hook


def register_selective_attention() -> None:
    """Selective attention's function and mask under SELECTIVE in transformers' registries (a name the mask registry
    lacks gets no mask at all, silently)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SELECTIVE, selective_attention)
    AttentionMaskInterface.register(SELECTIVE, selective_attention_mask)


def selective_attention_mask(*args, **kwargs):
    """sdpa's boolean mask (B, 1, T, S), always built: F needs to know which keys each query sees, also where plain
    causal attention would have been enough."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **(kwargs | {"allow_is_causal_skip": False}))


def selective_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """transformers' attention function of selective attention: sdpa's attention of query (B, nh, T, hs) and the
    cached keys and values (B, ng, S, hs), with F (B, T, S) subtracted from every head's logits. The T queries are
    the last T of the S cache slots (transformers' DynamicCache appends)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    T, S = query.size(2), key.size(2)
    slots = torch.arange(S - T, S, device=query.device)
    if attention_mask is None:  # a caller's own mask function may still skip it: plain causal attention
        attention_mask = allowed_keys(T, S, slots, None).expand(query.size(0), 1, T, S)
    elif attention_mask.dtype != torch.bool:  # an additive mask: transformers masks with the dtype's minimum
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min
    f = selective_mask(query, key, attention_mask[:, 0], slots, sums_of(module))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  position_bias=-f.unsqueeze(1).to(query.dtype), **kwargs)


def sums_of(module: nn.Module):
    """The running sums of S of this layer's cache (None without a cache): transformers' cache layer, made a
    SelectiveDynamicLayer the first time."""
    cache = getattr(module, "_ssa", {}).get("cache")
    if cache is None:
        return None
    cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache holds the decoder's
    layer, selective = cache.layers[module.layer_idx], selective_layer_class()
    if type(layer) is not selective:
        if type(layer) is not selective.__base__:
            raise ValueError(f"Selective attention keeps its sums in a DynamicCache of full-attention layers; this"
                             f" cache's layer is a {type(layer).__name__} (a static cache or a sliding window): use"
                             " DynamicCache() of a model without a window, pass use_cache=False, or convert the model"
                             " (scripts/convert_hf_checkpoint.py) to use this project's own cache.")
        layer.__class__ = selective
    return layer


@cache
def selective_layer_class() -> type:
    """transformers' DynamicLayer with selective attention's running sums: per cached key, the sum of S over the queries
    seen so far (B, S), kept in step with the keys where transformers reorders (beam search), selects or repeats the
    batch. Taking tokens back out (crop: assisted decoding, prompt lookup) cannot subtract what their queries added,
    and is refused. One class for the process, defined at first use (transformers takes seconds to import)."""
    from transformers.cache_utils import DynamicLayer

    class SelectiveDynamicLayer(DynamicLayer):  # one base only: an existing layer can become one (__class__)
        sums: torch.Tensor | None = None  # instances set their own

        def add_selective_sums(self, input_pos: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            """The sums of the earlier calls (B, 1, S), zero for this call's T keys; then this call's s (B, T, S) is
            added to them."""
            B, T, S = s.shape
            past = S - T
            if (self.sums is None and past) or (self.sums is not None and tuple(self.sums.shape) != (B, past)):
                held = "none" if self.sums is None else tuple(self.sums.shape)
                raise ValueError(f"Selective attention's sums do not match the cache: it holds {past} keys for {B}"
                                 f" rows, the sums {held}; start from an empty cache with selective attention on.")
            before = s.new_zeros(B, S) if self.sums is None else nn.functional.pad(self.sums, (0, T))
            self.sums = before + s.detach().sum(dim=1)
            return before.unsqueeze(1)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            if self.sums is not None:
                self.sums = self.sums.index_select(0, beam_idx.to(self.sums.device))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            super().batch_select_indices(indices)
            if self.sums is not None:
                self.sums = self.sums[indices]

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            if self.sums is not None:
                self.sums = self.sums.repeat_interleave(repeats, dim=0)

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove and self.sums is not None:
                raise ValueError("Selective attention cannot take tokens back out of its cache (assisted decoding,"
                                 " prompt lookup): generate without an assistant model or prompt lookup.")
            super().crop(tokens_to_remove)

        def reset(self) -> None:
            super().reset()
            self.sums = None

    return SelectiveDynamicLayer


def remote_code() -> str | None:
    """The modeling file of a saved model, generated from this project's sources; None when running as that file."""
    if not __name__.startswith("lit_gpt."):
        return None
    import importlib

    return importlib.import_module("lit_gpt.export").modeling_source(REMOTE_SOURCES)
