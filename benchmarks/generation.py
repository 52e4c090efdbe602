"""Generation speed: tokens/s for 128 new tokens after a 128-token prompt, batch 1, greedy, with the KV cache;
this project (vanilla and SSA) against LitGPT (when installed) and Hugging Face `generate`, same weights.

    python benchmarks/generation.py
    python benchmarks/generation.py --model pythia-160m --new_tokens 64
"""

import argparse
import os
import statistics
import time
from unittest import mock

import torch
from common import header, median_seconds, table

from lit_gpt import GPT, Config
from lit_gpt.generation import generate
from lit_gpt.hf import hf_config_from_lit, hf_weights_from_lit
from lit_gpt.kernels import LINEAR_PATH_VARIABLE, faster_linear_path, use_onednn_linear


def ours(config: Config, state: dict, prompt: torch.Tensor, new_tokens: int, linear: str | None = None):
    """`linear`: None measures which linear path is faster here, as the tools do (load_for_inference); "onednn" or
    "torch" takes that one."""
    model = GPT(config).eval()
    model.load_state_dict(state, strict=False)
    with mock.patch.dict(os.environ, {LINEAR_PATH_VARIABLE: linear} if linear else {}):
        use_onednn_linear(model)
    return lambda: torch.cat(list(generate(model, prompt, new_tokens)), dim=1)


def weight_bytes_per_token(config: Config) -> int:
    """Bytes of weights one decoding step reads: every parameter but the embedding table (of which it reads one row),
    the output layer included even when it is tied to the embedding."""
    with torch.device("meta"):
        model = GPT(config)
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    if not config.tie_embeddings:
        total -= model.transformer.wte.weight.numel() * model.transformer.wte.weight.element_size()
    return total


def read_bandwidth_gbs(megabytes: int = 512) -> float:
    """How fast this machine streams memory into the cores: a sum over a buffer far larger than the caches."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    seconds = median_seconds(lambda: buffer.sum(), 5, warmup=2)
    return buffer.numel() * 4 / seconds / 1e9


def litgpt_generate(config: Config, state: dict, prompt: torch.Tensor, new_tokens: int):
    import litgpt
    from litgpt.generate.base import generate as litgpt_gen

    model = litgpt.GPT(litgpt.Config.from_name(config.name, block_size=config.block_size)).eval()
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)
    model.max_seq_length = prompt.size(1) + new_tokens
    model.set_kv_cache(batch_size=1)

    def run():
        model.clear_kv_cache()
        model.set_kv_cache(batch_size=1)
        with torch.inference_mode():
            return litgpt_gen(model, prompt[0], prompt.size(1) + new_tokens, temperature=0.0, include_prompt=False)

    return run


def hf_generate(config: Config, state: dict, prompt: torch.Tensor, new_tokens: int):
    import transformers

    values = {k: v for k, v in hf_config_from_lit(config).items() if k not in ("architectures", "model_type", "dtype")}
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**values)).eval()
    model.load_state_dict(dict(hf_weights_from_lit(config, state.items())), strict=False)

    def run():
        with torch.inference_mode():
            return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pythia-70m")
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Config.from_name(args.model)
    state = GPT(config).state_dict()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    rows = [("lit-gpt-ssa, vanilla", ours(config, state, prompt, args.new_tokens)),
            ("lit-gpt-ssa, SSA", ours(Config.from_name(args.model, attention_temperature="ssa"), state, prompt,
                                      args.new_tokens)),
            ("lit-gpt-ssa, gate (headwise)", ours(Config.from_name(args.model, attention_gate="headwise"), state,
                                                  prompt, args.new_tokens)),
            ("lit-gpt-ssa, selective attention", ours(Config.from_name(args.model, selective_mask="leviathan"), state,
                                                      prompt, args.new_tokens)),
            ("lit-gpt-ssa, vanilla, oneDNN's linear", ours(config, state, prompt, args.new_tokens, "onednn")),
            ("lit-gpt-ssa, vanilla, PyTorch's linear", ours(config, state, prompt, args.new_tokens, "torch"))]
    try:
        rows.append(("LitGPT", litgpt_generate(config, state, prompt, args.new_tokens)))
    except ImportError:
        print("(LitGPT is not installed: `pip install litgpt` in the benchmark environment to compare with it)")
    rows.append(("Hugging Face generate", hf_generate(config, state, prompt, args.new_tokens)))
    print(header(f"Generation: {args.model}, {args.new_tokens} new tokens after {args.prompt_tokens}, batch 1,"
                 " greedy, KV cache"))
    # interleaved: every implementation once per round, so that a slow spell of a shared machine hits all of them;
    # each row's time is its median over the rounds, and its ratio to the first row the median of per-round ratios
    for _, run in rows:
        run()  # warm-up
    rounds: dict[str, list[float]] = {label: [] for label, _ in rows}
    for i in range(args.repeats):  # each round starts one row further on, so that no row always runs first
        for label, run in rows[i % len(rows):] + rows[: i % len(rows)]:
            start = time.perf_counter()
            run()
            rounds[label].append(time.perf_counter() - start)
    base_label = rows[0][0]
    results = [(label, statistics.median(times)) for label, times in rounds.items()]
    ratios = {label: sorted(t / b for t, b in zip(times, rounds[base_label])) for label, times in rounds.items()}
    per_token = weight_bytes_per_token(config)
    litgpt = dict(results).get("LitGPT")
    print(table(["implementation", "tokens/s", "ms / token", "weights read / token", "GB/s of weights",
                 "time / vanilla's, median of rounds (range)", "tokens/s / LitGPT's"],
                [[label, f"{args.new_tokens / s:.1f}", f"{1e3 * s / args.new_tokens:.2f}", f"{per_token / 1e6:.0f} MB",
                  f"{per_token * args.new_tokens / s / 1e9:.1f}",
                  f"{statistics.median(ratios[label]):.3f} ({ratios[label][0]:.3f}-{ratios[label][-1]:.3f})",
                  f"{litgpt / s:.2f}x" if litgpt else "-"] for label, s in results]))
    largest = max((m.weight for m in GPT(config).modules() if type(m) is torch.nn.Linear), key=torch.Tensor.numel)
    print(f"\n{args.repeats} interleaved rounds, each starting one row further on, after one warm-up run of each. The"
          " first four rows take the linear path that a measurement at load found faster on this machine:"
          f" {faster_linear_path(largest.detach())}.")
    print(f"\nThis machine streams memory at {read_bandwidth_gbs():.1f} GB/s (a sum over 512 MB,"
          f" {torch.get_num_threads()} threads); ms / token includes the prompt's prefill spread over the new tokens.")


if __name__ == "__main__":
    main()
