"""The training loop and what it needs: arguments, schedule, optimizer groups, the step with gradient accumulation,
validation and logging. Checkpoints live in lit_gpt/checkpoint.py, Fabric set-up in lit_gpt/fabric.py."""

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import lightning as L
import torch
from lightning.fabric.utilities.throughput import ThroughputMonitor, measure_flops
from tqdm import tqdm

from lit_gpt.checkpoint import check_resume_point, load_training_state, module_of
from lit_gpt.config import Config
from lit_gpt.fabric import check_batch, finish_logging
from lit_gpt.model import GPT
from lit_gpt.plots import plot_history
from lit_gpt.utils import Terminated, UserFacingError, at_least, check_fits, progress_bar, set_interrupt_note


@dataclass
class TrainArgs:
    """Batch sizes, length of the run, optimizer and schedule.

    Args:
        global_batch_size: sequences per optimizer step, over all processes.
        micro_batch_size: sequences per forward pass; the rest of the global batch is gradient accumulation.
        max_tokens: length of the run in training tokens (max_steps wins when both are set).
        max_steps: length of the run in optimizer steps; takes precedence over max_tokens.
        max_seq_length: tokens per training window; default the model's block_size.
        learning_rate: peak learning rate of what trains (every weight; under LoRA the adapters), reached after
            warmup.
        min_lr: learning rate at the end of the cosine decay.
        lr_decay_steps: the step where the cosine decay reaches min_lr (nanoGPT's lr_decay_iters); default
            max_steps. A run stopped before it, or continued in parts with --resume, keeps one schedule; after it
            the rate stays at min_lr.
        warmup_steps: steps of linear warmup from 0 to learning_rate.
        weight_decay: AdamW weight decay, on matrices only (not on norms, biases or temperatures).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        max_norm: gradients are clipped to this global norm.
        ssa_position_lr: peak learning rate of SSA's position slopes and the baselines' scales (null: learning_rate).
        ssa_token_lr: peak learning rate of SSA's token-term weights (null: learning_rate).
        gate_lr: peak learning rate of the attention gate's weights (null: learning_rate).
        save_interval: steps between checkpoints (null: only final/).
        keep_last: keep only this many of the latest step checkpoints (null: keep all); final/ is always kept.
        log_interval: steps between logged metrics.
    """

    global_batch_size: int = 512
    micro_batch_size: int = 8
    max_tokens: int | None = None
    max_steps: int | None = None  # takes precedence over max_tokens
    max_seq_length: int | None = None  # training window; defaults to the model's block_size
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    lr_decay_steps: int | None = None  # default max_steps
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    max_norm: float = 1.0
    ssa_position_lr: float | None = None  # peak learning rate of SSA's position slopes (and the baselines' scales)
    ssa_token_lr: float | None = None  # peak learning rate of SSA's token-term weights
    gate_lr: float | None = None  # peak learning rate of the attention gate (gated attention)
    save_interval: int | None = 1000
    keep_last: int | None = None  # step checkpoints to keep, the latest ones (null: all)
    log_interval: int = 1

    def check(self) -> None:
        """Refuse impossible values before any work starts, naming the flag."""
        fields_at_least("train", self, 1, "global_batch_size", "micro_batch_size", "max_tokens", "max_steps",
                 "max_seq_length", "save_interval", "keep_last", "log_interval", "lr_decay_steps")
        fields_at_least("train", self, 0, "learning_rate", "min_lr", "warmup_steps", "weight_decay", "ssa_position_lr",
                    "ssa_token_lr", "gate_lr")
        if not self.max_norm > 0:
            raise ValueError(f"--train.max_norm must be above 0 (the gradient norm it clips to), got {self.max_norm}.")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--train.{name} must lie in [0, 1), got {getattr(self, name)}.")


@dataclass
class EvalArgs:
    """Validation during training.

    Args:
        interval: steps between validations.
        max_iters: validation batches (of micro_batch_size sequences) per validation.
        initial_validation: validate once before the first step.
        final_validation: validate once after the last step.
    """

    interval: int = 1000
    max_iters: int = 100
    initial_validation: bool = False
    final_validation: bool = True

    def check(self) -> None:
        fields_at_least("eval", self, 1, "interval", "max_iters")


def fields_at_least(prefix: str, args, low: float, *names: str) -> None:
    at_least(low, **{f"{prefix}.{name}": getattr(args, name) for name in names})


HISTORY_FILENAME = "history.jsonl"


class TrainingDiverged(UserFacingError):
    pass


