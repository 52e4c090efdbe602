"""Low-rank adapters (LoRA, Hu et al. 2021) and weight-decomposed ones (DoRA, Liu et al. 2024) on the linear layers
of a frozen model, merged into plain weights for every other tool.

    LoRA:  y = x W^T + b + s * dropout(x) A^T B^T,                  s = alpha / rank, B = 0 at the start
    DoRA:  y = m / ||W + s B A||_row * (x W^T + s * dropout(x) A^T B^T) + b,   m = ||W||_row at the start

The fused qkv projection carries separate q, k and v adapters of their own output sizes (grouped-query attention
included). An adapted layer is still an nn.Linear with its own `weight` and `bias`, so the backbone's names do not
change; the adapters add `lora_A_*`, `lora_B_*` (and DoRA's `magnitude`).
"""

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from lit_gpt.checkpoint import save_tensors
from lit_gpt.config import Config, read_yaml
from lit_gpt.hf import ARCHITECTURE_FIELDS
from lit_gpt.model import GPT, WEIGHTS_FILENAME

TARGETS = ("query", "key", "value", "projection", "mlp", "head")
Target = Literal["query", "key", "value", "projection", "mlp", "head"]


@dataclass
class LoRAArgs:
    """Low-rank adapters.

    Args:
        rank: the rank r of each adapter.
        alpha: the adapters' scale is alpha / rank.
        dropout: dropout on the adapters' input.
        targets: which projections carry adapters: query, key, value (the parts of the fused qkv projection),
            projection (the attention output), mlp (every MLP projection), head (the output layer).
        dora: weight-decomposed adapters (DoRA): a learned magnitude per output row over the adapted direction.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[Target] = field(default_factory=lambda: ["query", "key", "value"])
    dora: bool = False

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--lora.rank must be a whole number of at least 1, got {self.rank}.")
        if not self.alpha > 0:
            raise ValueError(f"--lora.alpha must be above 0 (the adapters' scale is alpha / rank), got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora.dropout must lie in [0, 1), got {self.dropout}.")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"--lora.targets takes some of {', '.join(TARGETS)}; got {list(self.targets)}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Linear):
    """An nn.Linear (its `weight` and `bias` shared with the layer it adapts, frozen) with adapters on slices of its
    output rows: `parts` names each slice (q, k, v of a fused projection, or one "all")."""

    def __init__(self, linear: nn.Linear, parts: dict[str, int], args: LoRAArgs) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.sizes = dict(parts)  # output rows of each slice, in order
        self.adapted = [name for name, size in parts.items() if size and name in args.targets]
        self.scale, self.dora = args.scale, args.dora
        self.dropout = nn.Dropout(args.dropout)
        device, dtype = linear.weight.device, linear.weight.dtype
        for name in self.adapted:
            a = torch.empty(args.rank, self.in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as in the LoRA paper's code; B = 0: the layer is unchanged
            self.register_parameter(f"lora_A_{name}", nn.Parameter(a))
            self.register_parameter(f"lora_B_{name}", nn.Parameter(torch.zeros(self.sizes[name], args.rank,
                                                                               device=device, dtype=dtype)))
        if self.dora:
            self.magnitude = nn.Parameter(self.weight.detach().norm(dim=1))

    def delta_rows(self, x: torch.Tensor) -> torch.Tensor:
        """s * x A^T B^T for every output row (zero where a slice has no adapter)."""
        pieces = []
        for name, size in self.sizes.items():
            if name in self.adapted:
                a, b = getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")
                pieces.append((x @ a.T) @ b.T)
            else:
                pieces.append(x.new_zeros(*x.shape[:-1], size))
        return self.scale * torch.cat(pieces, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """s * B A as one (out, in) matrix."""
        return delta_weight(self.sizes, {n: p for n, p in self.named_parameters(recurse=False)}, self.weight,
                            self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight) + self.delta_rows(self.dropout(x))
        if self.dora:
            out = out * (self.magnitude / (self.weight + self.delta_weight()).norm(dim=1))
        return out if self.bias is None else out + self.bias



def delta_weight(sizes: dict[str, int], params: dict[str, torch.Tensor], weight: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """s * B A of one layer as an (out, in) matrix, zero on the rows of slices without an adapter."""
    rows = []
    for name, size in sizes.items():
        if f"lora_A_{name}" in params:
            rows.append(params[f"lora_B_{name}"] @ params[f"lora_A_{name}"])
        else:
            rows.append(weight.new_zeros(size, weight.size(1)))
    return scale * torch.cat(rows)


@torch.no_grad()
def merge_weight(weight: torch.Tensor, sizes: dict[str, int], params: dict[str, torch.Tensor], scale: float,
                 dora: bool) -> torch.Tensor:
    """W + s B A, or DoRA's m (W + s B A) / ||W + s B A||_row, in float32 at least, cast back to W's dtype."""
    acc = {k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in params.items()}
    merged = weight.to(torch.promote_types(weight.dtype, torch.float32))
    merged = merged + delta_weight(sizes, acc, merged, scale)
    if dora:
        merged = merged * (acc["magnitude"] / merged.norm(dim=1))[:, None]
    return merged.to(weight.dtype)


def lora_parts(args: LoRAArgs, model: GPT) -> dict[str, dict[str, int]]:
    """For each adapted layer (by its name in the model), its output slices."""
    config = model.config
    nh, ng, hs = config.n_head, config.n_query_groups, config.head_size
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            continue
        if name.endswith(".attn.qkv") and {"query", "key", "value"} & set(args.targets):
            layers[name] = {"query": nh * hs, "key": ng * hs, "value": ng * hs}
        elif name.endswith(".attn.proj") and "projection" in args.targets:
            layers[name] = {"projection": module.out_features}
        elif ".mlp." in name and "mlp" in args.targets:
            layers[name] = {"mlp": module.out_features}
        elif name == "lm_head" and "head" in args.targets:
            layers[name] = {"head": module.out_features}
    return layers


def add_lora(model: GPT, args: LoRAArgs) -> GPT:
    """Replace the targeted linear layers by adapted ones and freeze everything else but the attention's additions
    (temperatures, gates), which train at their own rates."""
    args.check()
    if "head" in args.targets and model.config.tie_embeddings:
        raise ValueError("--lora.targets head: this model's output layer is its embedding (tie_embeddings), which an"
                         " adapter would change on both sides; leave head out.")
    for name, parts in lora_parts(args, model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), parts, args))
    trainable = {id(p) for p in lora_parameters(model)} | {id(p) for p in model.added_parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in trainable
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for n, p in m.named_parameters(recurse=False)
            if n.startswith(("lora_", "magnitude"))]


def adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `lora.safetensors` holds: the adapters and the attention's additions, out of a full state dict."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names or k.rsplit(".", 1)[-1].startswith(("lora_", "magnitude"))}


def merged_state(model: nn.Module, state: dict[str, torch.Tensor], args: LoRAArgs) -> dict[str, torch.Tensor]:
    """A plain state dict (the backbone's own names) with every adapter merged into its weight, computed from the
    state dict itself (as Fabric gathered it, whatever the strategy)."""
    is_adapter = lambda key: key.rsplit(".", 1)[-1].startswith(("lora_", "magnitude"))  # noqa: E731
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and f"{name}.weight" in merged:
            params = {k.removeprefix(f"{name}."): v for k, v in state.items()
                      if k.startswith(f"{name}.") and is_adapter(k)}
            merged[f"{name}.weight"] = merge_weight(merged[f"{name}.weight"], module.sizes, params, args.scale,
                                                    args.dora)
    return merged


LORA_WEIGHTS, LORA_SETTINGS = "lora.safetensors", "lora.yaml"


def weights_fingerprint(path: Path) -> str:
    """sha256 of a weights file, read in chunks: which base model an adapter belongs to."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def lora_files(args: LoRAArgs, model: nn.Module, base_dir: Path, base: Config):
    """The `transform` of save_checkpoint for a LoRA run: writes lora.safetensors (the adapters and the attention's
    additions, small, to share) and lora.yaml (the settings and which base they belong to) into the checkpoint
    folder, and returns the merged weights that the folder's model.safetensors holds."""
    settings = {"lora": args.to_dict(), "config": model.config.to_dict(),
                "base": {"folder": Path(base_dir).resolve().name, "config": base.to_dict(),
                         "weights_sha256": weights_fingerprint(Path(base_dir) / WEIGHTS_FILENAME)}}

    def transform(weights: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
        save_tensors(adapter_state(model, weights), folder / LORA_WEIGHTS, metadata={"format": "pt"})
        (folder / LORA_SETTINGS).write_text(yaml.safe_dump(settings, sort_keys=False))
        return merged_state(model, weights, args)

    return transform


def read_lora_settings(path: Path) -> tuple[dict, LoRAArgs, Config]:
    """lora.yaml of a LoRA run's checkpoint, checked: its three sections (lora, config, base), LoRA fields this
    version knows, and a config that loads. Returns the settings, the adapters' arguments and the adapted model's
    config; anything else is one line naming the file and the field."""
    path = Path(path)
    settings = read_yaml(path, "a LoRA run's settings (lora.yaml)")
    for name in ("lora", "config", "base"):
        if not isinstance(settings.get(name), dict):
            found = "nothing" if name not in settings else type(settings[name]).__name__
            raise ValueError(f"{str(path)!r} should have a {name!r} section (a mapping), found {found}: it is not"
                             " the lora.yaml of a finetune/lora.py checkpoint, or it was edited; copy it again.")
    missing = [k for k in ("folder", "config", "weights_sha256") if k not in settings["base"]]
    if missing:
        raise ValueError(f"{str(path)!r}: its 'base' section lacks {missing[0]!r} (which base the adapters belong"
                         " to); copy lora.yaml again from the run.")
    known = {f.name for f in fields(LoRAArgs)}
    unknown = [k for k in settings["lora"] if k not in known]
    if unknown:
        raise ValueError(f"{str(path)!r}: unknown LoRA field {unknown[0]!r} in its 'lora' section (expected some of"
                         f" {', '.join(sorted(known))}); remove it or copy lora.yaml again from the run.")
    args = LoRAArgs(**settings["lora"])
    try:
        args.check()
        config = Config.from_dict(settings["config"])
        Config.from_dict(settings["base"]["config"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{str(path)!r}: {str(error).replace('--lora.', 'lora.')}") from None
    return settings, args, config


def check_adapter_shapes(adapters: dict[str, torch.Tensor], model: nn.Module, source: Path, settings: Path) -> None:
    """The adapter file holds exactly the tensors, of the shapes, that its settings make (a rank or target edited in
    lora.yaml, or files of two runs, do not)."""
    expected = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    if set(adapters) != set(expected):
        missing, unexpected = sorted(set(expected) - set(adapters)), sorted(set(adapters) - set(expected))
        raise ValueError(f"{source} does not match {settings}: missing {missing[:3]}, unexpected {unexpected[:3]};"
                         " copy both files of the same run.")
    for name, shape in expected.items():
        if adapters[name].shape != shape:
            raise ValueError(f"{source} does not match {settings}: {name} has shape {tuple(adapters[name].shape)}"
                             f" there, {tuple(shape)} by the settings (another rank?); copy both files of the same"
                             " run.")


def check_same_kind(checkpoint: Path, lora: LoRAArgs | None, script: str) -> None:
    """Resuming continues the same kind of run: a LoRA run's checkpoint (it has lora.yaml) only with
    finetune/lora.py and the same adapters (rank, alpha, targets, DoRA; the dropout may change), any other only
    without adapters. One line naming what differs."""
    settings_file = Path(checkpoint) / LORA_SETTINGS
    if not settings_file.is_file():
        if lora is not None:
            raise ValueError(f"{str(checkpoint)!r} is a checkpoint without adapters (no {LORA_SETTINGS}): resume it"
                             f" with the script that wrote it (finetune/full.py or pretrain/), or choose another"
                             " --out_dir for a new LoRA run.")
        return
    _, saved, _ = read_lora_settings(settings_file)
    if lora is None:
        raise ValueError(f"{str(checkpoint)!r} is a LoRA run's checkpoint (rank {saved.rank}): resume it with"
                         f" finetune/lora.py and its settings, or choose another --out_dir for a new {script} run.")
    differ = [k for k, v in saved.to_dict().items() if lora.to_dict()[k] != v and k != "dropout"]
    if differ:
        shown = ", ".join(f"{k}: {getattr(saved, k)!r} there, {getattr(lora, k)!r} now" for k in differ[:3])
        raise ValueError(f"{str(checkpoint)!r} was trained with other adapters ({shown}): resume with the same"
                         " --lora.* settings, or choose another --out_dir for a new run.")


def check_same_base(settings: dict, checkpoint_dir: Path, source: Path) -> None:
    """An adapter merges only into the base it was trained on: the same architecture and the same weights."""
    trained_on = Config.from_dict(settings["base"]["config"])
    base = Config.from_file(checkpoint_dir)
    differing = [f for f in ARCHITECTURE_FIELDS if getattr(trained_on, f) != getattr(base, f)]
    if differing:
        field_name = differing[0]
        raise ValueError(f"{source} was trained on another model: {field_name} is {getattr(trained_on, field_name)!r}"
                         f" there and {getattr(base, field_name)!r} in {checkpoint_dir}; merge it into its own base"
                         f" ({settings['base']['folder']}).")
    if weights_fingerprint(Path(checkpoint_dir) / WEIGHTS_FILENAME) != settings["base"]["weights_sha256"]:
        raise ValueError(f"{source} was trained on other weights than {checkpoint_dir}'s (same architecture, another"
                         f" checkpoint): merge it into its own base ({settings['base']['folder']}).")
