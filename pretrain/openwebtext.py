"""Pretrain a GPT-2 / Pythia / Llama-style model from scratch, with or without SSA, with Lightning Fabric.

    python pretrain/openwebtext.py --config configs/demo.yaml                      # bundled corpus, CPU, ~10 min
    python pretrain/openwebtext.py --config configs/demo.yaml --ssa --out_dir out/demo-ssa  # SSA on
    python pretrain/openwebtext.py --config configs/gpt2-owt-ssa.yaml --devices 8  # the paper's setting

With no arguments it trains GPT-2 124M on OpenWebText prepared by scripts/prepare_openwebtext.py.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from lit_gpt.checkpoint import find_resume_checkpoint, run_lock, save_checkpoint
from lit_gpt.config import Config, with_ssa_flag
from lit_gpt.data.prepare import GPT2_TOKENIZER, META_FILENAME, prepare_before_launch
from lit_gpt.data.tokens import BinShardData, TokenBatches, TokenData
from lit_gpt.fabric import RunArgs, build_fabric, check_launch, launch_and_close, on_rank_zero
from lit_gpt.lora import check_same_kind
from lit_gpt.model import GPT
from lit_gpt.training import (
    EvalArgs,
    TrainArgs,
    check_training_fits,
    check_window,
    fit,
    hyperparameters,
    micro_batch_flops,
    setup_training,
    write_history,
)
from lit_gpt.utils import check_apart, check_seed, check_share, num_parameters, run_cli


@dataclass
class DataArgs:
    """The prepared token folder, and how to prepare it when it is missing.

    Args:
        dir: a folder prepared by scripts/prepare_openwebtext.py (train.bin, val.bin, meta.json).
        source: where to prepare `dir` from when it holds no prepared data: `openwebtext` (or another Hugging Face
            dataset name, needs internet), `bundled` (the corpus in data/corpus), or a local .txt/.jsonl/.parquet
            file or folder.
        tokenizer_dir: the tokenizer to prepare with (a folder with tokenizer.json or tokenizer.model).
        train_tokenizer: instead, train a byte-level BPE of this many tokens on the training split.
        val_fraction: share of the documents held out for validation.
        window_start: `random`: training windows start anywhere; `document`: only at the start of a document.
        train_bin: instead of `dir`, pre-tokenized llm.c / modded-nanogpt `.bin` shards (a glob pattern, e.g.
            fineweb10B/fineweb_train_*.bin: a 256-int32 header, then GPT-2 uint16 tokens); the checkpoints take their
            tokenizer from `tokenizer_dir`.
        val_bin: the validation shards that go with `train_bin` (e.g. fineweb10B/fineweb_val_*.bin).
    """

    dir: Path = Path("data/prepared/openwebtext")
    source: str | None = None  # prepare `dir` from this source first where it holds no prepared data
    tokenizer_dir: Path = GPT2_TOKENIZER  # the tokenizer to prepare with
    train_tokenizer: int | None = None  # or train a byte-level BPE of this size on the training split
    val_fraction: float = 0.0005
    window_start: Literal["random", "document"] = "random"  # training windows start anywhere, or at documents
    train_bin: str | None = None  # llm.c .bin shards instead of `dir`: a glob pattern
    val_bin: str | None = None


def setup(
    model_name: str = "gpt2",
    ssa: bool = False,
    model: dict[str, Any] | None = None,
    model_config: Path | None = None,
    data: DataArgs = DataArgs(),
    out_dir: Path = Path("out/pretrain/gpt2"),
    train: TrainArgs = TrainArgs(global_batch_size=480, micro_batch_size=12, max_tokens=300_000_000_000),
    eval: EvalArgs = EvalArgs(),
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    precision: str | None = None,
    seed: int = 1337,
    logger_name: Literal["csv", "tensorboard", "wandb"] = "csv",
    resume: bool | Literal["auto"] | Path = False,
    compile: bool = False,
) -> None:
    """Pretrain a model from scratch.

    Args:
        model_name: a preset, e.g. gpt2, pythia-160m, demo; `python -m lit_gpt` lists them all.
        ssa: add Selective Self-Attention (short for --model.attention_temperature ssa).
        model: overrides of the preset's fields, the attention's included: --model.attention_temperature ssa,
            --model.attention_gate headwise, --model.selective_mask leviathan (python -m lit_gpt lists the choices).
        model_config: a model_config.yaml to use instead of a preset (the overrides still apply).
        data: the prepared token folder, and how to prepare it when it is missing.
        out_dir: checkpoints (step-XXXXXXXX/ and final/), logs and loss.png go here.
        train: batch sizes, length of the run, optimizer and schedule.
        eval: validation interval and size.
        devices: processes per node (GPUs, or CPU processes); more than one runs DDP or FSDP.
        num_nodes: machines.
        strategy: auto (DDP when distributed), ddp or fsdp.
        precision: Fabric precision (32-true, bf16-mixed, ...) or auto (bf16-mixed on a CPU with fast bf16, found by a
            quick probe); default bf16-mixed on GPUs, 32-true on CPU.
        seed: seeds the initialisation and the choice of training windows.
        logger_name: csv, tensorboard or wandb (Weights & Biases: pip install -e '.[wandb]'; WANDB_PROJECT and
            WANDB_MODE=offline as W&B reads them).
        resume: "auto" continues from the latest checkpoint in out_dir; or a checkpoint folder.
        compile: torch.compile the transformer blocks; off by default, where it does not pay (see
            benchmarks/compile.py).
    """
    train.check()
    check_seed(seed)
    eval.check()
    config = load_config(model_name, with_ssa_flag(ssa, model or {}), model_config)
    run = RunArgs(devices, num_nodes, strategy, precision, logger_name, compile)
    check_launch(run, train)
    check_training_fits(config, train, device="cuda" if torch.cuda.is_available() else "cpu",
                        shards=run.devices * run.num_nodes if strategy == "fsdp" else 1)
    check_data(data, Path(out_dir), run.devices * run.num_nodes)
    job = PretrainJob(config, data, Path(out_dir), train, eval, seed, resume, compile)
    hparams = hyperparameters(model_name=model_name, **{f.name: getattr(job, f.name) for f in dataclasses.fields(job)},
                              run=run)
    fabric = build_fabric(run, out_dir)
    launch_and_close(fabric, main, job, hparams)


@dataclass
class PretrainJob:
    """Everything a pretraining process needs, checked by `setup`."""

    config: Config
    data: DataArgs
    out_dir: Path
    train: TrainArgs
    eval: EvalArgs
    seed: int
    resume: bool | str | Path
    compile: bool = False  # torch.compile each block


def load_config(model_name: str, overrides: dict | None, model_config: Path | None) -> Config:
    if model_config is not None:
        return Config.from_file(model_config, **(overrides or {}))
    return Config.from_name(model_name, **(overrides or {}))


def check_data(data: DataArgs, out_dir: Path, world_size: int) -> None:
    """Before any process starts: .bin shards given in pairs, the output apart from the data, and the data prepared;
    a single process prepares it now, a multi-process launch is refused with the command to run first (rank 0 would
    prepare while the others waited past the process group's timeout)."""
    check_share(data.val_fraction, "--data.val_fraction", "the documents held out for validation")
    if (data.train_bin is None) != (data.val_bin is None):
        raise ValueError("--data.train_bin and --data.val_bin go together (llm.c writes both, e.g."
                         " fineweb_train_*.bin and fineweb_val_*.bin): pass both, or neither to read --data.dir.")
    if data.train_bin is not None:
        for pattern, flag in ((data.train_bin, "--data.train_bin"), (data.val_bin, "--data.val_bin")):
            check_apart(out_dir, "--out_dir", Path(pattern).expanduser().parent, flag)
        return
    check_apart(out_dir, "--out_dir", data.dir, "--data.dir")
    if (data.dir / META_FILENAME).is_file():
        return
    if data.source is None:
        raise FileNotFoundError(
            f"No prepared data in {str(data.dir)!r}: prepare OpenWebText with `python scripts/prepare_openwebtext.py`"
            " (needs internet), or run the bundled demo: `python pretrain/openwebtext.py --config configs/demo.yaml`."
        )
    prepare_before_launch(data.source, data.dir, world_size, data.tokenizer_dir, data.train_tokenizer,
                          data.val_fraction)


def open_data(data: DataArgs) -> TokenData | BinShardData:
    if data.train_bin is not None:
        return BinShardData(data.train_bin, data.val_bin, data.tokenizer_dir)
    tokens = TokenData(data.dir)
    tokens.check_own_tokenizer()
    if data.tokenizer_dir != GPT2_TOKENIZER and data.train_tokenizer is None:  # asked for by name
        tokens.check_tokenizer(data.tokenizer_dir)
    return tokens


def main(fabric: L.Fabric, job: PretrainJob, hparams: dict) -> None:
    with run_lock(fabric, job.out_dir):  # one run at a time in out_dir
        pretrain(fabric, job, hparams)


def pretrain(fabric: L.Fabric, job: PretrainJob, hparams: dict) -> None:
    config, data_args, train = job.config, job.data, job.train
    resume_dir = on_rank_zero(fabric, find_resume_checkpoint, job.out_dir, job.resume)
    if resume_dir is not None:
        check_same_kind(resume_dir, None, "pretraining")
    data = open_data(data_args)
    block_size = check_window(train.max_seq_length, config)
    data.check(config.padded_vocab_size, block_size)

    fabric.seed_everything(job.seed)
    with fabric.init_module(empty_init=False):
        model = GPT(config)
    fabric.print(f"{config.name}: {num_parameters(model):,} parameters ({num_parameters(model, True):,} trainable),"
                 f" attention_temperature={config.attention_temperature!r}")
    model, optimizer, state = setup_training(fabric, model, train, resume_dir, job.out_dir, job.compile)
    if "unigram_loss" in data.meta:
        fabric.print(f"Data: {data.meta['train_tokens']:,} training tokens; a context-free (unigram) model scores"
                     f" {data.meta['unigram_loss']:.3f} on validation")
    else:
        fabric.print(f"Data: {data.meta['train_tokens']:,} training and {data.meta['val_tokens']:,} validation tokens"
                     f" in {data.meta['train_shards']} + {data.meta['val_shards']} .bin shards")

    batches = TokenBatches(data, block_size, job.seed, train.global_batch_size, train.micro_batch_size,
                           job.eval.max_iters, data_args.window_start)

    def save(name: str) -> None:
        save_checkpoint(fabric, state, job.out_dir / name, data.folder, hparams, keep_last=train.keep_last)

    fit(fabric, model, optimizer, state, batches, train, job.eval, block_size, save,
        flops_per_micro_batch=micro_batch_flops(config, train.micro_batch_size, block_size))
    write_history(fabric, state, job.out_dir, f"{config.name} ({config.attention_temperature})")


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
