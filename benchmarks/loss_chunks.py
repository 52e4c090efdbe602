"""The fused loss's chunk size on the CPU: a training step (forward + backward + fused AdamW) of one model with
`lit_gpt.kernels.LOSS_CHUNK_ELEMENTS["cpu"]` set to each size, interleaved over rounds. The chunk holds that many
float32 logits (its rows are the size over the vocabulary); the default is 2**22 (16 MB).

    python benchmarks/loss_chunks.py
    python benchmarks/loss_chunks.py --model pythia-14m --exponents 20 22 24 --rounds 5
"""

import argparse
import statistics
import time

import torch
from common import header, table

import lit_gpt.kernels as kernels
from lit_gpt import GPT, Config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pythia-70m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--exponents", nargs="+", type=int, default=[22, 24, 26], help="chunk sizes, as powers of 2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per size and round")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Config.from_name(args.model)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.length + 1))

    def step() -> None:
        model(idx[:, :-1], targets=idx[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    default = kernels.LOSS_CHUNK_ELEMENTS["cpu"]
    times: dict[int, list[float]] = {e: [] for e in args.exponents}
    rows: dict[int, int] = {}
    try:
        for _ in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every size
            for exponent in args.exponents:
                kernels.LOSS_CHUNK_ELEMENTS["cpu"] = 2**exponent
                rows[exponent] = kernels.loss_chunk_rows(config.padded_vocab_size, torch.device("cpu"))
                step()  # the first step at a size allocates its buffers
                for _ in range(args.steps):
                    started = time.perf_counter()
                    step()
                    times[exponent].append(time.perf_counter() - started)
    finally:
        kernels.LOSS_CHUNK_ELEMENTS["cpu"] = default
    base = statistics.median(times[args.exponents[0]])
    print(header(f"The fused loss's chunk size: {args.model}, batch {args.batch} x {args.length} tokens, float32"))
    print(table(["chunk (float32 logits)", "rows of the output layer per chunk", "step (s), median", "fastest",
                 f"time / 2^{args.exponents[0]}'s"],
                [[f"2^{e} ({2**e * 4 / 2**20:,.0f} MB)" + (" (default)" if 2**e == default else ""),
                  f"{rows[e]:,}",
                  f"{statistics.median(t):.3f}", f"{min(t):.3f}", f"{statistics.median(t) / base:.3f}"]
                 for e, t in times.items()]))
    print(f"\n{args.rounds} interleaved rounds of {args.steps} timed steps per size, each size after one untimed step.")


if __name__ == "__main__":
    main()
