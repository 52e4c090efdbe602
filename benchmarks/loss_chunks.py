"""The fused loss's sizes on the CPU: a training step (forward + backward + fused AdamW) of one model with
`lit_gpt.kernels.LOSS_CHUNK_ELEMENTS["cpu"]` (float32 logits whose softmax is taken at a time) and
`LOSS_BUFFER_BYTES` (logits one matrix product computes) set to each pair, interleaved over rounds. A buffer no
larger than one chunk is the loss as it was before 2026-12-07: three products with the whole output layer per chunk.

    python benchmarks/loss_chunks.py
    python benchmarks/loss_chunks.py --model pythia-14m --settings 22:24 20:28 --rounds 5
    python benchmarks/loss_chunks.py --precision bf16-mixed   # the products in bf16 (the buffer's bytes hold 2x rows)
"""

import argparse
import statistics
import time

import torch
from common import header, table

import lit_gpt.kernels as kernels
from lit_gpt import GPT, Config


def setting(text: str) -> tuple[int, int]:
    chunk, _, buffer = text.partition(":")
    return int(chunk), int(buffer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pythia-70m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--settings", nargs="+", type=setting,
                        default=[(22, 24), (26, 28), (22, 28), (20, 28), (18, 28)],
                        help="CHUNK:BUFFER, each a power of 2: the chunk in float32 logits, the buffer in bytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting and round")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Config.from_name(args.model)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.length + 1))
    cpu, vocab = torch.device("cpu"), config.padded_vocab_size

    mixed = args.precision == "bf16-mixed"  # products in bf16, as Fabric's bf16-mixed runs them
    dtype = torch.bfloat16 if mixed else torch.float32

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    default = (kernels.LOSS_CHUNK_ELEMENTS["cpu"], kernels.LOSS_BUFFER_BYTES)
    times: dict[tuple[int, int], list[float]] = {s: [] for s in args.settings}
    rows: dict[tuple[int, int], tuple[int, int]] = {}
    try:
        for _ in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every setting
            for chunk, buffer in args.settings:
                kernels.LOSS_CHUNK_ELEMENTS["cpu"], kernels.LOSS_BUFFER_BYTES = 2**chunk, 2**buffer
                rows[chunk, buffer] = (kernels.loss_chunk_rows(vocab, cpu),
                                       kernels.loss_buffer_rows(vocab, cpu, dtype))
                step()  # the first step of a setting allocates its buffers
                for _ in range(args.steps):
                    started = time.perf_counter()
                    step()
                    times[chunk, buffer].append(time.perf_counter() - started)
    finally:
        kernels.LOSS_CHUNK_ELEMENTS["cpu"], kernels.LOSS_BUFFER_BYTES = default
    first = args.settings[0]
    base = statistics.median(times[first])
    tokens = args.batch * args.length
    print(header(f"The fused loss's sizes: {args.model}, batch {args.batch} x {args.length} tokens, {args.precision}"))
    print(table(["softmax chunk (float32 logits)", "rows per chunk", "buffer", "rows per product",
                 "products per step", "step (s), median", "fastest", f"time / {first[0]}:{first[1]}'s"],
                [[f"2^{c} ({2**c * 4 / 2**20:,g} MB)", f"{rows[c, b][0]:,}",
                  f"2^{b} bytes ({2**b / 2**20:,g} MB)" + (" (default)" if (2**c, 2**b) == default else ""),
                  f"{rows[c, b][1]:,}", f"{-(-tokens // rows[c, b][1]):,}",
                  f"{statistics.median(t):.3f}", f"{min(t):.3f}", f"{statistics.median(t) / base:.3f}"]
                 for (c, b), t in times.items()]))
    print(f"\n{args.rounds} interleaved rounds of {args.steps} timed steps per setting, each after one untimed step."
          " Each of the three products passes over the whole output layer once per buffer.")


if __name__ == "__main__":
    main()
