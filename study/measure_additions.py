"""What a fine-tuned model's attention additions do on the fine-tuning study's test text: SSA's temperatures, or the
gate's values, and what they change in its loss. The check behind "did the addition learn anything?", which the
learned parameters' norms alone cannot answer (a weight's norm says little without the features it multiplies).

    python study/measure_additions.py --checkpoint_dir out/ssa-rerun/seed1/final --seed 1 \
        --out study/runs/smollm2/measured/ssa-seed1.json
    python study/measure_additions.py --checkpoint_dir out/gate-rerun/seed1/final --seed 1 --arm gate \
        --out study/runs/smollm2/measured/gate-seed1.json

Over every non-overlapping window of the study's test text:
- SSA: for each side with a temperature (query, value) and every (layer, head, token), |tau - 1| and its two terms
  apart, the position term slope log(n) and the token term tanh(u . gelu(f)); their mean, 99th percentile and largest
  value. Then the test loss with the learned temperatures and again with the position term, the token term, or both
  switched off (slopes 0, token weights 0, which is the vanilla model with the same weights).
- The gate: for every (layer, head, token), |g - 1| with g = scale sigmoid(x W) the factor on the head's output, and
  g's lowest and highest value. Then the test loss with the learned gates and with W = 0 (g = 1 at the fine-tuning
  scale 2: the vanilla model with the same weights).
"""

import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lit_gpt.analysis import learned_slopes, recording_attention
from lit_gpt.checkpoint import load_checkpoint
from lit_gpt.config import read_yaml
from lit_gpt.model import GPT, AttentionGate, SSATemperature, slope_parameter
from lit_gpt.utils import check_output_files, run_cli, write_file
from study.finetune_study import GRID, FinetuneStudy, cpu_model
from study.reproduce import code_commit, window_loss

SIDES = ("query", "key", "value")
SWITCHED_OFF = {  # what is switched off in each loss, for each kind of addition
    "ssa": {"learned": (), "no position term": ("position",), "no token term": ("token",),
            "neither (vanilla)": ("position", "token")},
    "gate": {"learned": (), "gate off, W = 0 (vanilla)": ("gate",)},
}


def ssa_temperatures(model: GPT) -> list[SSATemperature]:
    return [t for block in model.transformer.h for side in SIDES
            if isinstance(t := getattr(block.attn, f"{side}_temperature"), SSATemperature)]


def gates(model: GPT) -> list[AttentionGate]:
    return [block.attn.gate for block in model.transformer.h if block.attn.gate is not None]


def addition(model: GPT) -> str:
    """Which addition the model carries ("ssa" or "gate"); an error for none, for both, or for a gate whose W = 0 is
    not the identity (scale 2), so that switching it off would not give the vanilla model."""
    c = model.config
    found = [kind for kind, modules in (("ssa", ssa_temperatures(model)), ("gate", gates(model))) if modules]
    if len(found) != 1:
        raise ValueError(f"The model has attention_temperature={c.attention_temperature!r} and attention_gate="
                         f"{c.attention_gate!r}: expected exactly one of an SSA temperature or a gate to measure; give"
                         " a checkpoint fine-tuned with --ssa true or with --model.attention_gate headwise.")
    if found == ["gate"] and c.attention_gate_scale != 2:
        raise ValueError(f"The gate's scale is {c.attention_gate_scale}: expected 2 (the fine-tuning scale, where"
                         " W = 0 is the identity), so that switching the gate off gives the vanilla model.")
    return found[0]


@contextmanager
def switched_off(model: GPT, terms: tuple[str, ...]):
    """Within the block, SSA's position slopes are 0 ("position"), its token weights 0 ("token") and the gates' W 0
    ("gate"); restored after."""
    added = model.added_parameter_names()
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if name in added}
    with torch.no_grad():
        for t in ssa_temperatures(model):
            if "position" in terms and t.position_param is not None:
                t.position_param.fill_(slope_parameter(torch.zeros((), dtype=torch.float64), t.config.ssa_slope_form))
            if "token" in terms and t.token_weight is not None:
                t.token_weight.zero_()
        if "gate" in terms:
            for g in gates(model):
                g.proj.weight.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


def summary(values: torch.Tensor) -> dict:
    values = values.double().numpy()
    return dict(mean=float(values.mean()), p99=float(np.percentile(values, 99)), max=float(values.max()))


def whole_windows(tokens: np.ndarray, window: int) -> torch.Tensor:
    """The inputs of every non-overlapping window that has a next token to predict at its end, as window_loss reads
    them: (windows, window)."""
    count = (len(tokens) - 1) // window
    return torch.from_numpy(tokens[: count * window].reshape(count, window))


