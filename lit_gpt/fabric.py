"""Fabric set-up for the training scripts: precision, strategy (DDP, FSDP2), loggers, and rank-zero helpers."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from lit_gpt.utils import USER_ERRORS, at_least

FAST_BF16 = 1.5  # bf16 matmul at least this many times float32's counts as native bf16


def bf16_speedup(size: int = 256, repeats: int = 2, rounds: int = 5) -> float:
    """How many times faster this CPU multiplies bf16 matrices than float32 ones, on one thread, timed in the
    thread's own CPU time (`time.thread_time`): time the process waits while other processes hold the cores is not
    counted, and no second thread of the product can be the one the system set aside. The fastest of `rounds`
    interleaved timings of each dtype is kept (what a shared cache or a migration between cores adds is removed the
    same way). On a loaded two-core machine this reads 1.89-1.97x in 8 probes where wall-clock timings on two threads
    read 1.45-1.79x (the demo once printed 56.9x), straddling the 1.5x that --precision auto needs. A few
    milliseconds where bf16 is native; about 0.3 s where it is emulated."""
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        matrices = {dtype: (torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype))
                    for dtype in (torch.float32, torch.bfloat16)}
        best = dict.fromkeys(matrices, float("inf"))
        for a, b in matrices.values():
            a @ b  # the first product of a dtype sets up its kernels
        for _ in range(rounds):
            for dtype, (a, b) in matrices.items():
                started = time.thread_time()
                for _ in range(repeats):
                    a @ b
                best[dtype] = min(best[dtype], time.thread_time() - started)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def choose_precision(precision: str | None) -> str:
    """--precision: as given; by default bf16-mixed on GPUs and 32-true on the CPU (results comparable across
    machines), with one line saying so where the CPU has fast bf16; `auto` picks bf16-mixed on a CPU whose bf16
    matmul is clearly faster than float32 (a quick probe) and says what it chose and why."""
    if precision not in (None, "auto"):
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    speedup = bf16_speedup()
    if precision == "auto":
        chosen = "bf16-mixed" if speedup >= FAST_BF16 else "32-true"
        print(f"--precision auto: {chosen} (bf16 matrix products run {speedup:.1f}x as fast as float32 on this CPU;"
              f" bf16 needs at least {FAST_BF16}x)")
        return chosen
    if speedup >= FAST_BF16:
        print(f"This CPU multiplies bf16 {speedup:.1f}x as fast as float32: --precision auto (bf16-mixed) would use"
              " it; float32 stays the default so that results compare across machines.")
    return "32-true"


@dataclass
class RunArgs:
    """The machinery of a run, the same in pretraining and fine-tuning (the top-level flags of both scripts)."""

    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    precision: str | None = None
    logger_name: Literal["csv", "tensorboard", "wandb"] = "csv"
    compile: bool = False


def check_batch(args, world_size: int) -> int:
    """Micro-batches per process and step; the batch sizes of `args` (the training arguments) checked against each
    other and the processes."""
    per_rank, remainder = divmod(args.global_batch_size, world_size)
    if remainder or per_rank % args.micro_batch_size:
        raise ValueError(
            f"--train.global_batch_size {args.global_batch_size} must be a multiple of --train.micro_batch_size"
            f" {args.micro_batch_size} times the number of processes {world_size}."
        )
    return per_rank // args.micro_batch_size


def check_launch(run: RunArgs, train) -> None:
    """Before any process starts: the batch fits the processes, and a multi-node run knows how to find its nodes (one
    process that lacks them would wait forever for nodes that never come)."""
    at_least(1, devices=run.devices, num_nodes=run.num_nodes)
    check_batch(train, run.devices * run.num_nodes)
    if run.num_nodes > 1:
        check_nodes(run.num_nodes, os.environ)


NODE_VARIABLES = ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT")  # what Lightning reads outside SLURM and torchrun


def check_nodes(num_nodes: int, environ) -> None:
    """Under SLURM (srun) or torchrun the launcher tells each process where the others are; otherwise every node
    needs NODE_RANK, MASTER_ADDR and MASTER_PORT, or it would wait forever (for node 0 on its own address)."""
    if "SLURM_PROCID" in environ or "TORCHELASTIC_RUN_ID" in environ:
        return
    missing = [name for name in NODE_VARIABLES if not environ.get(name)]
    if missing:
        raise ValueError(f"--num_nodes {num_nodes}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not"
                         " set, so this process cannot find the other nodes and would wait forever; start it on every"
                         " node with NODE_RANK (0 .. num_nodes-1), MASTER_ADDR (node 0's address) and MASTER_PORT set,"
                         " or under srun or torchrun, or pass --num_nodes 1.")


def build_fabric(run: RunArgs, out_dir: Path) -> L.Fabric:
    """One process or many: DDP, or FSDP2 sharding every transformer block (and the rest) over all processes, when
    devices * num_nodes > 1."""
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
    from lightning.fabric.strategies import ModelParallelStrategy

    devices, num_nodes, strategy = run.devices, run.num_nodes, run.strategy
    if strategy == "fsdp":  # checkpoints gathered into one file: the same as DDP's, for every tool to read
        strategy = ModelParallelStrategy(shard_blocks, data_parallel_size=devices * num_nodes, tensor_parallel_size=1,
                                         save_distributed_checkpoint=False)
    elif strategy == "auto" and devices * num_nodes > 1:
        strategy = "ddp"
    if run.logger_name == "csv":  # each start of a run (a resumed one too) writes its own logs/csv-N/metrics.csv
        runs = len(list((Path(out_dir) / "logs").glob("csv-*")))
        logger = CSVLogger(out_dir, name="logs", version=f"csv-{runs + 1}", flush_logs_every_n_steps=1)
    elif run.logger_name == "wandb":
        logger = wandb_logger(Path(out_dir))
    else:
        logger = TensorBoardLogger(out_dir, name="logs")
    return L.Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy, precision=choose_precision(run.precision),
                    loggers=[logger])


def shard_blocks(model, mesh):
    """FSDP2 (torch's fully_shard, as torchtitan and LitGPT apply it): each transformer block is one unit, gathered
    for its forward and backward and freed after; the embedding, final norm and head form the root unit. Parameters
    stay float32 (under bf16-mixed, autocast computes in bf16), so SSA's slopes and token weights and their gradient
    reduction are float32 too."""
    from torch.distributed.fsdp import fully_shard

    from lit_gpt.model import Block

    mesh = mesh["data_parallel"]
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def wandb_logger(out_dir: Path):
    """Lightning's Weights & Biases logger, the run named after its folder; project, entity and mode come from W&B's
    own settings (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE=offline, ...), its files go to out_dir/logs."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError("--logger_name wandb needs the wandb package, which is not installed: pip install -e"
                         " '.[wandb]' (or pip install wandb), or choose --logger_name csv.") from None
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(name=out_dir.resolve().name, save_dir=str(out_dir / "logs"))


def launch_and_close(fabric: L.Fabric, function, *args) -> None:
    """`fabric.launch(function, *args)`, then `close_process_group`. A rank that failed never gets there: its exit
    ends the others' wait with an error."""
    fabric.launch(function, *args)
    close_process_group()


def close_process_group() -> None:
    """In a run of several processes, every rank waits for the others and closes its process group. Lightning closes
    it at exit for NCCL only, and a gloo process that ends with its group open can abort as it exits ("terminate
    called without an active exception", SIGABRT; pytorch/pytorch#190489), after the run has saved."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def finish_logging(fabric: L.Fabric) -> None:
    """Flush every logger at the end of a run; a W&B run is also finished (its summary and files written)."""
    for logger in fabric.loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger" and fabric.global_rank == 0:
            logger.experiment.finish()


def on_rank_zero(fabric: L.Fabric, function, *args):
    """Run `function` on rank 0 only and hand its result, or its user-facing error, to every rank."""
    result = None
    if fabric.global_rank == 0:
        try:
            result = ("ok", function(*args))
        except USER_ERRORS as error:
            result = ("error", error)
    result = fabric.broadcast(result, src=0)
    if result[0] == "error":
        raise result[1]
    return result[1]
