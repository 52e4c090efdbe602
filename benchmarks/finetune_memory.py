"""Fine-tuning's cost by method: trainable parameters, peak memory and step time of full fine-tuning, full + SSA,
LoRA, LoRA + SSA, DoRA + SSA and SSA only, on SmolLM2-135M's architecture (random weights: the cost does not depend
on them), each row in its own process, the same batch.

    python benchmarks/finetune_memory.py                       # batch 4 x 256
    python benchmarks/finetune_memory.py --batch 8 --length 512

Memory is the peak resident memory of the process above what it held before the model was built: the weights,
gradients, optimizer state and activations of a step (glibc returns large frees at once, so it follows the tensors).
"""

import argparse

import torch
from common import answer_child, header, median_seconds, reset_peak_rss, rss_mb, run_isolated, table

from lit_gpt import GPT, Config
from lit_gpt.lora import LoRAArgs, add_lora
from lit_gpt.training import TrainArgs, build_optimizer, freeze_backbone

ROWS = {  # name: (attention fields, LoRA settings or None, SSA only)
    "full": ({}, None, False),
    "full + SSA": ({"attention_temperature": "ssa"}, None, False),
    "LoRA (r 8: q, k, v)": ({}, LoRAArgs(rank=8), False),
    "LoRA + SSA": ({"attention_temperature": "ssa"}, LoRAArgs(rank=8), False),
    "DoRA + SSA": ({"attention_temperature": "ssa"}, LoRAArgs(rank=8, dora=True), False),
    "SSA only": ({"attention_temperature": "ssa"}, None, True),
}


def measure(row: str, model_name: str, batch: int, length: int, repeats: int) -> dict:
    fields, lora, ssa_only = ROWS[row]
    torch.manual_seed(0)
    before = rss_mb("VmRSS")
    reset_peak_rss()
    model = GPT(Config.from_name(model_name, **fields))
    if lora is not None:
        add_lora(model, lora)
    if ssa_only:
        freeze_backbone(model)
    optimizer = build_optimizer(model, TrainArgs(learning_rate=1e-4, weight_decay=0.0))
    x = torch.randint(0, model.config.vocab_size, (batch, length + 1))

    def step():
        model(x[:, :-1], targets=x[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_seconds(step, repeats)
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    return {"seconds": seconds, "peak_mb": rss_mb() - before, "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if answer_child(args.child, measure):
        return
    print(header(f"Fine-tuning cost by method: {args.model}, batch {args.batch} x {args.length}, float32, AdamW"))
    results = {}
    for row in ROWS:
        kwargs = dict(row=row, model_name=args.model, batch=args.batch, length=args.length)
        timed = run_isolated(__file__, repeats=args.repeats, **kwargs)
        results[row] = {**timed, "peak_mb": run_isolated(__file__, memory=True, repeats=1, **kwargs)["peak_mb"]}
    full = results["full"]
    print(table(["method", "trainable parameters", "peak memory (MiB)", "memory / full", "step (s)", "time / full"],
                [[row, f"{r['trainable']:,}", f"{r['peak_mb']:,.0f}", f"{r['peak_mb'] / full['peak_mb']:.2f}",
                  f"{r['seconds']:.2f}", f"{r['seconds'] / full['seconds']:.2f}"] for row, r in results.items()]))


if __name__ == "__main__":
    main()
