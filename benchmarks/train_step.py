"""Training-step throughput (forward + backward + AdamW) against the matmul peak, side by side:
this project vanilla and with SSA (shared, separate), the reference approach (SSA on a materialised T x T attention
matrix, as the paper's code computes it), LitGPT (when installed) and Hugging Face GPTNeoXForCausalLM, all with the
same weights and the same tokens.

    python benchmarks/train_step.py                                  # pythia-14m and pythia-70m, 4 x 512 and 4 x 2048
    python benchmarks/train_step.py --models pythia-14m --lengths 512 --repeats 3
    python benchmarks/train_step.py --models pythia-14m --lengths 2048 --only vanilla "SSA (shared)" --rounds 3

With --rounds N the rows are measured N times, interleaved (vanilla, SSA, vanilla, SSA, ...), and the ratio to vanilla
is the median of the N per-round ratios with its range: on a noisy machine one pair of runs cannot resolve a few
percent.
"""
import argparse
import contextlib
import math
import statistics

import torch
import torch.nn.functional as F
from common import answer_child, header, matmul_gflops, measure_isolated, table, time_and_peak

import lit_gpt.model
from lit_gpt import GPT, Config
from lit_gpt.hf import hf_config_from_lit, hf_weights_from_lit
from lit_gpt.training import micro_batch_flops


def materialised_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, scale=None):
    """Attention through an explicit (B, nh, T, S) score matrix, as the reference SSA implementation does."""
    if enable_gqa:
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) * (scale or 1.0 / math.sqrt(q.size(-1)))
    if is_causal:
        attn_mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


@contextlib.contextmanager
def materialised_attention():
    original = lit_gpt.model.F.scaled_dot_product_attention
    lit_gpt.model.F.scaled_dot_product_attention = materialised_sdpa
    try:
        yield
    finally:
        lit_gpt.model.F.scaled_dot_product_attention = original


def ours(config: Config, state: dict):
    model = GPT(config)
    model.load_state_dict(state, strict=False)
    return model, lambda x: model(x, targets=x)


def litgpt_model(config: Config, state: dict):
    import litgpt

    model = litgpt.GPT(litgpt.Config.from_name(config.name, block_size=config.block_size))
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)
    return model, lambda x: F.cross_entropy(model(x).flatten(0, 1), x.flatten())


def hf_model(config: Config, state: dict):
    import transformers

    hf_config = transformers.GPTNeoXConfig(**{k: v for k, v in hf_config_from_lit(config).items()
                                              if k not in ("architectures", "model_type", "dtype")})
    model = transformers.GPTNeoXForCausalLM(hf_config)
    model.load_state_dict(dict(hf_weights_from_lit(config, state.items())), strict=False)
    model.config._attn_implementation = "sdpa"
    return model, lambda x: F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), x.flatten())


FUSED = "lit-gpt-ssa, vanilla, fused AdamW (as lit_gpt.training builds it)"


def implementations(name: str):
    base = Config.from_name(name)
    yield "lit-gpt-ssa, vanilla", lambda s: ours(base, s), contextlib.nullcontext
    yield FUSED, lambda s: ours(base, s), contextlib.nullcontext
    yield "lit-gpt-ssa, SSA (shared)", lambda s: ours(Config.from_name(name, attention_temperature="ssa"), s), \
        contextlib.nullcontext
    yield "lit-gpt-ssa, SSA (separate)", lambda s: ours(
        Config.from_name(name, attention_temperature="ssa", ssa_token_weights="separate"), s), contextlib.nullcontext
    yield "lit-gpt-ssa, gate (headwise)", lambda s: ours(Config.from_name(name, attention_gate="headwise"), s), \
        contextlib.nullcontext
    yield "lit-gpt-ssa, gate (elementwise)", lambda s: ours(Config.from_name(name, attention_gate="elementwise"), s), \
        contextlib.nullcontext
    yield "lit-gpt-ssa, selective attention", lambda s: ours(Config.from_name(name, selective_mask="leviathan"), s), \
        contextlib.nullcontext
    yield "reference: SSA on a materialised T x T", lambda s: ours(
        Config.from_name(name, attention_temperature="ssa"), s), materialised_attention
    try:
        import litgpt  # noqa: F401

        yield "LitGPT", lambda s: litgpt_model(base, s), contextlib.nullcontext
    except ImportError:
        print("(LitGPT is not installed: `pip install litgpt` in the benchmark environment to compare with it)")
    yield "Hugging Face GPTNeoXForCausalLM", lambda s: hf_model(base, s), contextlib.nullcontext


