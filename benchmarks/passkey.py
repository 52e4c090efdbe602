"""Passkey evaluation time: the same prompts (the passkey template at each length, the key in the middle), greedy,
8 answer tokens, batch 1; this project as eval/passkey.py runs it, this project computing the prompt's logits at
every position (as it did before only the last position's were computed), and Hugging Face `generate`, same
weights (random: the time does not depend on them).

    python benchmarks/passkey.py                                   # SmolLM2-135M at 512 and 2,048 tokens
    python benchmarks/passkey.py --model pythia-70m --lengths 256 1024
"""

import argparse

import torch
from common import header, median_seconds, table

from lit_gpt import GPT, Config
from lit_gpt.data.prepare import GPT2_TOKENIZER
from lit_gpt.evaluation import passkey_prompt
from lit_gpt.generation import generate
from lit_gpt.hf import hf_config_from_lit, hf_weights_from_lit
from lit_gpt.kernels import use_onednn_linear
from lit_gpt.tokenizer import Tokenizer


class EveryPositionLogits(torch.nn.Module):
    """The model with `only_last` ignored: the output layer runs over every prompt position, then the last is kept."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model, self.max_seq_length = model, model.max_seq_length

    def forward(self, idx, input_pos=None, only_last=False):
        logits = self.model(idx, input_pos=input_pos)
        return logits[:, -1:] if only_last else logits

    def set_kv_cache(self, *args, **kwargs):
        return self.model.set_kv_cache(*args, **kwargs)

    def clear_kv_cache(self):
        return self.model.clear_kv_cache()


def hf_model(config: Config, state: dict):
    import transformers

    hf = hf_config_from_lit(config)
    kind = {"GPTNeoXForCausalLM": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
            "LlamaForCausalLM": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[hf["architectures"][0]]
    values = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "dtype")}
    model = kind[1](kind[0](**values)).eval()
    model.load_state_dict(dict(hf_weights_from_lit(config, state.items())), strict=False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--new_tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = Tokenizer(GPT2_TOKENIZER)
    config = Config.from_name(args.model, vocab_size=max(tokenizer.vocab_size, 50257))
    plain = GPT(config).eval()
    state = plain.state_dict()
    fast = GPT(config).eval()
    fast.load_state_dict(state)
    use_onednn_linear(fast)  # as eval/passkey.py loads it
    hf = hf_model(config, state)
    rows = []
    for length in args.lengths:
        ids = tokenizer.encode(passkey_prompt(tokenizer, length, 0.5, 12345)).unsqueeze(0)

        def ours(model, ids=ids):
            return lambda: torch.cat(list(generate(model, ids, args.new_tokens)), 1)

        def theirs(ids=ids):
            with torch.inference_mode():
                return hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False, pad_token_id=0)

        times = {label: median_seconds(run, args.repeats) for label, run in [
            ("lit-gpt-ssa (eval/passkey.py)", ours(fast)),
            ("lit-gpt-ssa before: PyTorch linear, logits at every prompt position", ours(EveryPositionLogits(plain))),
            ("Hugging Face generate", theirs)]}
        base = times["lit-gpt-ssa (eval/passkey.py)"]
        rows += [[f"{ids.size(1):,}", label, f"{seconds:.3f}", f"{seconds / base:.2f}"]
                 for label, seconds in times.items()]
    print(header(f"Passkey evaluation: {args.model}, one prompt, {args.new_tokens} answer tokens, greedy, batch 1"))
    print(table(["prompt tokens", "implementation", "seconds per prompt", "time / ours"], rows))


if __name__ == "__main__":
    main()
