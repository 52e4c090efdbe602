"""Model configuration: one dataclass of plain values for every family, and the named presets."""

import difflib
import math
import types
import typing
from copy import deepcopy
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_FILENAME = "model_config.yaml"

SSA_SIDES = ("ssa_query", "ssa_key", "ssa_value")
# what SSA adds to one side's temperature: nothing, slope * log(n), tanh(u . gelu(f)) or both
SSATerms = Literal["none", "position", "token", "position+token"]


FINETUNE_SSA_INIT = 6e-4  # SSA's position slope when added to a trained model, as in the official fine-tuning scripts
FINETUNE_GATE_SCALE = 2.0  # a gate added to a trained model starts as the identity: 2 sigmoid(x W_g), W_g = 0

MAX_BLOCK_SIZE = 2**22  # 4M positions: beyond, the rotary table alone would take gigabytes
ROPE_ADJUSTMENTS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")


def check_rope_adjustments(values: dict | None) -> None:
    """Llama-3.1's RoPE scaling needs all four of its numbers, each above zero."""
    if values is None:
        return
    if set(values) != set(ROPE_ADJUSTMENTS) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values.values()):
        raise ValueError(f"Config.rope_adjustments needs the numbers {', '.join(ROPE_ADJUSTMENTS)}, each above 0; got"
                         f" {values}.")
    if values["low_freq_factor"] >= values["high_freq_factor"]:
        raise ValueError(f"Config.rope_adjustments: low_freq_factor must be below high_freq_factor, got {values}.")


def stored_slope_form(weights: Path) -> str | None:
    """The slope form a .safetensors file records in its metadata (None where it records none or is not there)."""
    if not Path(weights).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as file:
        return (file.metadata() or {}).get("ssa_slope_form")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def close_matches_hint(word: str, possibilities) -> str:
    matches = difflib.get_close_matches(word, list(possibilities), n=5, cutoff=0.5)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


