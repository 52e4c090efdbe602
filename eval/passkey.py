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
from tqdm import tqdm

from lit_gpt.evaluation import first_integer, passkey_keys, passkey_prompt
from lit_gpt.generation import generate_text
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import parse_dtype, run_cli


def run_grid(model: GPT, tokenizer: Tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int,
             max_new_tokens: int) -> list[dict]:
    """One row per (length, depth) cell, with its accuracy and the raw answers."""
    rows = []
    cells = [(length, depth) for length in lengths for depth in depths]
    for i, (length, depth) in enumerate(tqdm(cells, desc="passkey", unit="cell")):
        answers, correct = [], 0
        for key in passkey_keys(trials, seed + i):
            prompt = passkey_prompt(tokenizer, length, depth, key)
            answer = generate_text(model, tokenizer, prompt, max_new_tokens, temperature=0.0)
            answers.append(answer)
            correct += first_integer(answer) == key
        rows.append(dict(length=length, depth=depth, accuracy=correct / trials, trials=trials, answers=answers))
    return rows


def summarize(rows: list[dict]) -> dict:
    lengths = sorted({r["length"] for r in rows})
    per_length = {str(n): sum(r["accuracy"] for r in rows if r["length"] == n) / sum(r["length"] == n for r in rows)
                  for n in lengths}
    return dict(accuracy=sum(r["accuracy"] for r in rows) / len(rows), per_length=per_length, cells=rows)


def plot_heatmap(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows})
    accuracy = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
    grid = [[accuracy[n, d] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    context = model.max_seq_length - max_new_tokens
    lengths = lengths or [n for n in (256, 512, 1024, 2048, 4096) if n <= context]
    too_long = [n for n in lengths if n > context]
    if too_long:
        raise ValueError(f"Lengths {too_long} leave no room for {max_new_tokens} answer tokens in the model's"
                         f" context of {model.max_seq_length}.")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"Depths must lie in [0, 1], got {depths}.")
    result = summarize(run_grid(model, tokenizer, lengths, depths, trials, seed, max_new_tokens))
    output_dir = Path(output_dir) if output_dir is not None else Path(checkpoint_dir) / "passkey"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "passkey.json").write_text(json.dumps(result, indent=2))
    with open(output_dir / "passkey.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["length", "depth", "accuracy", "trials"])
        writer.writerows([r["length"], r["depth"], r["accuracy"], r["trials"]] for r in result["cells"])
    plot_heatmap(result["cells"], output_dir / "passkey.png", f"passkey retrieval: {model.config.name}")
    print(json.dumps({"accuracy": result["accuracy"], "per_length": result["per_length"]}, indent=2))
    print(f"Wrote {output_dir}/passkey.json, passkey.csv and passkey.png")
    return result


if __name__ == "__main__":
    run_cli(main)
