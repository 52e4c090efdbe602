"""Fine-tune every weight of a converted checkpoint, optionally adding Selective Self-Attention first.

    # language modelling on text held apart from its validation split (prepared with the checkpoint's tokenizer)
    python finetune/full.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --ssa \
        --data data/prepared/smollm2-wiki --data_source data/corpus/wiki.utf8.xz
    # instruction tuning on Alpaca-format JSON, loss on the responses only
    python finetune/full.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --ssa --data alpaca.json
    # train only the temperature parameters
    python finetune/full.py --checkpoint_dir ... --ssa --ssa_only

`--ssa` starts the temperatures at the values that reproduce the checkpoint (u = 0, position slope 6e-4): the first
validation loss is the checkpoint's own; so does a gate (`--model.attention_gate headwise`: 2 sigmoid(x W_g), W_g = 0).
Selective attention (`--model.selective_mask leviathan`) has no parameters and changes the outputs from the start.
The position slopes train at `--train.ssa_position_lr`, the token-term weights at `--train.ssa_token_lr` and a gate
at `--train.gate_lr`, each with the backbone's warmup and decay.
"""

from pathlib import Path
from typing import Any, Literal

import torch

from lit_gpt.fabric import RunArgs
from lit_gpt.finetuning import FINETUNE_POSITION_LR, FINETUNE_TOKEN_LR, launch
from lit_gpt.training import EvalArgs, TrainArgs
from lit_gpt.utils import run_cli


def setup(
    checkpoint_dir: Path,
    ssa: bool = False,
    ssa_only: bool = False,
    model: dict[str, Any] | None = None,
    data: Path = Path("data/prepared/finetune"),
    data_source: str | None = None,
    val_fraction: float = 0.05,
    truncate: bool = False,
    out_dir: Path = Path("out/finetune"),
    train: TrainArgs = TrainArgs(global_batch_size=16, micro_batch_size=1, max_steps=500, learning_rate=3e-5,
                                 min_lr=3e-6, warmup_steps=50, weight_decay=0.0, save_interval=100,
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
    """Fine-tune a checkpoint.

    Args:
        checkpoint_dir: a converted (or pretrained) checkpoint folder.
        ssa: add Selective Self-Attention (short for --model.attention_temperature ssa); a checkpoint that has it
            keeps its own parameters.
        ssa_only: freeze the backbone and train only the temperature parameters.
        model: the attention fields to set, as in pretraining: --model.attention_temperature logn,
            --model.ssa_token_weights separate, --model.attention_gate headwise, --model.selective_mask leviathan
            (python -m lit_gpt lists the choices).
        data: a prepared token folder (language modelling) or an Alpaca-format .json/.jsonl file (instructions).
        data_source: text to prepare into `data` with the checkpoint's tokenizer where `data` holds none.
        val_fraction: share held out for validation (of the documents when preparing, of the records otherwise).
        truncate: cut instruction records longer than the context instead of refusing them.
        out_dir: checkpoints (step-XXXXXXXX/ and final/), logs and loss.png go here.
        train: batch sizes, length, optimizer and schedule; max_seq_length defaults to the model's context;
            ssa_position_lr and ssa_token_lr are the peak learning rates of SSA's slopes and token weights.
        eval: validation interval and size.
        devices: processes per node; more than one runs DDP or FSDP.
        num_nodes: machines.
        strategy: auto (DDP when distributed), ddp or fsdp.
        precision: Fabric precision (32-true, bf16-mixed, ...) or auto (bf16-mixed on a CPU with fast bf16, found by a
            quick probe); default bf16-mixed on GPUs, 32-true on CPU.
        seed: seeds the data order and the split.
        logger_name: csv, tensorboard or wandb (Weights & Biases: pip install -e '.[wandb]'; WANDB_PROJECT and
            WANDB_MODE=offline as W&B reads them).
        resume: "auto" continues from the latest checkpoint in out_dir; or a checkpoint folder.
        compile: torch.compile the transformer blocks.
    """
    launch(checkpoint_dir, ssa, ssa_only, model, data, data_source, val_fraction, truncate, out_dir, train, eval,
           RunArgs(devices, num_nodes, strategy, precision, logger_name, compile), seed, resume)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