def measure(name: str, label: str, batch: int, length: int, repeats: int) -> dict:
    """One row, in its own process: median step time and the peak memory of the steps."""
    torch.manual_seed(0)
    config = Config.from_name(name)
    state = GPT(config).state_dict()
    x = torch.randint(0, config.vocab_size, (batch, length))
    build, context = next((b, c) for lbl, b, c in implementations(name) if lbl == label)
    torch.manual_seed(0)
    model, loss_of = build(state)
    # every row steps the same plain AdamW, except the one with the fused kernel our training scripts use
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if label == FUSED else None)

    def step():
        with context():
            loss_of(x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_and_peak(step, repeats)


def benchmark(name: str, batch: int, length: int, repeats: int, peak: float, only: list[str] | None = None,
              rounds: int = 1) -> str:
    config = Config.from_name(name)
    flops = micro_batch_flops(config, batch, length)  # of the vanilla model: the MFU numerator for every row
    labels = [label for label, _, _ in implementations(name)
              if label.endswith("vanilla") or not only or any(o in label for o in only)]
    results = {label: [] for label in labels}
    for _ in range(rounds):  # interleaved: a drift of the machine's speed hits every row alike
        for label in labels:
            results[label].append(measure_isolated(__file__, repeats, name=name, label=label, batch=batch,
                                                   length=length))
    reference = results[labels[0]]
    rows = []
    for label, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        ratios = [r["seconds"] / v["seconds"] for r, v in zip(runs, reference)]
        spread = f" ({min(ratios):.3f}-{max(ratios):.3f})" if rounds > 1 else ""
        rows.append([label, f"{batch * length / seconds:,.0f}", f"{seconds:.2f}", f"{flops / seconds / 1e9 / peak:.0%}",
                     f"{statistics.median(ratios):.3f}{spread}", resolution(ratios) if label != labels[0] else "-",
                     f"{runs[0]['peak_mb']:,.0f}", f"{runs[0]['peak_mb'] / reference[0]['peak_mb']:.3f}"])
    title = (f"{name}, batch {batch} x {length} tokens, float32, median of {repeats} steps"
             + (f", {rounds} interleaved rounds" if rounds > 1 else ""))
    ratio_head = "time / vanilla" + (" (median of rounds, range)" if rounds > 1 else "")
    return f"**{title}**\n\n" + table(["implementation", "tokens/s", "step (s)", "MFU vs matmul peak", ratio_head,
                                        f"against {TOLERANCE:.2f}x (middle half of rounds)",
                                        "peak memory of a step (MiB)", "memory / vanilla"], rows)


TOLERANCE = 1.03  # the step-time ratio to vanilla that SSA should stay within


def resolution(ratios: list[float]) -> str:
    """Whether the rounds resolve the ratio against TOLERANCE: the middle half of the per-round ratios (quartiles)
    lies below it, above it, or across it (then the spread is larger than the effect)."""
    if len(ratios) < 4:
        return "too few rounds (use --rounds 4 or more)"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    if q3 <= TOLERANCE:
        return f"within ({q1:.3f}-{q3:.3f})"
    if q1 > TOLERANCE:
        return f"above ({q1:.3f}-{q3:.3f})"
    return f"not resolved: {q1:.3f}-{q3:.3f} spans it"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["pythia-14m", "pythia-70m"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", help="rows whose name contains one of these (vanilla is always run)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if answer_child(args.child, measure):
        return
    peak = matmul_gflops()
    print(header("Training step: forward + backward + AdamW"))
    print(f"Matmul peak (2048 x 2048, float32): {peak:.1f} GFLOP/s. Each row runs in its own processes; memory is the"
          " peak resident memory during a step above the resident memory before it (model, gradients and optimizer"
          " state already allocated), measured with large allocations returned to the system at once.\n")
    for name in args.models:
        for length in args.lengths:
            print(benchmark(name, args.batch, length, args.repeats, peak, args.only, args.rounds) + "\n", flush=True)


if __name__ == "__main__":
    main()
