"""Fine-tuning of a converted checkpoint, shared by finetune/full.py (every weight, or --ssa_only) and
finetune/lora.py (adapters on a frozen backbone): the checks before launch, the job, the data, the loop and the report.
"""

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from lit_gpt.checkpoint import find_resume_checkpoint, load_checkpoint, module_of, run_lock, save_checkpoint
from lit_gpt.config import ATTENTION_FIELDS, FINETUNE_GATE_SCALE, FINETUNE_SSA_INIT, Config, with_ssa_flag
from lit_gpt.data.alpaca import InstructionBatches, encode_records, load_records
from lit_gpt.data.prepare import META_FILENAME, prepare_before_launch
from lit_gpt.data.tokens import TokenBatches, TokenData
from lit_gpt.fabric import RunArgs, build_fabric, check_launch, launch_and_close, on_rank_zero
from lit_gpt.lora import LoRAArgs, add_lora, check_same_kind, lora_files
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.training import (
    EvalArgs,
    TrainArgs,
    check_training_fits,
    check_window,
    fit,
    freeze_backbone,
    hyperparameters,
    seed_ranks,
    setup_training,
    write_history,
)
from lit_gpt.utils import check_apart, check_seed, check_share, num_parameters

FINETUNE_POSITION_LR = 1e-2  # peak learning rate of the position slopes (the README says how it was chosen)
FINETUNE_TOKEN_LR = 1e-4  # peak learning rate of the token-term weights


def launch(checkpoint_dir: Path, ssa: bool, ssa_only: bool, model: dict | None, data: Path, data_source: str | None,
           val_fraction: float, truncate: bool, out_dir: Path, train: TrainArgs, eval: EvalArgs, run: RunArgs,
           seed: int, resume, lora: LoRAArgs | None = None) -> None:
    """Check everything, then start the processes: the part of `setup` that finetune/lora.py shares."""
    train.check()
    check_seed(seed)
    check_share(val_fraction, "--val_fraction", "the records held out for validation")
    eval.check()
    if lora is not None:
        lora.check()
    check_apart(Path(out_dir), "--out_dir", Path(checkpoint_dir), "--checkpoint_dir")
    base = Config.from_file(Path(checkpoint_dir))
    Tokenizer(Path(checkpoint_dir))  # fail now, in one line, where the folder has no tokenizer
    check_data_argument(Path(data), data_source)
    config = finetune_config(base, ssa, model or {})
    check_launch(run, train)
    tokens_missing = Path(data).suffix not in (".json", ".jsonl") and not (Path(data) / META_FILENAME).is_file()
    if data_source is not None and tokens_missing:
        prepare_before_launch(data_source, Path(data), run.devices * run.num_nodes, Path(checkpoint_dir),
                              val_fraction=val_fraction)
    check_training_fits(config, train, lora.rank if lora is not None else None,
                        len(lora.targets) if lora is not None else 0, prefix="the checkpoint's ",
                        device="cuda" if torch.cuda.is_available() else "cpu",
                        shards=run.devices * run.num_nodes if run.strategy == "fsdp" else 1)
    job = FinetuneJob(Path(checkpoint_dir), base, config, ssa_only, Path(data), data_source, val_fraction, truncate,
                      Path(out_dir), train, eval, seed, resume, lora, run.compile)
    hparams = hyperparameters(**{f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name != "base"},
                              ssa=ssa, run=run)
    fabric = build_fabric(run, out_dir)
    launch_and_close(fabric, main, job, hparams)


@dataclass
class FinetuneJob:
    """Everything a fine-tuning process needs, checked by `setup`."""

    checkpoint_dir: Path
    base: Config  # the checkpoint's own config
    config: Config  # with SSA or a baseline added where asked for
    ssa_only: bool
    data: Path
    data_source: str | None
    val_fraction: float
    truncate: bool
    out_dir: Path
    train: TrainArgs
    eval: EvalArgs
    seed: int
    resume: bool | str | Path
    lora: LoRAArgs | None = None  # finetune/lora.py: adapters on the frozen backbone
    compile: bool = False  # torch.compile each block


def check_data_argument(data: Path, data_source: str | None) -> None:
    """--data is instruction records (.json/.jsonl) or a token folder; a text file is neither."""
    if data.suffix in (".json", ".jsonl"):
        if not data.is_file():
            raise FileNotFoundError(f"--data {data}: expected an Alpaca-format instruction file there, found"
                                    f" {'a folder' if data.exists() else 'nothing'}.")
    elif data.is_file():
        raise ValueError(f"--data {data} is a file, not instruction data (.json/.jsonl) or a prepared token folder: to"
                         f" fine-tune on its text, pass --data_source {data} --data <a new folder to prepare into>.")


def finetune_config(base: Config, ssa: bool, overrides: dict) -> Config:
    """The checkpoint's config with the attention fields of --model.* (--ssa: attention_temperature ssa); SSA added
    to a checkpoint without it starts at its fine-tuning slope, so that the first loss is the checkpoint's own."""
    unknown = [k for k in overrides if k not in ATTENTION_FIELDS]
    if unknown:
        raise ValueError(f"--model.{unknown[0]} would change the architecture of the checkpoint; only the attention"
                         f" fields ({', '.join(sorted(ATTENTION_FIELDS))}) may be set here.")
    overrides = with_ssa_flag(ssa, overrides)
    mode = overrides.get("attention_temperature", base.attention_temperature)
    values = base.to_dict() | {"attention_temperature": mode}
    if mode == base.attention_temperature and mode != "none" and ssa:
        print(f"The checkpoint already has attention_temperature={mode!r}; fine-tuning continues with its own"
              " parameters.")
    elif mode in ("ssa", "ssa_position") and mode != base.attention_temperature:
        values["ssa_position_init"] = FINETUNE_SSA_INIT
    if overrides.get("attention_gate", "none") != "none" and base.attention_gate == "none":
        values["attention_gate_scale"] = FINETUNE_GATE_SCALE  # 2 sigmoid(x 0) = 1: the checkpoint's own outputs
    if overrides.get("selective_mask", "none") != "none" and base.selective_mask == "none":
        print("selective_mask has no parameters to start from zero: it changes the checkpoint's outputs from the first"
              " step (the validation before training shows by how much).")
    return Config.from_dict({**values, **overrides})


