"""Where a training step's time goes: torch.profiler over forward + backward + AdamW of this project's model,
grouped into the parts that explain the MFU the train_step benchmark reports.

    python benchmarks/profile_step.py                                # pythia-14m and pythia-70m, 4 x 512, vanilla
    python benchmarks/profile_step.py --models pythia-70m --length 2048 --attention_temperature ssa
    python benchmarks/profile_step.py --precision 32-true bf16-mixed  # each, then the step times side by side

bf16-mixed is what Fabric runs under `--precision bf16-mixed`: the forward under torch.autocast(bfloat16), float32
weights and optimizer.
"""

import argparse
from collections import defaultdict

import torch
from common import header, median_seconds, table
from torch.profiler import ProfilerActivity, profile, record_function

from lit_gpt import GPT, Config
from lit_gpt.fabric import bf16_speedup

# aten operator name -> the part of the step it belongs to (the first matching prefix wins)
GROUPS = [
    ("matrix multiplies (linear layers, output layer)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                                                          "aten::linear", "aten::baddbmm")),
    ("attention kernel (SDPA forward and backward)", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("cross-entropy pieces (log-softmax, gather, exp)", ("aten::_log_softmax", "aten::log_softmax", "aten::exp",
                                                        "aten::gather", "aten::logsumexp", "aten::nll_loss")),
    ("optimizer kernels (foreach or fused AdamW)", ("aten::_foreach", "aten::_fused_adamw")),
    ("elementwise and normalisation", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::gelu",
                                       "aten::native_layer_norm", "aten::silu", "aten::tanh", "aten::sigmoid",
                                       "aten::rsqrt", "aten::pow", "aten::mean", "aten::sum", "aten::neg",
                                       "aten::cat", "aten::where", "aten::masked_fill", "aten::clamp")),
    ("copies and layout (copy_, clone, contiguous, transposes)", ("aten::copy_", "aten::clone", "aten::contiguous",
                                                                  "aten::_to_copy", "aten::to", "aten::t",
                                                                  "aten::transpose", "aten::view", "aten::reshape",
                                                                  "aten::permute", "aten::expand", "aten::slice",
                                                                  "aten::select", "aten::empty", "aten::zeros",
                                                                  "aten::fill_", "aten::zero_")),
]


ORDER = ["forward (with the loss)", "backward", "optimizer"]


def group_of(name: str) -> str:
    base = name.split(".")[0]
    for group, prefixes in GROUPS:
        if base.startswith(prefixes):
            return group
    return "other operators"


def profile_step(name: str, length: int, batch: int, attention_temperature: str, precision: str = "32-true",
                 timed_steps: int = 3) -> tuple[str, float]:
    """The profile's tables, and the median time of `timed_steps` unprofiled steps (seconds)."""
    torch.manual_seed(0)
    model = GPT(Config.from_name(name, block_size=max(length, Config.from_name(name).block_size),
                                 attention_temperature=attention_temperature))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as lit_gpt.training builds it
    x = torch.randint(0, model.config.vocab_size, (batch, length))

    def step():
        with record_function("phase: forward (with the loss)"), torch.autocast(
                "cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model(x, targets=x)
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, optimizer state
    seconds = median_seconds(step, timed_steps, warmup=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    self_us, phases = defaultdict(float), []
    for event in prof.key_averages():
        if event.key.startswith("phase: "):
            phases.append([event.key.removeprefix("phase: "), f"{event.cpu_time_total / 1e3:,.0f}"])
        else:
            self_us[group_of(event.key)] += event.self_cpu_time_total
    total = sum(self_us.values())
    rows = [[group, f"{us / 1e3:,.0f}", f"{us / total:.0%}"]
            for group, us in sorted(self_us.items(), key=lambda kv: -kv[1])]
    top = sorted((e for e in prof.key_averages() if not e.key.startswith("phase: ")),
                 key=lambda e: -e.self_cpu_time_total)[:8]
    top_rows = [[f"`{e.key}`", f"{e.self_cpu_time_total / 1e3:,.0f}", f"{e.self_cpu_time_total / total:.0%}"]
                for e in top]
    return (f"**{name}, batch {batch} x {length} tokens, attention_temperature={attention_temperature}, {precision}:"
            f" {seconds:.2f} s per step (median of {timed_steps}, unprofiled)**\n\n"
            + table(["phase", "CPU time (ms)"], sorted(phases, key=lambda row: ORDER.index(row[0]))) + "\n\n"
            + table(["kind of operator", "self CPU time (ms)", "share"], rows) + "\n\nThe operators that take most:\n\n"
            + table(["operator", "self CPU time (ms)", "share"], top_rows) + "\n"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pythia-14m", "pythia-70m"])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--attention_temperature", default="none")
    parser.add_argument("--precision", nargs="+", default=["32-true"], choices=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    print(header(f"Profile of one training step (forward + backward + AdamW), {', '.join(args.precision)}"))
    print("Self CPU time per operator, summed by part of the step (torch.profiler; one step after a warm-up step)."
          " The fused loss computes the output layer's gradient during the forward pass, so the forward phase holds"
          " that part of the backward work.\n")
    times = {}
    for name in args.models:
        for precision in args.precision:
            text, times[name, precision] = profile_step(name, args.length, args.batch, args.attention_temperature,
                                                        precision)
            print(text)
    if len(args.precision) > 1:
        first, last = args.precision[0], args.precision[-1]
        print(table(["model", *[f"{p} s / step" for p in args.precision], f"{first} / {last}"],
                    [[name, *[f"{times[name, p]:.2f}" for p in args.precision],
                      f"{times[name, args.precision[0]] / times[name, args.precision[-1]]:.2f}x"]
                     for name in args.models]))
        print(f"\nbf16 matrix products run {bf16_speedup():.1f}x as fast as float32 here (the --precision auto probe).")


if __name__ == "__main__":
    main()
