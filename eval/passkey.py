"""Passkey retrieval (Mohtashami & Jaggi 2023): can the model find a 5-digit key hidden in filler text?

    python eval/passkey.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --lengths "[256, 512, 1024, 2048]"

A grid of prompt lengths x needle depths x trials, greedy decoding; a trial is correct when the first integer in the
output is the key. Writes passkey.json (accuracy per cell, per length and overall), passkey.csv and passkey.png (a
heatmap: length on x, depth on y) to the output folder.
"""

import csv
import json
from pathlib import Path

import torch

from lit_gpt.evaluation import run_passkey_grid, summarize_passkey
from lit_gpt.model import GPT
from lit_gpt.plots import plot_passkey_heatmap
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import parse_dtype, run_cli


def main(
    checkpoint_dir: Path,
    lengths: list[int] | None = None,
    depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0],  # noqa: B006 (jsonargparse shows it as the default)
    trials: int = 5,
    seed: int = 0,
    max_new_tokens: int = 8,
    output_dir: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Passkey retrieval accuracy of a checkpoint.

    Args:
        checkpoint_dir: a checkpoint folder.
        lengths: prompt lengths in tokens; default powers of two from 256 up to the context (at most 4096).
        depths: where the key sits in the filler, 0 = start, 1 = end.
        trials: keys tried per (length, depth) cell.
        seed: seeds the keys.
        max_new_tokens: tokens generated for the answer.
        output_dir: where passkey.json, passkey.csv and passkey.png go; default <checkpoint_dir>/passkey.
        device: cpu or cuda; default cuda when available.
        dtype: float32, float16 or bfloat16; default the checkpoint's own.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT.from_checkpoint(checkpoint_dir, device=device, dtype=parse_dtype(dtype)).eval()
    tokenizer = Tokenizer(checkpoint_dir)
    if model.config.position_embedding == "none" and lengths:  # no positional encoding (NoPE): no length limit
        model.max_seq_length = max(model.max_seq_length, max(lengths) + max_new_tokens)
    context = model.max_seq_length - max_new_tokens
    lengths = lengths or [n for n in (256, 512, 1024, 2048, 4096) if n <= context]
    too_long = [n for n in lengths if n > context]
    if too_long:
        raise ValueError(f"Lengths {too_long} leave no room for {max_new_tokens} answer tokens in the model's"
                         f" context of {model.max_seq_length}; only a model without positional encoding"
                         " (position_embedding: none) reads beyond its block_size.")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"Depths must lie in [0, 1], got {depths}.")
    result = summarize_passkey(run_passkey_grid(model, tokenizer, lengths, depths, trials, seed, max_new_tokens))
    output_dir = Path(output_dir) if output_dir is not None else Path(checkpoint_dir) / "passkey"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "passkey.json").write_text(json.dumps(result, indent=2))
    with open(output_dir / "passkey.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["length", "depth", "accuracy", "trials"])
        writer.writerows([r["length"], r["depth"], r["accuracy"], r["trials"]] for r in result["cells"])
    plot_passkey_heatmap(result["cells"], output_dir / "passkey.png", f"passkey retrieval: {model.config.name}")
    print(json.dumps({"accuracy": result["accuracy"], "per_length": result["per_length"]}, indent=2))
    print(f"Wrote {output_dir}/passkey.json, passkey.csv and passkey.png")
    return result


if __name__ == "__main__":
    run_cli(main)
