"""GELU on the CPU: PyTorch hands it to oneDNN, which is slow on small tensors. Times F.gelu through oneDNN and
through PyTorch's own kernel by tensor size, and greedy decoding of pythia-70m (exact GELU in its MLP) with
lit_gpt.kernels.gelu against F.gelu everywhere, interleaved, each row keeping its fastest round.

    python benchmarks/gelu.py
    python benchmarks/gelu.py --new_tokens 16 --rounds 2         # a quick look
"""

import argparse
import time

import torch
import torch.nn.functional as F
from common import header, table

import lit_gpt.kernels as kernels
import lit_gpt.model
from lit_gpt import GPT, Config
from lit_gpt.generation import generate


def fastest(fn, rounds: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def op_rows(rounds: int) -> list[list]:
    rows = []
    for size in (576, 2048, 8192, 65536, 262144, 1048576):
        x = torch.randn(size)
        onednn = fastest(lambda x=x: F.gelu(x), rounds, 20)
        torch._C._set_mkldnn_enabled(False)
        try:
            own = fastest(lambda x=x: F.gelu(x), rounds, 20)
        finally:
            torch._C._set_mkldnn_enabled(True)
        rows.append([f"{size:,}", f"{onednn * 1e6:,.1f}", f"{own * 1e6:,.1f}",
                     "own" if size < kernels.ONEDNN_GELU_FROM else "oneDNN"])
    return rows


def decode_with(function, model: GPT, prompt: torch.Tensor, new_tokens: int):
    """Greedy decoding with `function` as the model's GELU."""

    def decode() -> None:
        lit_gpt.model.gelu = function
        try:
            torch.cat(list(generate(model, prompt, new_tokens)), 1)
        finally:
            lit_gpt.model.gelu = kernels.gelu

    return decode


def decode_rows(new_tokens: int, rounds: int) -> list[list]:
    torch.manual_seed(0)
    model = GPT(Config.from_name("pythia-70m")).eval()
    prompt = torch.randint(0, 50000, (1, 64))
    timers = {"F.gelu (oneDNN)": decode_with(F.gelu, model, prompt, new_tokens),
              "lit_gpt.kernels.gelu": decode_with(kernels.gelu, model, prompt, new_tokens)}
    best = dict.fromkeys(timers, float("inf"))
    for timer in timers.values():
        timer()
    for _ in range(rounds):
        for name, timer in timers.items():
            started = time.perf_counter()
            timer()
            best[name] = min(best[name], time.perf_counter() - started)
    base = best["F.gelu (oneDNN)"]
    return [[name, f"{new_tokens / seconds:,.1f}", f"{base / seconds:.2f}x"] for name, seconds in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(header("GELU on the CPU: oneDNN against PyTorch's own kernel; fastest of interleaved rounds"))
    print(table(["elements", "oneDNN, us", "PyTorch's own, us", "lit_gpt.kernels.gelu takes"], op_rows(args.rounds)))
    print(f"\nGreedy decoding, pythia-70m (random weights, float32), {args.new_tokens} tokens after 64:\n")
    print(table(["GELU", "tokens/s", "speed-up"], decode_rows(args.new_tokens, args.rounds)))


if __name__ == "__main__":
    main()
