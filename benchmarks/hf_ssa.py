"""What SSA (lit_gpt.hf_ssa.add_ssa) and selective attention (add_selective) cost inside transformers against the same
transformers model without them: a training step (forward, backward, AdamW) and cached greedy decoding, with
SmolLM2-135M's architecture (random weights, float32, transformers' sdpa attention).

    python benchmarks/hf_ssa.py                                   # SmolLM2-135M, 1 x 512 tokens, 64 new tokens
    python benchmarks/hf_ssa.py --layers 4 --length 128 --new_tokens 16 --rounds 2    # a quick look

The rows are measured in interleaved rounds (vanilla, SSA, selective, vanilla, ...) and each keeps its fastest round:
on a busy machine another process only ever slows a timing down. The ratio is a row's time over vanilla's.
"""

import argparse
import time

import torch
from common import header, table

from lit_gpt.hf_ssa import add_selective, add_ssa


def smollm2(layers: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def step_timer(model, ids: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state, the first call's set-up
    return step


def decode_timer(model, prompt: torch.Tensor, new_tokens: int):
    def decode() -> None:
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)

    decode()
    return decode


def fastest(timers: dict, rounds: int) -> dict:
    best = dict.fromkeys(timers, float("inf"))
    for _ in range(rounds):
        for name, timer in timers.items():
            started = time.perf_counter()
            timer()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2-135M has 30")
    parser.add_argument("--length", type=int, default=512, help="tokens in the training step's sequence")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    models = {"vanilla": smollm2(args.layers), "SSA": add_ssa(smollm2(args.layers)),
              "selective": add_selective(smollm2(args.layers))}
    ids = torch.randint(0, 49152, (1, args.length))
    train = fastest({name: step_timer(model.train(), ids) for name, model in models.items()}, args.rounds)
    prompt = ids[:, :128]
    decode = fastest({name: decode_timer(model.eval(), prompt, args.new_tokens) for name, model in models.items()},
                     args.rounds)
    rows = [[name, f"{train[name] * 1000:,.0f}", f"{train[name] / train['vanilla']:.3f}",
             f"{args.new_tokens / decode[name]:,.1f}", f"{decode[name] / decode['vanilla']:.3f}"] for name in models]
    print(header(f"SmolLM2-135M's architecture with {args.layers} layers in transformers, float32: a training step of"
                 f" 1 x {args.length} tokens, and {args.new_tokens} greedy tokens after 128; fastest of"
                 f" {args.rounds} interleaved rounds"))
    print(table(["attention", "step, ms", "step time / vanilla", "decoding, tokens/s", "decoding time / vanilla"],
                rows))


if __name__ == "__main__":
    main()