class Batches(Protocol):
    def train(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch `step`: inputs and targets (-100 where no loss is taken)."""

    def val(self, rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the fixed validation batches."""


class Prefetched:
    """`batches` with the next step's training batch read on a background thread while this step computes (its
    windows gathered from memory-mapped tokens, which may come from disk), on a GPU into pinned memory and copied
    without blocking. A step's batch is a function of the step alone, so prefetching changes no result."""

    def __init__(self, batches: Batches, device: torch.device) -> None:
        self.batches, self.device = batches, torch.device(device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.pending: tuple[tuple[int, int, int], Future] | None = None

    def train(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (step, rank, world_size)
        future = self.pending[1] if self.pending is not None and self.pending[0] == key else self.submit(*key)
        self.pending = ((step + 1, rank, world_size), self.submit(step + 1, rank, world_size))
        inputs, targets = future.result()
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def submit(self, step: int, rank: int, world_size: int) -> Future:
        return self.pool.submit(self.load, step, rank, world_size)

    def load(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.batches.train(step, rank, world_size)
        if self.device.type == "cuda":
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def val(self, rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches.val(rank, world_size)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def check_training_fits(config, args: "TrainArgs", lora_rank: int | None = None, lora_targets: int = 0,
                        prefix: str = "--model.", device: str = "cpu", shards: int = 1) -> None:
    """Refuse, before any process starts, a run whose weights, gradients and AdamW state (16 bytes a trained
    parameter, 4 a frozen one, over `shards` processes under FSDP) or one micro-batch's activations (2 bytes a value,
    as under bf16) cannot fit one process's device: a lower bound, so only what surely fails is refused, with the
    fields to lower named."""
    parts = config.estimated_parameters()
    params = sum(parts.values())
    if lora_rank is None:
        state = 16 * params
        fields = (f"{prefix}vocab_size" if parts["embedding"] > parts["blocks"]
                  else f"{prefix}n_layer or {prefix}n_embd")
    else:
        adapters = config.n_layer * lora_targets * lora_rank * 2 * config.n_embd
        state = 4 * params + 16 * adapters
        fields = "--lora.rank" if 16 * adapters > 4 * params else f"the model ({config.name})"
    check_fits(f"Training {config.name or 'this model'} ({params:,} parameters)", state // shards, f"lower {fields}",
               device)
    tokens = args.micro_batch_size * min(args.max_seq_length or config.block_size, config.block_size)
    activations = 2 * tokens * (8 * config.n_layer * config.n_embd + config.padded_vocab_size)
    check_fits(f"A micro-batch of {args.micro_batch_size} x {tokens // args.micro_batch_size} tokens", activations,
               "lower --train.micro_batch_size or --train.max_seq_length", device)


def schedule(args: TrainArgs, tokens_per_step: int, world_size: int) -> tuple[int, int]:
    """(max_steps, gradient accumulation steps), with the batch sizes checked against each other."""
    accumulation = check_batch(args, world_size)
    if args.max_steps is None and args.max_tokens is None:
        raise ValueError("Give the length of the run: --train.max_steps or --train.max_tokens.")
    max_steps = args.max_steps if args.max_steps is not None else math.ceil(args.max_tokens / tokens_per_step)
    return max_steps, accumulation


def check_window(max_seq_length: int | None, config) -> int:
    """The training window: --train.max_seq_length, at most the model's block_size (its default)."""
    if max_seq_length is not None and max_seq_length > config.block_size:
        raise ValueError(f"--train.max_seq_length {max_seq_length} exceeds the model's block_size {config.block_size}:"
                         " lower it, or raise --model.block_size.")
    return max_seq_length or config.block_size


def get_lr(step: int, max_steps: int, args: TrainArgs, peak: float | None = None) -> float:
    """Linear warmup to the peak (default learning_rate), then cosine decay to min_lr at lr_decay_steps (default
    max_steps); a group with another peak decays to the same fraction of its peak as the backbone does."""
    peak = args.learning_rate if peak is None else peak
    end = args.lr_decay_steps or max_steps
    floor = args.min_lr * peak / args.learning_rate if args.learning_rate > 0 else 0.0
    if step < args.warmup_steps:
        return peak * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, end - args.warmup_steps))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def parameter_groups(model: GPT, args: TrainArgs) -> list[dict]:
    """Weight decay on matrices only (none on norms, biases, temperatures and gates); SSA's position slopes, its
    token-term weights and the gates train at their own peak learning rates (default: the backbone's)."""
    added = model.added_parameter_groups()
    own = {id(p) for params in added.values() for p in params}
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters()}.values():
        if p.requires_grad and id(p) not in own:
            (decay if p.ndim >= 2 else no_decay).append(p)
    peaks = {"position": args.ssa_position_lr, "token": args.ssa_token_lr, "gate": args.gate_lr}
    groups = [dict(name="decay", params=decay, weight_decay=args.weight_decay, peak_lr=args.learning_rate),
              dict(name="no_decay", params=no_decay, weight_decay=0.0, peak_lr=args.learning_rate)]
    for name, params in added.items():
        peak = peaks[name] if peaks[name] is not None else args.learning_rate
        group = name if name == "gate" else f"ssa_{name}"
        groups.append(dict(name=group, params=[p for p in params if p.requires_grad], weight_decay=0.0, peak_lr=peak))
    return [g for g in groups if g["params"]]


def freeze_backbone(model: GPT) -> None:
    """Train only what the attention's additions add (temperatures, gates)."""
    added = {id(p) for p in model.added_parameters()}
    if not added:
        raise ValueError("--ssa_only needs a model with temperature or gate parameters (add --ssa, or a gate with"
                         " --model.attention_gate headwise).")
    for p in model.parameters():
        p.requires_grad = id(p) in added


def seed_ranks(fabric: L.Fabric, seed: int) -> None:
    """Once the model is built (the same on every process, from `seed`): every process but rank 0 reseeds its
    generator with a seed of its own, so that dropout masks (LoRA's) differ across processes as they do across the
    sequences of one process's batch. One process, and rank 0, draw as before."""
    if fabric.global_rank > 0:
        torch.manual_seed(seed + fabric.global_rank * 2**32)  # seeds lie below 2**32: no two (seed, rank) collide


def build_optimizer(model: GPT, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups`.

    The fused kernel where the parameters' device has one (CPU and CUDA): on two CPU cores it steps pythia-70m about
    three times faster than the per-tensor loop torch uses by default there."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
    return torch.optim.AdamW(parameter_groups(model, args), lr=args.learning_rate,
                             betas=(args.beta1, args.beta2), fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, step: int, max_steps: int, args: TrainArgs) -> None:
    for group in optimizer.param_groups:
        group["lr"] = get_lr(step, max_steps, args, peak=group["peak_lr"])


def training_step(fabric: L.Fabric, model, inputs: torch.Tensor, targets: torch.Tensor, accumulation: int) -> float:
    """Forward and backward over `accumulation` micro-batches; gradients sync only on the last one."""
    total = 0.0
    for i, (x, y) in enumerate(zip(inputs.chunk(accumulation), targets.chunk(accumulation))):
        is_accumulating = i < accumulation - 1
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            loss = model(x, targets=y)
            fabric.backward(loss / accumulation)
        total += loss.detach()
    return fabric.all_reduce(total / accumulation, reduce_op="mean").item()


@torch.no_grad()
def validate(fabric: L.Fabric, model, batches: Batches) -> float:
    """Mean loss over every validation token of every process. Every process runs as many forward passes as the
    busiest one (a forward pass under DDP or FSDP is a collective: one process with fewer batches would leave the
    others waiting forever); the extra passes have no targets and add nothing."""
    model.eval()
    mine = batches.val(fabric.global_rank, fabric.world_size)
    passes = len(mine)
    if fabric.world_size > 1:
        passes = int(fabric.all_reduce(torch.tensor(passes, device=fabric.device), reduce_op="max").item())
    if len(mine) < passes:  # one token, no target: the smallest pass that takes part in the collectives
        mine += [(torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), -100))] * (passes - len(mine))
    total = torch.zeros(2, dtype=torch.float64, device=fabric.device)  # summed loss, tokens
    for x, y in mine:
        y = y.to(fabric.device)
        tokens = (y != -100).sum()
        loss = model(x.to(fabric.device), targets=y).double()
        total += torch.stack((torch.where(tokens > 0, loss * tokens, 0.0), tokens.double()))
    model.train()
    total = fabric.all_reduce(total, reduce_op="sum")
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def fit(
    fabric: L.Fabric,
    model,
    optimizer: torch.optim.Optimizer,
    state: dict,
    batches: Batches,
    args: TrainArgs,
    eval_args: EvalArgs,
    tokens_per_sequence: int,
    save,
    flops_per_micro_batch: int | None = None,
) -> None:
    """Train until max_steps; `save(name)` writes a checkpoint. `state` holds the counters that resume needs."""
    max_steps, accumulation = schedule(args, args.global_batch_size * tokens_per_sequence, fabric.world_size)
    if state["step"] > 0:  # resumed: refused before anything is written when the run already went that far
        check_resume_point(state["step"], max_steps)
        per_step = args.global_batch_size * tokens_per_sequence
        if state["tokens"] != state["step"] * per_step:
            raise ValueError(f"The checkpoint trained {state['tokens']:,} tokens in {state['step']} steps, not"
                             f" {per_step:,} per step as --train.global_batch_size {args.global_batch_size} and windows"
                             f" of {tokens_per_sequence} tokens would: resume with the run's own batch size and"
                             " window, or start a new run.")
    throughput = ThroughputMonitor(fabric, window_size=10)
    progress = progress_bar(total=max_steps, initial=state["step"], desc="training", unit="step",
                            disable=fabric.global_rank != 0)
    flops_per_step = flops_per_micro_batch * accumulation if flops_per_micro_batch else None  # one process's
    if eval_args.initial_validation and state["step"] == 0:
        log_validation(fabric, model, batches, state)
    started = time.perf_counter()
    batches = Prefetched(batches, fabric.device)
    with stop_on_interrupt() as interrupted, contextlib.closing(progress), contextlib.closing(batches):
        while state["step"] < max_steps:
            loss = optimizer_step(fabric, model, optimizer, batches, state["step"], args, max_steps, accumulation)
            state["step"] += 1
            state["tokens"] += args.global_batch_size * tokens_per_sequence
            state["history"].append({"step": state["step"], "tokens": state["tokens"], "train_loss": loss})
            log_step(fabric, throughput, progress, state, loss, optimizer, args, time.perf_counter() - started,
                     flops_per_step)
            if is_due(state["step"], eval_args.interval, max_steps):
                log_validation(fabric, model, batches, state)
            saved = is_due(state["step"], args.save_interval, max_steps)
            if saved:
                save(f"step-{state['step']:08d}")
            signum = interrupted()
            if fabric.world_size > 1:  # every rank stops at the same step, or the others would wait forever, and for
                # the same reason: a rank that the signal reaches after its own check learns of it here, so the
                # largest number wins (SIGTERM 15 over SIGINT 2) and every rank says "Terminated" and exits 143
                signum = int(fabric.all_reduce(torch.tensor(signum, device=fabric.device), reduce_op="max"))
            if signum:  # Ctrl-C or SIGTERM: stop here, between steps, with this step saved
                if not saved:
                    save(f"step-{state['step']:08d}")
                raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    save("final")  # before the last validation, so that a failure there cannot lose the trained weights
    if eval_args.final_validation:
        log_validation(fabric, model, batches, state)
    finish_logging(fabric)


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[Callable[[], int]]:
    """Within the block the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) only asks the loop to stop at its
    next safe point (the end of a step, where it saves a checkpoint); a second one stops at once. Yields the question
    "which signal asked?" (0: none)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    asked = []

    def handler(signum, frame) -> None:
        if asked:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        asked.append(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: asked[0] if asked else 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def optimizer_step(fabric: L.Fabric, model, optimizer, batches: Batches, step: int, args: TrainArgs, max_steps: int,
                   accumulation: int) -> float:
    """One optimizer step on global batch `step`; a non-finite loss stops the run before the weights change."""
    set_lr(optimizer, step, max_steps, args)
    inputs, targets = batches.train(step, fabric.global_rank, fabric.world_size)
    loss = training_step(fabric, model, inputs.to(fabric.device), targets.to(fabric.device), accumulation)
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"The training loss became {loss} at step {step + 1}; stopping without saving. The last good"
            " checkpoint is intact: lower --train.learning_rate or raise --train.warmup_steps and resume."
        )
    fabric.clip_gradients(model, optimizer, max_norm=args.max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def log_step(fabric: L.Fabric, throughput: ThroughputMonitor, progress: tqdm, state: dict, loss: float, optimizer,
             args: TrainArgs, elapsed: float, flops_per_step: int | None) -> None:
    """Loss, learning rate and throughput (tokens/s, FLOPs/s) to the logger and the progress bar."""
    throughput.update(time=elapsed, **throughput_counts(state, args, fabric.world_size, flops_per_step))
    if state["step"] % args.log_interval == 0:
        metrics = {"train_loss": loss, "lr": optimizer.param_groups[0]["lr"], "tokens": state["tokens"],
                   **throughput.compute()}
        fabric.log_dict(metrics, step=state["step"])
        tokens_per_sec = metrics.get("items_per_sec", metrics.get("device/items_per_sec", 0.0))  # all processes
        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_sec:.0f}" if tokens_per_sec else "-",
                             refresh=False)
    progress.update()


def throughput_counts(state: dict, args: TrainArgs, world_size: int, flops_per_step: int | None) -> dict:
    """What Lightning's Throughput expects after each step: running totals of batches, samples and tokens seen by
    this process, and the FLOPs this process did since the last update (one optimizer step)."""
    return dict(batches=state["step"], samples=state["step"] * args.global_batch_size // world_size,
                lengths=state["tokens"] // world_size, flops=flops_per_step)


def is_due(step: int, interval: int | None, max_steps: int) -> bool:
    """Every `interval` steps, but not at the last one (the final validation and checkpoint cover it)."""
    return bool(interval) and step % interval == 0 and step < max_steps


def micro_batch_flops(config: Config, micro_batch: int, block_size: int) -> int:
    """Forward and backward FLOPs of one micro-batch, counted on the meta device."""
    with torch.device("meta"):
        meta_model = GPT(config)
        x = torch.randint(0, 1, (micro_batch, block_size))
        return measure_flops(meta_model, lambda: meta_model(x, targets=x), lambda loss: loss)


class History(list):
    """The run's records (one per step and per validation), kept in memory and appended to history.jsonl beside the
    logs as they come (on rank 0), so that checkpoints need not carry them."""

    def __init__(self, path: Path | None, records: list[dict]) -> None:
        super().__init__(records)
        self.path = path
        if path is not None and path.exists():  # keep this run's records so far; drop those of an interrupted run
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            tmp.replace(path)

    def append(self, record: dict) -> None:
        super().append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_history(path: Path, until_step: int) -> list[dict]:
    """The records of history.jsonl up to the resumed step. A torn last line (what a kill or a full disk during the
    append leaves) is dropped, saying so; a damaged line before it is an error naming the file and the line."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError:
            if number == len(lines):
                print(f"{path}: its last line is incomplete (an interrupted write); dropped it and resumed.")
                break
            raise ValueError(f"{str(path)!r}: line {number} is not a history record; restore the file or remove the"
                             " line.") from None
        records.append(record)
    return [r for r in records if r["step"] <= until_step]


def setup_training(fabric: L.Fabric, model: GPT, args: TrainArgs, resume_dir: Path | None, out_dir: Path,
                   compile: bool = False):
    """The model and optimizer set up by Fabric (each block compiled with `compile`), and the state that checkpoints
    hold, restored when resuming."""
    if compile:
        model.compile_blocks()
    model = fabric.setup_module(model)
    # after the set-up: FSDP2 replaces every parameter by its shard, which the optimizer must hold
    optimizer = fabric.setup_optimizers(build_optimizer(module_of(model), args))
    state = {"model": model, "optimizer": optimizer, "step": 0, "tokens": 0}
    records = []
    set_interrupt_note("no checkpoint was written yet.")
    if resume_dir is not None:
        fabric.print(f"Resuming from {resume_dir}")
        inside = load_training_state(fabric, resume_dir, state)
        records = read_history(Path(out_dir) / HISTORY_FILENAME, state["step"]) or inside
        set_interrupt_note(f"no new checkpoint since {resume_dir}; continue the run with --resume auto.")
    state["history"] = History(Path(out_dir) / HISTORY_FILENAME if fabric.global_rank == 0 else None, records)
    return model, optimizer, state


def write_history(fabric: L.Fabric, state: dict, out_dir: Path, title: str) -> None:
    """history.json and the loss curve loss.png, on rank 0."""
    if fabric.global_rank == 0:
        plot_history(state["history"], Path(out_dir) / "loss.png", title)
        (Path(out_dir) / "history.json").write_text(json.dumps(state["history"]))
        fabric.print(f"Saved {Path(out_dir) / 'final'} and {Path(out_dir) / 'loss.png'}")


def log_validation(fabric: L.Fabric, model, batches: Batches, state: dict) -> float:
    loss = validate(fabric, model, batches)
    state["history"].append({"step": state["step"], "tokens": state["tokens"], "val_loss": loss})
    fabric.log_dict({"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}, step=state["step"])
    if fabric.global_rank == 0:  # through tqdm, so that the line does not land on the progress bar
        tqdm.write(f"step {state['step']}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f}")
    return loss


def hyperparameters(**kwargs) -> dict:
    """The run's arguments as plain YAML-able values."""
    plain = {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in kwargs.items()}
    return json.loads(json.dumps(plain, default=str))

