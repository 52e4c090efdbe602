"""Fine-tune a converted checkpoint with low-rank adapters (LoRA, or DoRA with --lora.dora), optionally adding SSA.

    python finetune/lora.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --ssa \
        --data data/prepared/smollm2-wiki --data_source data/corpus/wiki.utf8.xz
    python finetune/lora.py --checkpoint_dir ... --lora.rank 16 --lora.targets "[query, value, mlp]" --lora.dora true

The backbone is frozen (no gradients, no optimizer state): only the adapters (at --train.learning_rate) and the
attention's additions (SSA's slopes and token weights, a gate, at their own rates) train. Every checkpoint folder
(step-XXXXXXXX/, final/) holds the adapters merged into plain weights, so generation, evaluation and the Hugging Face
export take it like any other; beside them lora.safetensors (the adapters and the attention's additions) and
lora.yaml (their settings and the base they belong to) are what to share. scripts/merge_lora.py merges a
lora.safetensors into its base again.
"""

from pathlib import Path
from typing import Any, Literal

import torch

from lit_gpt.fabric import RunArgs
from lit_gpt.finetuning import FINETUNE_POSITION_LR, FINETUNE_TOKEN_LR, launch
from lit_gpt.lora import LoRAArgs
from lit_gpt.training import EvalArgs, TrainArgs
from lit_gpt.utils import run_cli


def setup(
    checkpoint_dir: Path,
    lora: LoRAArgs = LoRAArgs(),
    ssa: bool = False,
    model: dict[str, Any] | None = None,
    data: Path = Path("data/prepared/finetune"),
    data_source: str | None = None,
    val_fraction: float = 0.05,
    truncate: bool = False,
    out_dir: Path = Path("out/finetune-lora"),
    train: TrainArgs = TrainArgs(global_batch_size=16, micro_batch_size=1, max_steps=500, learning_rate=3e-4,
                                 min_lr=3e-5, warmup_steps=50, weight_decay=0.0, save_interval=100,
                                 ssa_position_lr=FINETUNE_POSITION_LR, ssa_token_lr=FINETUNE_TOKEN_LR),
    eval: EvalArgs = EvalArgs(interval=100, max_iters=50, initial_validation=True),
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    precision: str | None = None,
    seed: int = 1337,
    logger_name: Literal["csv", "tensorboard", "wandb"] = "csv",
    resume: bool | Literal["auto"] | Path = False,
    compile: bool = False,
) -> None:
    """Fine-tune a checkpoint with low-rank adapters.

    Args:
        checkpoint_dir: a converted (or pretrained) checkpoint folder.
        lora: rank, alpha, dropout, which projections carry adapters, and DoRA.
        ssa: add Selective Self-Attention (short for --model.attention_temperature ssa).
        model: the attention fields to set, as in finetune/full.py: --model.attention_temperature logn,
            --model.attention_gate headwise, ... (python -m lit_gpt lists the choices).
        data: a prepared token folder (language modelling) or an Alpaca-format .json/.jsonl file (instructions).
        data_source: text to prepare into `data` with the checkpoint's tokenizer where `data` holds none.
        val_fraction: share held out for validation (of the documents when preparing, of the records otherwise).
        truncate: cut instruction records longer than the context instead of refusing them.
        out_dir: checkpoints (step-XXXXXXXX/ and final/, merged, with lora.safetensors), logs and loss.png go here.
        train: batch sizes, length, optimizer and schedule; learning_rate is the adapters' peak rate;
            ssa_position_lr, ssa_token_lr and gate_lr those of the attention's additions.
        eval: validation interval and size.
        devices: processes per node; more than one runs DDP or FSDP.
        num_nodes: machines.
        strategy: auto (DDP when distributed), ddp or fsdp.
        precision: Fabric precision (32-true, bf16-mixed, ...) or auto (bf16-mixed on a CPU with fast bf16).
        seed: seeds the adapters' initialisation, the data order and the split.
        logger_name: csv, tensorboard or wandb.
        resume: "auto" continues from the latest checkpoint in out_dir; or a checkpoint folder.
        compile: torch.compile the transformer blocks.
    """
    launch(checkpoint_dir, ssa, False, model, data, data_source, val_fraction, truncate, out_dir, train, eval,
           RunArgs(devices, num_nodes, strategy, precision, logger_name, compile), seed, resume,
           lora=lora)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
