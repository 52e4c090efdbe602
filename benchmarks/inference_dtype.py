"""bf16 against float32 in inference: decoding speed and how far the logits move, for pythia-70m (random weights,
its SSA with temperatures set away from their start) and SmolLM2-135M-Instruct (the real weights, and an SSA
fine-tune of them when given), each loaded as the inference tools load it (`load_for_inference`, SSA's temperature
parameters kept float32 in a bf16 model).

    python benchmarks/inference_dtype.py
    python benchmarks/inference_dtype.py --smollm2 checkpoints/SmolLM2-135M-Instruct \
        --smollm2_ssa out/finetune-quality/full_ssa-seed3/final

Per model: tokens/s of 128 greedy tokens after a 128-token prompt (batch 1, KV cache) in each dtype, the largest
logit difference bf16 - float32 over a 256-token forward of the bundled Wikipedia text, and the share of those
positions whose top token is the same. The ratio of the speeds is measured in the same run.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from common import header, median_seconds, table

from lit_gpt import GPT, Config
from lit_gpt.checkpoint import save_model_dir
from lit_gpt.data.prepare import BUNDLED_WIKI, GPT2_TOKENIZER, read_text
from lit_gpt.fabric import bf16_speedup
from lit_gpt.generation import generate, inference_dtype, load_for_inference


def random_pythia(folder: Path, ssa: bool) -> Path:
    """pythia-70m with random weights (the same for both), and for SSA slopes of 0.05-0.3 and token weights of size
    0.5, so that the temperatures are far from 1 and bf16 rounding of them would show."""
    torch.manual_seed(0)
    config = Config.from_name("pythia-70m", **({"attention_temperature": "ssa"} if ssa else {}))
    model = GPT(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("position_param"):
                p.copy_(torch.empty(p.shape).uniform_(0.05, 0.3, generator=generator).log())
            elif name.endswith("token_weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    save_model_dir(model, folder, tokenizer_dir=GPT2_TOKENIZER)
    return folder


def measure(folder: Path, text: str, repeats: int) -> dict:
    rows = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_for_inference(folder, "cpu", dtype)
        ids = tokenizer.encode(text)[:256][None]
        with torch.inference_mode():
            logits = model(ids).float()
        prompt = ids[:, :128]
        seconds = median_seconds(lambda m=model, p=prompt: list(generate(m, p, 128)), repeats)
        rows[dtype] = dict(logits=logits, tokens_per_s=128 / seconds)
    diff = (rows["bfloat16"]["logits"] - rows["float32"]["logits"]).abs()
    same_top = (rows["bfloat16"]["logits"].argmax(-1) == rows["float32"]["logits"].argmax(-1)).float().mean()
    return dict(float32=rows["float32"]["tokens_per_s"], bfloat16=rows["bfloat16"]["tokens_per_s"],
                max_diff=diff.max().item(), logit_range=rows["float32"]["logits"].abs().max().item(),
                same_top=same_top.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    parser.add_argument("--smollm2_ssa", type=Path, default=None, help="an SSA fine-tune of SmolLM2 (its final/)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    text = read_text(BUNDLED_WIKI)
    folders = {}
    scratch = Path(tempfile.mkdtemp(prefix="inference-dtype-"))
    folders["pythia-70m (random)"] = random_pythia(scratch / "vanilla", ssa=False)
    folders["pythia-70m (random) + SSA"] = random_pythia(scratch / "ssa", ssa=True)
    if (args.smollm2 / "model_config.yaml").is_file():
        folders["SmolLM2-135M-Instruct"] = args.smollm2
    else:
        print(f"({args.smollm2} is not a converted checkpoint: docs/finetuning.md says how to make it; skipped)")
    if args.smollm2_ssa is not None:
        folders["SmolLM2-135M-Instruct + SSA (fine-tuned)"] = args.smollm2_ssa
    print(header("Inference in bf16 against float32: 128 new tokens after 128, batch 1, greedy; logits over 256"
                 " tokens of Wikipedia"))
    rows = []
    for name, folder in folders.items():
        r = measure(folder, text, args.repeats)
        rows.append([name, f"{r['float32']:.1f}", f"{r['bfloat16']:.1f}", f"{r['bfloat16'] / r['float32']:.2f}x",
                     f"{r['max_diff']:.3f} (of {r['logit_range']:.1f})", f"{100 * r['same_top']:.1f}%"])
    print(table(["model", "float32 tokens/s", "bf16 tokens/s", "bf16 / float32", "largest logit difference",
                 "same top token"], rows))
    chosen = inference_dtype("auto", "cpu")
    print(f"\nbf16 matrix products run {bf16_speedup():.1f}x as fast as float32 here; --dtype auto chooses"
          f" {str(chosen).removeprefix('torch.')}. Threads: {torch.get_num_threads()}.")


if __name__ == "__main__":
    main()
