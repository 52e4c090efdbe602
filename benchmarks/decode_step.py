"""One decoded token's time with the KV cache, SSA against vanilla: pythia-70m (random weights, the same backbone),
batch 1, after a 128-token prompt, interleaved rounds of 64 steps each; and the ATen operators one step launches
(torch.profiler's count: exact, the same on every machine). `--compare_with` adds the SSA of another checkout of
this repository (for example a commit before a change, `git worktree add /tmp/old <commit>`).

    python benchmarks/decode_step.py --rounds 11
    python benchmarks/decode_step.py --rounds 11 --compare_with /tmp/old
"""

import argparse
import importlib
import statistics
import sys
import time

import torch
from common import header, table
from torch.profiler import profile


def lit_gpt_from(folder: str | None):
    """The lit_gpt package of this checkout (None) or of another one."""
    for name in [n for n in sys.modules if n == "lit_gpt" or n.startswith("lit_gpt.")]:
        del sys.modules[name]
    if folder is not None:
        sys.path.insert(0, folder)
    try:
        return importlib.import_module("lit_gpt"), importlib.import_module("lit_gpt.kernels")
    finally:
        if folder is not None:
            sys.path.remove(folder)


def build(package, kernels, **fields):
    return kernels.use_onednn_linear(package.GPT(package.Config.from_name("pythia-70m", **fields)).eval())


def decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    with torch.inference_mode():
        model.set_kv_cache(1, prompt.size(1) + steps)
        model(prompt, input_pos=torch.arange(prompt.size(1)), only_last=True)
        token, start = prompt[:, :1], time.perf_counter()
        for i in range(steps):
            model(token, input_pos=torch.tensor([prompt.size(1) + i]))
        seconds = (time.perf_counter() - start) / steps
        model.clear_kv_cache()
    return seconds


def operators_per_step(model, prompt: torch.Tensor) -> int:
    with torch.inference_mode():
        model.set_kv_cache(1, prompt.size(1) + 2)
        model(prompt, input_pos=torch.arange(prompt.size(1)), only_last=True)
        with profile() as prof:
            model(prompt[:, :1], input_pos=torch.tensor([prompt.size(1)]))
        model.clear_kv_cache()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--compare_with", default=None, help="another checkout whose SSA to time as well")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(0, 50000, (1, 128))
    package, kernels = lit_gpt_from(None)
    models = {"vanilla": build(package, kernels), "SSA": build(package, kernels, attention_temperature="ssa")}
    if args.compare_with:
        other, other_kernels = lit_gpt_from(args.compare_with)
        assert other.__file__.startswith(args.compare_with), other.__file__
        models[f"SSA of {args.compare_with}"] = build(other, other_kernels, attention_temperature="ssa")
    state = models["vanilla"].state_dict()
    for model in list(models.values())[1:]:
        model.load_state_dict(state, strict=False)  # the same backbone; SSA's temperatures at their start
    for model in models.values():
        decode_seconds(model, prompt, 8)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(decode_seconds(model, prompt, args.steps))
    print(header(f"One decoded token: pythia-70m, batch 1, after 128 tokens, {args.rounds} interleaved rounds of"
                 f" {args.steps} steps"))
    rows = []
    for name, model in models.items():
        ratios = sorted(t / v for t, v in zip(times[name], times["vanilla"]))
        rows.append([name, f"{statistics.median(times[name]) * 1e3:.2f}", f"{statistics.median(ratios):.3f}",
                     f"{ratios[0]:.3f}-{ratios[-1]:.3f}", f"{operators_per_step(model, prompt):,}"])
    print(table(["model", "ms / token (median)", "/ vanilla (median of rounds)", "range of rounds",
                 "ATen operators / step"], rows))
    print(f"\nThreads: {torch.get_num_threads()}. Times vary with the machine and its load (the rounds' range says"
          " how much here); the operator counts are exact.")


if __name__ == "__main__":
    main()
