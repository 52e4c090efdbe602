"""Generate text from any checkpoint folder (converted, pretrained or fine-tuned, with or without SSA).

    python generate/base.py --checkpoint_dir out/demo/final --prompt "ROMEO:" --max_new_tokens 100
    python generate/base.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --prompt "The capital of France is" \
        --temperature 0 --max_new_tokens 20

Decoding uses the KV cache; the text streams to stdout as it is decoded.
"""

import sys
import time
from pathlib import Path

import torch

from lit_gpt.generation import check_sampling, load_for_inference, prepare_prompt, stream_text
from lit_gpt.utils import at_least, check_seed, run_cli


def main(
    checkpoint_dir: Path,
    prompt: str = "What food do llamas eat?",
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float = 1.0,
    num_samples: int = 1,
    stop: list[str] | str | None = None,
    seed: int = 1234,
    truncate: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
) -> list[str]:
    """Generate a completion of `prompt`.

    Args:
        checkpoint_dir: a checkpoint folder (model.safetensors, model_config.yaml, tokenizer files).
        prompt: the text to complete.
        max_new_tokens: the most tokens to add.
        temperature: 0 decodes greedily; higher is more random.
        top_k: sample among the k most likely tokens only.
        top_p: sample among the most likely tokens whose probabilities add up to p (nucleus sampling).
        num_samples: how many completions to draw.
        stop: a string, or a list of them, that ends the completion (not included); \\n is a newline.
        seed: seeds the sampling.
        truncate: drop the beginning of a prompt too long for the context instead of refusing it.
        device: cpu or cuda; default cuda when available.
        dtype: float32, float16, bfloat16, or auto (bfloat16 where this CPU or GPU multiplies it fast, temperatures
            kept in float32); default the checkpoint's own.
        compile: torch.compile the transformer blocks (slower here, see benchmarks/compile.py).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    at_least(1, num_samples=num_samples)
    check_seed(seed)
    model, tokenizer = load_for_inference(checkpoint_dir, device, dtype)
    if compile:
        model.compile_blocks()
    device = model.lm_head.weight.device
    ids = prepare_prompt(tokenizer, prompt, max_new_tokens, model.max_seq_length, truncate).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    # a backslash-n typed on the command line means a newline
    stops = [s.replace("\\n", "\n") for s in ([stop] if isinstance(stop, str) else stop or [])]
    completions = []
    for _ in range(num_samples):
        started, pieces, counts = time.perf_counter(), [], {}
        print(prompt, end="", flush=True)
        for piece in stream_text(model, tokenizer, ids, max_new_tokens, stops, counts, temperature=temperature,
                                 top_k=top_k, top_p=top_p, generator=generator):
            print(piece, end="", flush=True)
            pieces.append(piece)
        elapsed = time.perf_counter() - started
        completions.append("".join(pieces))
        n_tokens = counts["tokens"]  # generated, not re-encoded: a re-encoding can count other tokens
        print(f"\n\n[{n_tokens} tokens in {elapsed:.2f} s: {n_tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    return completions


if __name__ == "__main__":
    run_cli(main)
