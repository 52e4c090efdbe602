"""Passkey retrieval (Mohtashami & Jaggi 2023): can the model find a 5-digit key hidden in filler text?

    python eval/passkey.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --lengths "[256, 512, 1024, 2048]"

A grid of prompt lengths x needle depths x trials, greedy decoding; a trial is correct when the first integer in the
output is the key. Writes passkey.json (accuracy per cell, per length and overall), passkey.csv and passkey.png (a
heatmap: length on x, depth on y) to the output folder.
"""

import csv
import json
from pathlib import Path

from lit_gpt.evaluation import passkey_min_length, run_passkey_grid, summarize_passkey
from lit_gpt.generation import load_for_inference
from lit_gpt.plots import plot_passkey_heatmap
from lit_gpt.utils import (
    at_least,
    atomic_file,
    check_output_files,
    check_seed,
    check_writable,
    eval_output,
    run_cli,
    write_file,
)


def passkey_lengths(model, tokenizer, lengths: list[int] | None, max_new_tokens: int) -> list[int]:
    """The prompt lengths to test, checked: each holds the prompt's fixed text and one filler, and leaves room for
    the answer in the model's context (a model without positional encoding reads beyond its block)."""
    shortest = passkey_min_length(tokenizer)
    if lengths is not None and model.config.position_embedding == "none" and lengths:
        model.max_seq_length = max(model.max_seq_length, max(lengths) + max_new_tokens)
    context = model.max_seq_length - max_new_tokens
    if lengths is None:  # powers of two that fit, or the context itself on a small model
        lengths = [n for n in (256, 512, 1024, 2048, 4096) if shortest <= n <= context] or [context]
    if not lengths:
        raise ValueError("--lengths is empty: give at least one prompt length.")
    too_short = [n for n in lengths if n < shortest]
    if too_short:
        raise ValueError(f"--lengths {too_short}: a passkey prompt needs at least {shortest} tokens (its question,"
                         " key and one filler sentence); give longer lengths.")
    too_long = [n for n in lengths if n > context]
    if too_long:
        raise ValueError(f"--lengths {too_long} leave no room for {max_new_tokens} answer tokens in the model's"
                         f" context of {model.max_seq_length}; only a model without positional encoding"
                         " (position_embedding: none) reads beyond its block_size.")
    return lengths


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
        output_dir: where passkey.json, passkey.csv and passkey.png go; default out/eval/<checkpoint>/passkey (a
            run's final/ as <run>-final), never inside the checkpoint.
        device: cpu or cuda; default cuda when available.
        dtype: float32, float16, bfloat16, or auto (bfloat16 where this CPU or GPU multiplies it fast, temperatures
            kept in float32); default the checkpoint's own.
    """
    at_least(1, trials=trials, max_new_tokens=max_new_tokens)
    check_seed(seed)
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths must be a non-empty list of values in [0, 1], got {depths}.")
    output_dir = Path(output_dir) if output_dir is not None else eval_output(checkpoint_dir, "passkey")
    check_writable(output_dir, "--output_dir", is_dir=True)
    check_output_files([output_dir / name for name in ("passkey.json", "passkey.csv", "passkey.png")], "--output_dir",
                       [checkpoint_dir])
    model, tokenizer = load_for_inference(checkpoint_dir, device, dtype)
    lengths = passkey_lengths(model, tokenizer, lengths, max_new_tokens)
    result = summarize_passkey(run_passkey_grid(model, tokenizer, lengths, depths, trials, seed, max_new_tokens))
    output_dir.mkdir(parents=True, exist_ok=True)
    write_file(output_dir / "passkey.json", json.dumps(result, indent=2))
    with atomic_file(output_dir / "passkey.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["length", "depth", "accuracy", "trials"])
        writer.writerows([r["length"], r["depth"], r["accuracy"], r["trials"]] for r in result["cells"])
    plot_passkey_heatmap(result["cells"], output_dir / "passkey.png", f"passkey retrieval: {model.config.name}")
    print(json.dumps({"accuracy": result["accuracy"], "per_length": result["per_length"]}, indent=2))
    print(f"Wrote {output_dir}/passkey.json, passkey.csv and passkey.png")
    return result


if __name__ == "__main__":
    run_cli(main)