@torch.inference_mode()
def measure_terms(model: GPT, tokens: np.ndarray, window: int, batch: int = 4) -> dict:
    """|tau - 1|, |slope log(n)| and |token term| of each side over every (layer, head, token) of the windows."""
    rows = whole_windows(tokens, window)
    slopes = learned_slopes(model)
    log_n = torch.arange(1, window + 1, dtype=torch.float32).log()  # (T,): query i sees i + 1 keys
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    for chunk in rows.split(batch):
        with recording_attention(model) as layers:
            model(chunk)
        for i, layer in enumerate(layers):
            for side in SIDES:
                tau = layer.get(f"{side}_temperature")
                if tau is None:
                    continue
                tau = tau.float().expand(chunk.size(0), -1, -1)  # (B, heads, T)
                position = slopes[i][side][:, None] * log_n if side in slopes[i] else torch.zeros(1, window)
                token = tau - 1 - position  # (B, heads, T)
                side_parts = parts.setdefault(side, {"tau - 1": [], "position term": [], "token term": []})
                side_parts["tau - 1"].append((tau - 1).abs().flatten())
                side_parts["position term"].append(position.abs().expand_as(tau).flatten())
                side_parts["token term"].append(token.abs().flatten())
    return {side: {name: summary(torch.cat(v)) for name, v in terms.items()} for side, terms in parts.items()}


@torch.inference_mode()
def measure_gates(model: GPT, tokens: np.ndarray, window: int, batch: int = 4) -> tuple[dict, dict]:
    """|g - 1| over every (layer, head or channel, token) of the windows, g = scale sigmoid(x W) read from the gates'
    projections; and g's lowest and highest value."""
    rows = whole_windows(tokens, window)
    values: list[torch.Tensor] = []
    hooks = [g.proj.register_forward_hook(lambda m, i, o, s=g.scale: values.append(s * torch.sigmoid(o.float())))
             for g in gates(model)]
    try:
        for chunk in rows.split(batch):
            model(chunk)
    finally:
        for h in hooks:
            h.remove()
    g = torch.cat([v.flatten() for v in values])
    return {"gate": {"g - 1": summary((g - 1).abs())}}, {"lowest": g.min().item(), "highest": g.max().item()}


@torch.inference_mode()
def losses(model: GPT, tokens: np.ndarray, window: int) -> dict[str, float]:
    out = {}
    for name, terms in SWITCHED_OFF[addition(model)].items():
        with switched_off(model, terms):
            out[name] = window_loss(model, tokens, window, 10**9)
    return out


def main(checkpoint_dir: Path, out: Path, seed: int, arm: str | None = None, split: str = "test") -> dict:
    """Measure the temperatures of an SSA checkpoint, or the gates of a gated one, on the study's `split` text (test
    or val) and write the record.

    Args:
        checkpoint_dir: a fine-tuned SSA or gated model's folder (its tokenizer must be the study checkpoint's).
        out: the JSON record to write (an existing file is not overwritten).
        seed: the scored seed the checkpoint repeats (the report sets the record beside that run's).
        arm: the study arm the checkpoint belongs to (default: the addition it carries, ssa or gate).
        split: the study's text to read: test or val.
    """
    if split not in ("test", "val"):
        raise ValueError(f"--split {split!r}: expected test or val, the study's scored texts.")
    found = "a symbolic link" if out.is_symlink() else "an existing file" if out.exists() else None
    if found or out.suffix != ".json":
        raise ValueError(f"--out {out}: expected a new .json file, found {found or 'the suffix ' + repr(out.suffix)};"
                         " a record is never overwritten: choose another name.")
    check_output_files([out], "--out", [checkpoint_dir])
    model = load_checkpoint(checkpoint_dir).eval()
    kind = addition(model)
    grid = read_yaml(GRID, "the fine-tuning study's grid")
    study = FinetuneStudy(grid, checkpoint_dir, Path("out/finetune-study"), Path("."))
    tokens, window = study.scored_tokens(split), grid["data"]["window"]
    loss = losses(model, tokens, window)
    extra = {}
    if kind == "ssa":
        terms = measure_terms(model, tokens, window)
    else:
        terms, extra["gate_range"] = measure_gates(model, tokens, window)
    record = dict(arm=arm or kind, addition=kind, seed=seed, checkpoint=str(checkpoint_dir), split=split,
                  tokens=len(tokens), window=window, terms=terms, **extra, loss=loss,
                  ppl={name: math.exp(v) for name, v in loss.items()}, code_commit=code_commit(), cpu=cpu_model(),
                  threads=torch.get_num_threads(), torch=torch.__version__)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, json.dumps(record, indent=1) + "\n")
    print("\n".join(table(record)))
    return record


def table(record: dict) -> list[str]:
    """The record as markdown: the terms' sizes per side (SSA) or the gate's (g), then the loss with each switched
    off."""
    lines = ["| side | what | mean | 99th percentile | largest |", "|---|---|---|---|---|"]
    for side, terms in record["terms"].items():
        for name, s in terms.items():
            lines.append(f"| {side} | abs({name}) | {s['mean']:.2e} | {s['p99']:.2e} | {s['max']:.2e} |")
    if "gate_range" in record:
        lines += ["", f"g ranges over [{record['gate_range']['lowest']:.4f}, {record['gate_range']['highest']:.4f}]."]
    learned = record["loss"]["learned"]
    what = "gates" if record.get("addition") == "gate" else "temperatures"
    lines += ["", f"| {what} | {record['split']} loss, nats | change from the learned | perplexity |",
              "|---|---|---|---|"]
    for name, v in record["loss"].items():
        lines.append(f"| {name} | {v:.6f} | {v - learned:+.6f} | {record['ppl'][name]:.4f} |")
    return lines


if __name__ == "__main__":
    run_cli(main)