@dataclass
class Config:
    name: str = ""
    hf_repo: str = ""  # the Hugging Face repository the preset describes
    # sizes
    block_size: int = 4096
    vocab_size: int = 50254
    padding_multiple: int = 512
    padded_vocab_size: int | None = None
    n_layer: int = 16
    n_head: int = 32
    n_embd: int = 4096
    head_size: int | None = None
    n_query_groups: int | None = None  # n_head: multi-head, 1: multi-query, in between: grouped-query
    intermediate_size: int | None = None
    # family differences
    position_embedding: Literal["rope", "learned", "none"] = "rope"  # none: no positional encoding (NoPE)
    rotary_percentage: float = 0.25
    rope_base: float = 10000.0
    rope_adjustments: dict | None = None  # Llama-3.1 frequency scaling
    parallel_residual: bool = True
    bias: bool = True
    attn_bias: bool = False  # a bias on the q, k, v projections even where `bias` is off (Qwen2 / Qwen2.5)
    norm_qk: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # each query sees its last `sliding_window` keys, itself included (Mistral)
    lm_head_bias: bool = False
    norm_class_name: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    mlp_class_name: Literal["GptNeoxMLP", "LLaMAMLP"] = "GptNeoxMLP"
    gelu_approximate: Literal["none", "tanh"] = "none"
    tie_embeddings: bool = False
    # attention temperature: Selective Self-Attention and the baselines it is compared with
    attention_temperature: Literal["none", "ssa", "ssa_position", "logn", "ssmax", "constant"] = "none"
    # the terms of each side's temperature
    ssa_query: SSATerms = "position+token"  # the inverse softmax temperature of each query
    ssa_value: SSATerms = "position+token"  # scales each value token
    ssa_key: SSATerms = "none"  # ablation
    ssa_token_weights: Literal["shared", "separate"] = "shared"
    ssa_slope_form: Literal["log", "sigmoid", "official"] = "log"  # slope = exp(p), sigmoid(p) or exp(-exp(p))
    ssa_position_init: float = 1e-2  # the position slope at initialisation
    logn_length: int | None = None  # L in max(1, log_L(n)); defaults to block_size
    ssmax_init: float | None = None  # s in s * log(n); defaults to 1 / log(block_size)
    constant_init: float = 1.0
    # the neighbours SSA is measured against (docs/method.md), each its own field
    attention_gate: Literal["none", "headwise", "elementwise"] = "none"  # gated attention: y * scale * sigmoid(x W_g)
    attention_gate_scale: float = 1.0  # the gate starts at scale / 2 (W_g = 0); fine-tuning adds it with 2: identity
    selective_mask: Literal["none", "leviathan"] = "none"  # selective attention: logits minus F, no parameters

    def __post_init__(self) -> None:
        for side in SSA_SIDES:  # YAML and the command line may spell "none" as null
            if getattr(self, side) is None:
                setattr(self, side, "none")
        check_field_types(self)
        for key in ("block_size", "vocab_size", "padding_multiple", "n_layer", "n_head", "n_embd", "head_size",
                    "n_query_groups", "intermediate_size", "padded_vocab_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"Config.{key} must be at least 1, got {getattr(self, key)}.")
        if not 2 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"Config.block_size must lie in [2, {MAX_BLOCK_SIZE:,}] (the positions a model serves;"
                             f" its rotary table is built for all of them), got {self.block_size:,}.")
        if not 0.0 <= self.rotary_percentage <= 1.0:
            raise ValueError(f"Config.rotary_percentage is the rotated share of each head and must lie in [0, 1], got"
                             f" {self.rotary_percentage}.")
        if not self.norm_eps > 0:
            raise ValueError(f"Config.norm_eps must be above 0, got {self.norm_eps}.")
        check_rope_adjustments(self.rope_adjustments)
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"Config.{key} must be one of {choices}, got {getattr(self, key)!r}.")
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")
            self.head_size = self.n_embd // self.n_head
        if self.padded_vocab_size is None:
            self.padded_vocab_size = find_multiple(self.vocab_size, self.padding_multiple)
        self.vocab_size = min(self.vocab_size, self.padded_vocab_size)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_query_groups ({self.n_query_groups}).")
        if self.intermediate_size is None:
            if self.mlp_class_name == "LLaMAMLP":
                raise ValueError(f"Config {self.name!r} uses LLaMAMLP and must set intermediate_size.")
            self.intermediate_size = 4 * self.n_embd
        if self.attention_temperature == "ssa" and all(getattr(self, side) == "none" for side in SSA_SIDES):
            raise ValueError("attention_temperature='ssa' needs a term on at least one side: set ssa_query, ssa_key"
                             f" or ssa_value to one of {SSA_TERMS[1:]}.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"Config.sliding_window is the number of keys a query sees and must be at least 1 (or"
                             f" null: no window), got {self.sliding_window}.")
        if not 0.0 < self.ssa_position_init < 1.0:
            raise ValueError(f"ssa_position_init is the position slope at initialisation and must lie in (0, 1), got"
                             f" {self.ssa_position_init}.")
        if not self.attention_gate_scale > 0:
            raise ValueError(f"Config.attention_gate_scale is the gate's ceiling and must be above 0, got"
                             f" {self.attention_gate_scale}.")
        if self.selective_mask != "none" and self.attention_temperature != "none":
            raise ValueError(f"selective_mask={self.selective_mask!r} with attention_temperature="
                             f"{self.attention_temperature!r} is not defined (F is built from head 0's logits, which a"
                             " temperature rescales): use one of the two; a gate combines with either.")
        if self.logn_length is None:
            self.logn_length = self.block_size
        if self.ssmax_init is None:
            self.ssmax_init = 1.0 / math.log(self.block_size)

    @property
    def vanilla_attention(self) -> bool:
        """Plain attention: no temperature, gate or selective mask (what the Hugging Face families compute)."""
        return (self.attention_temperature, self.attention_gate, self.selective_mask) == ("none", "none", "none")

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size) if self.position_embedding == "rope" else 0

    def estimated_parameters(self) -> dict[str, int]:
        """The backbone's parameter count by part, from the fields alone (no tensor is made; the attention's additions,
        norms and biases are left out: a lower bound within a few percent): `embedding` (and an untied output layer)
        and `blocks`."""
        d, heads, groups, size = self.n_embd, self.n_head, self.n_query_groups, self.head_size
        attention = d * (heads + 2 * groups) * size + heads * size * d
        mlp = (3 if self.mlp_class_name == "LLaMAMLP" else 2) * d * self.intermediate_size
        embedding = self.padded_vocab_size * d * (1 if self.tie_embeddings else 2)
        return dict(embedding=embedding, blocks=self.n_layer * (attention + mlp))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in name_to_config:
            raise ValueError(f"Unknown model preset {name!r}.{close_matches_hint(name, name_to_config)}")
        return cls.from_dict({**name_to_config[name], **overrides})

    def ssa_terms(self, side: str) -> tuple[bool, bool]:
        """(position term, token term) of SSA's temperature on `side` (query, key or value)."""
        terms = getattr(self, f"ssa_{side}")
        return "position" in terms, "token" in terms

    def check_stored_slope_form(self, stored: str | None, source: str) -> None:
        """SSA's slopes are stored as the parameter of one form (exp, sigmoid, ...), which the weights' metadata
        records: a config that names another form would read other slopes from the same numbers, so it is refused.
        Files written before the form was recorded, or by transformers, carry none."""
        slopes = self.attention_temperature == "ssa_position" or self.attention_temperature == "ssa" and any(
            self.ssa_terms(side)[0] for side in ("query", "key", "value"))
        if stored is not None and stored != self.ssa_slope_form and slopes:
            raise ValueError(f"{source} says ssa_slope_form {self.ssa_slope_form!r}, but the weights store the slopes"
                             f" in the {stored!r} form: it would read other slopes from them; set it back to"
                             f" {stored!r}.")

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        values = upgrade_ssa_fields(values)
        known = {f.name for f in fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            key = unknown[0]
            raise ValueError(f"Unknown config field {key!r}.{close_matches_hint(key, known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "Config":
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILENAME
        values = read_yaml(path, "a model config file")
        try:
            return cls.from_dict({**values, **overrides})
        except (ValueError, TypeError) as error:
            raise ValueError(f"{str(path)!r}: {error}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILENAME
        path.write_text(yaml.safe_dump(asdict(self), sort_keys=False), encoding="utf-8")

    def to_dict(self) -> dict:
        return asdict(self)


# the choices of every Literal field, from its annotation (the one place they are written)
CHOICES = {name: typing.get_args(hint) for name, hint in typing.get_type_hints(Config).items()
           if typing.get_origin(hint) is Literal}
TEMPERATURE_MODES = CHOICES["attention_temperature"]
SSA_TERMS = typing.get_args(SSATerms)
# the fields of the attention's additions (temperatures, gate, selective mask): what fine-tuning may change
ATTENTION_FIELDS = tuple(f.name for f in fields(Config) if f.name == "attention_temperature"
                         or f.name.startswith(("ssa_", "logn_", "ssmax_", "constant_", "attention_gate", "selective_")))


def with_ssa_flag(ssa: bool, overrides: dict) -> dict:
    """The --model.* overrides with `--ssa`, the training scripts' shorthand for --model.attention_temperature ssa."""
    mode = overrides.get("attention_temperature", "ssa")
    if ssa and mode != "ssa":
        raise ValueError(f"--ssa means --model.attention_temperature ssa, but --model.attention_temperature {mode} was"
                         " given: pass one of the two.")
    return {**overrides, "attention_temperature": "ssa"} if ssa else dict(overrides)


def read_yaml(path: Path, what: str) -> dict:
    """A YAML mapping from `path` (`what` names it in messages); a missing or malformed file is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected {what} at {str(path)!r}, found nothing there.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{str(path)!r} is not valid YAML ({first}); restore or fix the file.") from None
    if not isinstance(values, dict):
        raise ValueError(f"{str(path)!r} should hold a mapping of {what}'s fields, found {type(values).__name__}.")
    check_expanded_size(values, path)
    return values


def check_expanded_size(values, path: Path, limit: int = 100_000) -> None:
    """Refuse YAML whose aliases expand into more than `limit` values (a "billion laughs" file would take forever
    and all memory once copied out)."""
    stack, seen = [values], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            raise ValueError(f"{str(path)!r} expands into more than {limit:,} values through its aliases (&/*): not a"
                             " model config; write the values out.")
        if isinstance(node, dict):
            stack += node.values()
        elif isinstance(node, list):
            stack += node


def check_field_types(config: Config) -> None:
    """Each field holds a value of its annotated type (`n_layer: two` in a YAML file is refused, naming the field);
    an int is accepted for a float and stored as one."""
    plain = {int: int, float: (int, float), bool: bool, str: str, dict: dict}
    for name, hint in typing.get_type_hints(Config).items():
        value = getattr(config, name)
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in options:
            continue
        for option in options:
            kind = plain.get(typing.get_origin(option) or option)
            if typing.get_origin(option) is Literal:
                kind = str
            if kind is not None and isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
                if option is float:
                    setattr(config, name, float(value))
                break
        else:
            expected = " or ".join("null" if o is type(None) else getattr(o, "__name__", "a choice") for o in options)
            raise ValueError(f"Config.{name} must be {expected}, got {value!r}.")


def upgrade_ssa_fields(values: dict) -> dict:
    """Configs written before the per-side terms had boolean sides (ssa_query, ssa_value, ssa_key) and two global
    switches (ssa_position, ssa_token); translate them into the terms of each side."""
    legacy_sides = [side for side in SSA_SIDES if isinstance(values.get(side), bool)]
    if not legacy_sides and "ssa_position" not in values and "ssa_token" not in values:
        return values
    values = dict(values)
    switches = (("position", values.pop("ssa_position", True)), ("token", values.pop("ssa_token", True)))
    terms = "+".join(name for name, on in switches if on) or "none"
    for side, default in (("ssa_query", True), ("ssa_key", False), ("ssa_value", True)):
        on = values.get(side, default)
        if isinstance(on, bool):
            values[side] = terms if on else "none"
    return values


##########
# Presets: one row per model, named as the Hugging Face repository it describes.
##########
configs: list[dict] = [
    # a CPU-sized model for tests and demos
    dict(name="debug", block_size=256, vocab_size=1024, padding_multiple=64, n_layer=2, n_head=4, n_embd=64,
         n_query_groups=2, rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
         mlp_class_name="LLaMAMLP", intermediate_size=176),
    # the bundled demo: about 3M parameters with the bundled 4096-token tokenizer
    dict(name="demo", block_size=256, vocab_size=4096, padding_multiple=64, n_layer=4, n_head=4, n_embd=192,
         rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
         mlp_class_name="LLaMAMLP", intermediate_size=512, tie_embeddings=True),
]

gpt2 = dict(block_size=1024, vocab_size=50257, padded_vocab_size=50257, position_embedding="learned",
            parallel_residual=False, gelu_approximate="tanh", tie_embeddings=True)
configs += [
    dict(name="gpt2", hf_repo="openai-community/gpt2", n_layer=12, n_head=12, n_embd=768, **gpt2),
    dict(name="gpt2-medium", hf_repo="openai-community/gpt2-medium", n_layer=24, n_head=16, n_embd=1024, **gpt2),
    dict(name="gpt2-large", hf_repo="openai-community/gpt2-large", n_layer=36, n_head=20, n_embd=1280, **gpt2),
    dict(name="gpt2-xl", hf_repo="openai-community/gpt2-xl", n_layer=48, n_head=25, n_embd=1600, **gpt2),
]

pythia = [
    dict(name="pythia-14m", block_size=2048, n_layer=6, n_embd=128, n_head=4, padding_multiple=128),
    dict(name="pythia-31m", block_size=2048, n_layer=6, n_embd=256, n_head=8, padding_multiple=128),
    dict(name="pythia-70m", block_size=2048, n_layer=6, n_embd=512, n_head=8, padding_multiple=128),
    dict(name="pythia-160m", block_size=2048, n_layer=12, n_embd=768, n_head=12, padding_multiple=128),
    dict(name="pythia-410m", block_size=2048, n_layer=24, n_embd=1024, n_head=16, padding_multiple=128),
    dict(name="pythia-1b", block_size=2048, n_layer=16, n_embd=2048, n_head=8, padding_multiple=128),
    dict(name="pythia-1.4b", block_size=2048, n_layer=24, n_embd=2048, n_head=16, padding_multiple=128),
    dict(name="pythia-2.8b", block_size=2048, n_layer=32, n_embd=2560, n_head=32, padding_multiple=128),
    dict(name="pythia-6.9b", block_size=2048, n_layer=32, n_embd=4096, n_head=32, padding_multiple=256),
    dict(name="pythia-12b", block_size=2048, n_layer=36, n_embd=5120, n_head=40, padding_multiple=512),
]
for row in pythia:
    configs.append(dict(row, hf_repo=f"EleutherAI/{row['name']}"))
    if row["name"] not in ("pythia-14m", "pythia-31m"):  # these two have no deduped run
        configs.append(dict(row, name=f"{row['name']}-deduped", hf_repo=f"EleutherAI/{row['name']}-deduped"))

llama = dict(rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
             mlp_class_name="LLaMAMLP")
llama3 = dict(llama, vocab_size=128000, padded_vocab_size=128256, rope_base=500000.0)
llama31_rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
llama32_rope = dict(llama31_rope, factor=32.0)
smollm2 = dict(llama, block_size=8192, vocab_size=49152, padded_vocab_size=49152, tie_embeddings=True)
for suffix, hf_suffix in (("", ""), ("-chat", "-chat")):
    configs += [
        dict(name=f"Llama-2-7b{suffix}-hf", hf_repo=f"meta-llama/Llama-2-7b{hf_suffix}-hf", vocab_size=32000,
             padding_multiple=64, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, **llama),
        dict(name=f"Llama-2-13b{suffix}-hf", hf_repo=f"meta-llama/Llama-2-13b{hf_suffix}-hf", vocab_size=32000,
             padding_multiple=64, n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, **llama),
        dict(name=f"Llama-2-70b{suffix}-hf", hf_repo=f"meta-llama/Llama-2-70b{hf_suffix}-hf", vocab_size=32000,
             padding_multiple=64, n_layer=80, n_head=64, n_embd=8192, n_query_groups=8, intermediate_size=28672,
             **llama),
    ]
for suffix in ("", "-Instruct"):
    configs += [
        dict(name=f"Llama-3-8B{suffix}", hf_repo=f"meta-llama/Meta-Llama-3-8B{suffix}", block_size=8192,
             n_layer=32, n_head=32, n_embd=4096, n_query_groups=8, intermediate_size=14336, **llama3),
        dict(name=f"Llama-3-70B{suffix}", hf_repo=f"meta-llama/Meta-Llama-3-70B{suffix}", block_size=8192,
             n_layer=80, n_head=64, n_embd=8192, n_query_groups=8, intermediate_size=28672, **llama3),
        dict(name=f"Llama-3.1-8B{suffix}", hf_repo=f"meta-llama/Llama-3.1-8B{suffix}", block_size=131072,
             n_layer=32, n_head=32, n_embd=4096, n_query_groups=8, intermediate_size=14336,
             rope_adjustments=llama31_rope, **llama3),
        dict(name=f"Llama-3.2-1B{suffix}", hf_repo=f"meta-llama/Llama-3.2-1B{suffix}", block_size=131072,
             n_layer=16, n_head=32, n_embd=2048, n_query_groups=8, intermediate_size=8192,
             rope_adjustments=llama32_rope, tie_embeddings=True, **llama3),
        dict(name=f"Llama-3.2-3B{suffix}", hf_repo=f"meta-llama/Llama-3.2-3B{suffix}", block_size=131072,
             n_layer=28, n_head=24, n_embd=3072, n_query_groups=8, intermediate_size=8192,
             rope_adjustments=llama32_rope, tie_embeddings=True, **llama3),
        dict(name=f"SmolLM2-135M{suffix}", hf_repo=f"HuggingFaceTB/SmolLM2-135M{suffix}", n_layer=30, n_head=9,
             n_embd=576, n_query_groups=3, intermediate_size=1536, rope_base=100000.0, **smollm2),
        dict(name=f"SmolLM2-360M{suffix}", hf_repo=f"HuggingFaceTB/SmolLM2-360M{suffix}", n_layer=32, n_head=15,
             n_embd=960, n_query_groups=5, intermediate_size=2560, rope_base=100000.0, **smollm2),
        dict(name=f"SmolLM2-1.7B{suffix}", hf_repo=f"HuggingFaceTB/SmolLM2-1.7B{suffix}", n_layer=24, n_head=32,
             n_embd=2048, n_query_groups=32, intermediate_size=8192, rope_base=130000.0, **smollm2),
    ]
tiny_llama = dict(block_size=2048, vocab_size=32000, padding_multiple=64, n_layer=22, n_head=32, n_embd=2048,
                  n_query_groups=4, intermediate_size=5632, **llama)
configs += [
    dict(name="tiny-llama-1.1b", hf_repo="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", **tiny_llama),
    dict(name="tiny-llama-1.1b-chat", hf_repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0", **tiny_llama),
]

# Qwen2.5 (a bias on q, k, v only), Qwen3 (RMSNorm of q and k per head) and Mistral (v0.1: a 4,096-key window)
qwen = dict(llama, vocab_size=151643, padded_vocab_size=151936, rope_base=1000000.0, norm_eps=1e-6)
qwen25 = dict(qwen, attn_bias=True, block_size=32768)
qwen3 = dict(qwen, norm_qk=True, block_size=40960, head_size=128)
for suffix in ("", "-Instruct"):
    configs += [
        dict(name=f"Qwen2.5-0.5B{suffix}", hf_repo=f"Qwen/Qwen2.5-0.5B{suffix}", n_layer=24, n_head=14, n_embd=896,
             n_query_groups=2, intermediate_size=4864, tie_embeddings=True, **qwen25),
        dict(name=f"Qwen2.5-1.5B{suffix}", hf_repo=f"Qwen/Qwen2.5-1.5B{suffix}", n_layer=28, n_head=12, n_embd=1536,
             n_query_groups=2, intermediate_size=8960, tie_embeddings=True, **qwen25),
        dict(name=f"Qwen2.5-3B{suffix}", hf_repo=f"Qwen/Qwen2.5-3B{suffix}", n_layer=36, n_head=16, n_embd=2048,
             n_query_groups=2, intermediate_size=11008, tie_embeddings=True, **qwen25),
        dict(name=f"Qwen2.5-7B{suffix}", hf_repo=f"Qwen/Qwen2.5-7B{suffix}", n_layer=28, n_head=28, n_embd=3584,
             n_query_groups=4, intermediate_size=18944, **{**qwen25, "block_size": 131072 if not suffix else 32768}),
    ]
for suffix in ("", "-Base"):
    configs += [
        dict(name=f"Qwen3-0.6B{suffix}", hf_repo=f"Qwen/Qwen3-0.6B{suffix}", n_layer=28, n_head=16, n_embd=1024,
             n_query_groups=8, intermediate_size=3072, tie_embeddings=True, **qwen3),
        dict(name=f"Qwen3-1.7B{suffix}", hf_repo=f"Qwen/Qwen3-1.7B{suffix}", n_layer=28, n_head=16, n_embd=2048,
             n_query_groups=8, intermediate_size=6144, tie_embeddings=True, **qwen3),
        dict(name=f"Qwen3-4B{suffix}", hf_repo=f"Qwen/Qwen3-4B{suffix}", n_layer=36, n_head=32, n_embd=2560,
             n_query_groups=8, intermediate_size=9728, tie_embeddings=True, **qwen3),
        dict(name=f"Qwen3-8B{suffix}", hf_repo=f"Qwen/Qwen3-8B{suffix}", n_layer=36, n_head=32, n_embd=4096,
             n_query_groups=8, intermediate_size=12288, **qwen3),
    ]
mistral = dict(llama, block_size=32768, n_layer=32, n_head=32, n_embd=4096, n_query_groups=8, intermediate_size=14336,
               padding_multiple=256)
for suffix in ("", "-Instruct"):
    configs += [
        dict(name=f"Mistral-7B{suffix}-v0.1", hf_repo=f"mistralai/Mistral-7B{suffix}-v0.1", vocab_size=32000,
             sliding_window=4096, **mistral),
        dict(name=f"Mistral-7B{suffix}-v0.3", hf_repo=f"mistralai/Mistral-7B{suffix}-v0.3", vocab_size=32768,
             rope_base=1000000.0, **mistral),
    ]

name_to_config: dict[str, dict] = {row["name"]: deepcopy(row) for row in configs}

