"""What a fine-tuned SSA model's temperatures are on the fine-tuning study's test text, and what they change in its
loss: the check behind "did SSA learn anything?", which the learned parameters' ranges alone cannot answer (a token
weight's norm says little without the features it multiplies).

    python study/temperatures.py --checkpoint_dir out/ssa-rerun/seed1/final --seed 1 \
        --out study/runs/smollm2/temperatures/ssa-seed1.json

Over every non-overlapping window of the study's test text, for each side with a temperature (query, value) and
every (layer, head, token): |tau - 1| and its two terms apart, the position term slope log(n) and the token term
tanh(u . gelu(f)); their mean, 99th percentile and largest value. Then the test loss with the learned temperatures
and again with the position term, the token term, or both switched off (slopes 0, token weights 0, which is the
vanilla model with the same weights).
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
from lit_gpt.model import GPT, SSATemperature, slope_parameter
from lit_gpt.utils import check_output_files, run_cli, write_file
from study.finetune_study import GRID, FinetuneStudy, cpu_model
from study.reproduce import code_commit, window_loss

SIDES = ("query", "key", "value")
SWITCHED_OFF = {"learned": (), "no position term": ("position",), "no token term": ("token",),
                "neither (vanilla)": ("position", "token")}


def ssa_temperatures(model: GPT) -> list[SSATemperature]:
    found = [t for block in model.transformer.h for side in SIDES
             if isinstance(t := getattr(block.attn, f"{side}_temperature"), SSATemperature)]
    if not found:
        raise ValueError(f"The model has attention_temperature={model.config.attention_temperature!r}, no SSA"
                         " temperature to measure: give a checkpoint fine-tuned with --ssa true.")
    return found


@contextmanager
def switched_off(model: GPT, terms: tuple[str, ...]):
    """Within the block, SSA's position slopes are 0 ("position") and its token weights 0 ("token"); restored after."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()
             if name.endswith(("position_param", "token_weight"))}
    with torch.no_grad():
        for t in ssa_temperatures(model):
            if "position" in terms and t.position_param is not None:
                t.position_param.fill_(slope_parameter(torch.zeros((), dtype=torch.float64), t.config.ssa_slope_form))
            if "token" in terms and t.token_weight is not None:
                t.token_weight.zero_()
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


@torch.inference_mode()
def measure_terms(model: GPT, tokens: np.ndarray, window: int, batch: int = 4) -> dict:
    """|tau - 1|, |slope log(n)| and |token term| of each side over every (layer, head, token) of the windows."""
    count = (len(tokens) - 1) // window
    rows = torch.from_numpy(np.stack([tokens[i * window: i * window + window] for i in range(count)]))
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
def losses(model: GPT, tokens: np.ndarray, window: int) -> dict[str, float]:
    out = {}
    for name, terms in SWITCHED_OFF.items():
        with switched_off(model, terms):
            out[name] = window_loss(model, tokens, window, 10**9)
    return out


def main(checkpoint_dir: Path, out: Path, seed: int, arm: str = "ssa", split: str = "test") -> dict:
    """Measure the temperatures of an SSA checkpoint on the study's `split` text (test or val) and write the record.

    Args:
        checkpoint_dir: a fine-tuned SSA model's folder (its tokenizer must be the study checkpoint's).
        out: the JSON record to write (an existing file is not overwritten).
        seed: the scored seed the checkpoint repeats (the report sets the record beside that run's).
        arm: the study arm the checkpoint belongs to.
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
    ssa_temperatures(model)
    grid = read_yaml(GRID, "the fine-tuning study's grid")
    study = FinetuneStudy(grid, checkpoint_dir, Path("out/finetune-study"), Path("."))
    tokens, window = study.scored_tokens(split), grid["data"]["window"]
    loss = losses(model, tokens, window)
    record = dict(arm=arm, seed=seed, checkpoint=str(checkpoint_dir), split=split, tokens=len(tokens), window=window,
                  terms=measure_terms(model, tokens, window), loss=loss,
                  ppl={name: math.exp(v) for name, v in loss.items()}, code_commit=code_commit(), cpu=cpu_model(),
                  threads=torch.get_num_threads(), torch=torch.__version__)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, json.dumps(record, indent=1) + "\n")
    print("\n".join(table(record)))
    return record


def table(record: dict) -> list[str]:
    """The record as markdown: the terms' sizes per side, then the loss with each term switched off."""
    lines = ["| side | what | mean | 99th percentile | largest |", "|---|---|---|---|---|"]
    for side, terms in record["terms"].items():
        for name, s in terms.items():
            lines.append(f"| {side} | abs({name}) | {s['mean']:.2e} | {s['p99']:.2e} | {s['max']:.2e} |")
    learned = record["loss"]["learned"]
    lines += ["", f"| temperatures | {record['split']} loss, nats | change from the learned | perplexity |",
              "|---|---|---|---|"]
    for name, v in record["loss"].items():
        lines.append(f"| {name} | {v:.6f} | {v - learned:+.6f} | {record['ppl'][name]:.4f} |")
    return lines


if __name__ == "__main__":
    run_cli(main)
