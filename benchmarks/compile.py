"""What --compile (torch.compile of the transformer blocks) costs and gains: the compilation time and the steady-state
time, for a training step and for generation, each against the same model without it, measured in one run.

    python benchmarks/compile.py
    python benchmarks/compile.py --train_model pythia-14m --train_length 512 --generate_model pythia-70m
"""

import argparse
import statistics
import time

import torch
from common import header, table

from lit_gpt import GPT, Config
from lit_gpt.generation import generate
from lit_gpt.kernels import use_onednn_linear
from lit_gpt.training import TrainArgs, build_optimizer


def timings(step, steps: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the next `steps`)."""
    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return first, statistics.median(times)


def training(name: str, length: int, batch: int, compiled: bool, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT(Config.from_name(name, attention_temperature="ssa"))
    optimizer = build_optimizer(model, TrainArgs(learning_rate=1e-4))
    if compiled:
        model.compile_blocks()
    x = torch.randint(0, model.config.vocab_size, (batch, length))

    def step():
        model(x, targets=x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timings(step, steps)


def generation(name: str, new_tokens: int, compiled: bool, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = use_onednn_linear(GPT(Config.from_name(name, attention_temperature="ssa")).eval())
    if compiled:
        model.compile_blocks()
    prompt = torch.randint(0, model.config.vocab_size, (1, 128))
    return timings(lambda: list(generate(model, prompt, new_tokens)), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_model", default="pythia-14m")
    parser.add_argument("--train_length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--generate_model", default="pythia-70m")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for what, run in [
        (f"training step, {args.train_model} with SSA, {args.batch} x {args.train_length}",
         lambda compiled: training(args.train_model, args.train_length, args.batch, compiled, args.steps)),
        (f"generation, {args.generate_model} with SSA, {args.new_tokens} tokens after 128",
         lambda compiled: generation(args.generate_model, args.new_tokens, compiled, args.steps)),
    ]:
        eager_first, eager = run(False)
        compiled_first, compiled = run(True)
        cost = compiled_first - compiled
        repaid = f"{cost / (eager - compiled):.0f}" if eager > compiled else "never"
        rows.append([what, f"{eager:.3f}", f"{compiled:.3f}", f"{eager / compiled:.2f}x", f"{cost:.1f}", repaid])
    print(header("torch.compile of the transformer blocks (--compile)"))
    print(table(["path", "eager s", "compiled s", "speed-up", "compilation s", "calls to repay it"], rows))


if __name__ == "__main__":
    main()