def load_model(checkpoint_dir: Path, base: Config, config: Config) -> GPT:
    """Strict loading: only the temperature parameters that the config adds to the checkpoint may be missing. The
    weights become float32 whatever the file holds: the master weights that AdamW updates (under bf16-mixed too),
    since a bf16 weight rounds away most updates at fine-tuning rates (a bf16 SmolLM2 kept in bf16 changed 16% of its
    weights in 6 steps, against 92% from a float32 copy). --precision bf16-true asks for bf16 weights explicitly."""
    return load_checkpoint(checkpoint_dir, config=config, allow_added=adds_attention(base, config),
                               dtype=torch.float32)


def adds_attention(base: Config, config: Config) -> bool:
    """Whether `config` adds attention parameters to the checkpoint's architecture (SSA or a baseline on a
    checkpoint that has another one or none): those start at their initialisation."""
    return any(getattr(base, name) != getattr(config, name) for name in ATTENTION_FIELDS)


def instruction_batches(path: Path, tokenizer: Tokenizer, block_size: int, truncate: bool, val_fraction: float,
                        seed: int, train: TrainArgs, eval: EvalArgs) -> InstructionBatches:
    records = load_records(path)
    random.Random(seed).shuffle(records)
    n_val = max(1, round(len(records) * val_fraction))
    if n_val >= len(records):
        raise ValueError(f"{str(path)!r} has {len(records)} record(s): too few to hold out {n_val} for validation.")
    examples = encode_records(records, tokenizer, block_size, truncate, str(path))
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    return InstructionBatches(examples[n_val:], examples[:n_val], seed, train.global_batch_size,
                              train.micro_batch_size, eval.max_iters, pad_id)


def token_batches(folder: Path, checkpoint_dir: Path, config: Config, block_size: int, seed: int, train: TrainArgs,
                  eval: EvalArgs) -> TokenBatches:
    data = TokenData(folder)
    data.check_tokenizer(checkpoint_dir)
    data.check(config.padded_vocab_size, block_size)
    return TokenBatches(data, block_size, seed, train.global_batch_size, train.micro_batch_size, eval.max_iters)


def main(fabric: L.Fabric, job: FinetuneJob, hparams: dict) -> None:
    with run_lock(fabric, job.out_dir):  # one run at a time in out_dir
        finetune(fabric, job, hparams)


def finetune(fabric: L.Fabric, job: FinetuneJob, hparams: dict) -> None:
    resume_dir = on_rank_zero(fabric, find_resume_checkpoint, job.out_dir, job.resume)
    if resume_dir is not None:
        check_same_kind(resume_dir, job.lora, "finetune/full.py" if job.lora is None else "finetune/lora.py")
    block_size = check_window(job.train.max_seq_length, job.config)
    if job.data.suffix in (".json", ".jsonl"):
        batches = instruction_batches(job.data, Tokenizer(job.checkpoint_dir), block_size, job.truncate,
                                      job.val_fraction, job.seed, job.train, job.eval)
    else:
        batches = token_batches(job.data, job.checkpoint_dir, job.config, block_size, job.seed, job.train, job.eval)

    fabric.seed_everything(job.seed)
    model = load_model(job.checkpoint_dir, job.base, job.config)
    if job.ssa_only:
        freeze_backbone(model)
    if job.lora is not None:
        add_lora(model, job.lora)
    seed_ranks(fabric, job.seed)
    added = sum(p.numel() for p in model.added_parameters()) if adds_attention(job.base, job.config) else 0
    total = num_parameters(model)
    fabric.print(f"{job.config.name}: {total:,} parameters, {added:,} added to the attention"
                 f" ({added / max(1, total - added):.3%}); {num_parameters(model, True):,} trainable")
    model, optimizer, state = setup_training(fabric, model, job.train, resume_dir, job.out_dir, job.compile)

    transform = None if job.lora is None else lora_files(job.lora, module_of(model), job.checkpoint_dir, job.base)

    def save(name: str) -> None:
        save_checkpoint(fabric, state, job.out_dir / name, job.checkpoint_dir, hparams, keep_last=job.train.keep_last,
                        transform=transform)

    fit(fabric, model, optimizer, state, batches, job.train, job.eval, block_size, save)
    report(fabric, state, job.out_dir, job.config)


def report(fabric: L.Fabric, state: dict, out_dir: Path, config: Config) -> None:
    """Validation perplexity before and after, the loss curve and the history."""
    val = [h["val_loss"] for h in state["history"] if "val_loss" in h]
    if len(val) >= 2:
        fabric.print(f"Validation perplexity: {math.exp(val[0]):.3f} before, {math.exp(val[-1]):.3f} after fine-tuning")
    write_history(fabric, state, out_dir, f"fine-tuning {config.name} ({config.attention_temperature})")
