"""Training throughput and memory on a GPU: GPT-2 124M (the paper's model) at 1,024 tokens, vanilla and SSA, eager and
compiled (torch.compile of each block), bf16-mixed as the training scripts run it on a GPU: tokens/s, model FLOPs
utilisation against the GPU's dense bf16 peak, and peak memory; then bf16 decoding, tokens/s. scripts/gpu_check.sh
runs it; its table goes to benchmarks/results/.

    python benchmarks/gpu_train.py                                   # on a CUDA GPU, about three minutes
    python benchmarks/gpu_train.py --model debug --device cpu --micro_batch 2 --block 64 --steps 2   # a dry run
"""

import argparse
import time

import torch
from common import header, table

from lit_gpt import GPT, Config
from lit_gpt.config import find_multiple
from lit_gpt.generation import generate
from lit_gpt.training import micro_batch_flops

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a part of the device's name
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
             "RTX 4090": 165e12}


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for part, flops in PEAK_BF16.items() if part in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_row(config: Config, micro_batch: int, block: int, steps: int, compiled: bool, device: torch.device) -> list:
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if compiled:
        model.compile_blocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=True)
    x = torch.randint(0, config.vocab_size, (micro_batch, block + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    flops = micro_batch_flops(config, micro_batch, block)
    peak = bf16_peak(device)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return [config.attention_temperature, "compiled" if compiled else "eager", f"{micro_batch * block / seconds:,.0f}",
            f"{flops / seconds / 1e12:.1f}", f"{flops / seconds / peak:.1%}" if peak else "-", f"{memory:.1f}"]


def decode_row(config: Config, device: torch.device, new_tokens: int) -> list:
    torch.manual_seed(0)
    model = GPT(config).to(device, torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 128), device=device)
    torch.cat(list(generate(model, prompt, 8)), 1)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    torch.cat(list(generate(model, prompt, new_tokens)), 1)
    synchronize(device)
    return [config.attention_temperature, f"{new_tokens / (time.perf_counter() - started):,.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--micro_batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--no_compile", action="store_true", help="eager rows only")
    parser.add_argument("--pad_vocab", type=int, default=64,
                        help="pad the vocabulary to a multiple of this, as the GPT-2 pretraining recipes do (1: none)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA GPU is here (use --device cpu for a dry run).")
    rows, decoding = [], []
    for mode in ("none", "ssa"):
        vocab = Config.from_name(args.model).vocab_size
        config = Config.from_name(args.model, attention_temperature=mode, block_size=max(args.block, 256),
                                  padded_vocab_size=find_multiple(vocab, args.pad_vocab))
        for compiled in (False,) if args.no_compile else (False, True):
            rows.append(train_row(config, args.micro_batch, args.block, args.steps, compiled, device))
        decoding.append(decode_row(config, device, args.new_tokens))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(header(f"Training {args.model} on {name}: micro-batch {args.micro_batch} x {args.block} tokens, bf16-mixed,"
                 f" vocabulary padded to {config.padded_vocab_size:,}, {args.steps} timed steps after 3"))
    print(table(["attention", "form", "tokens/s", "TFLOP/s", "MFU (bf16 peak)", "peak memory, GiB"], rows))
    print(f"\nDecoding in bf16, batch 1, {args.new_tokens} new tokens after 128, greedy, KV cache:\n")
    print(table(["attention", "tokens/s"], decoding))


if __name__ == "__main__":
    main()
