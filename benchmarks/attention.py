"""Attention alone, forward + backward: time and peak memory of vanilla attention, SSA as this project computes it
(temperatures applied to q and v before scaled_dot_product_attention) and the reference approach (SSA on a
materialised T x T score matrix), for one pythia-70m-sized attention layer.

    python benchmarks/attention.py
    python benchmarks/attention.py --lengths 512 2048 --batch 1
"""

import argparse
import contextlib
import sys

import torch
from common import answer_child, header, measure_isolated, table, time_and_peak
from train_step import materialised_attention

from lit_gpt import Config
from lit_gpt.model import CausalSelfAttention, build_rope_cache

VARIANTS = {
    "vanilla (SDPA)": ("none", False),
    "SSA, this project (SDPA on scaled q, v)": ("ssa", False),
    "SSA, reference (materialised T x T)": ("ssa", True),
}


def measure(variant: str, batch: int, length: int, repeats: int) -> dict:
    mode, materialised = VARIANTS[variant]
    torch.manual_seed(0)
    config = Config.from_name("pythia-70m", attention_temperature=mode, block_size=max(2048, length))
    attention = CausalSelfAttention(config)
    cos, sin = build_rope_cache(length, config, torch.device("cpu"))
    positions = torch.arange(length)
    x = torch.randn(batch, length, config.n_embd, requires_grad=True)

    def step():
        with materialised_attention() if materialised else contextlib.nullcontext():
            attention(x, cos, sin, positions, positions).sum().backward()
        attention.zero_grad(set_to_none=True)
        x.grad = None

    return time_and_peak(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if answer_child(args.child, measure):
        return
    print(header("Attention alone: forward + backward of one layer (pythia-70m: 8 heads of 64)"))
    print(f"Batch {args.batch}, float32, median of {args.repeats}; each cell in its own processes, memory measured"
          " with large allocations returned to the system at once.\n")
    rows = []
    for length in args.lengths:
        base = None
        for variant in VARIANTS:
            kwargs = dict(variant=variant, batch=args.batch, length=length)
            result = measure_isolated(__file__, args.repeats, **kwargs)
            seconds, peak = result["seconds"], result["peak_mb"]
            base = base or (seconds, peak)
            rows.append([length, variant, f"{seconds * 1000:.1f}", f"{seconds / base[0]:.3f}", f"{peak:,.0f}",
                         f"{peak / base[1]:.2f}"])
            print(f"  measured T={length}: {variant}", file=sys.stderr, flush=True)
    print()
    print(table(["T", "attention", "time (ms)", "time / vanilla", "peak memory (MiB)", "memory / vanilla"], rows))


if __name__ == "__main__":
    main()
