"""Fabric set-up for the training scripts: precision, strategy (DDP, FSDP), loggers, and rank-zero helpers."""

from pathlib import Path

import lightning as L
import torch

from lit_gpt.utils import USER_ERRORS


def choose_precision(precision: str | None) -> str:
    if precision is not None:
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def build_fabric(devices: int, num_nodes: int, strategy: str, precision: str | None, out_dir: Path,
                 logger_name: str) -> L.Fabric:
    """One process or many: DDP, or FSDP sharding whole transformer blocks, when devices * num_nodes > 1."""
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
    from lightning.fabric.strategies import FSDPStrategy

    from lit_gpt.model import Block

    if strategy == "fsdp":
        strategy = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="FULL_SHARD")
    elif strategy == "auto" and devices * num_nodes > 1:
        strategy = "ddp"
    if logger_name == "csv":  # each start of a run (a resumed one too) writes its own logs/csv-N/metrics.csv
        runs = len(list((Path(out_dir) / "logs").glob("csv-*")))
        logger = CSVLogger(out_dir, name="logs", version=f"csv-{runs + 1}", flush_logs_every_n_steps=1)
    else:
        logger = TensorBoardLogger(out_dir, name="logs")
    return L.Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy, precision=choose_precision(precision),
                    loggers=[logger])


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
