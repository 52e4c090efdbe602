"""Pretraining through its real entry point, on a small corpus prepared by the real prepare step."""

import csv
import dataclasses
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_gpt import GPT
from lit_gpt.checkpoint import is_checkpoint, load_checkpoint
from lit_gpt.data.prepare import BUNDLED_CORPUS, prepare
from lit_gpt.generation import generate_text
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.training import EvalArgs, TrainArgs
from lit_gpt.utils import run_cli
from pretrain.openwebtext import DataArgs, setup

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pretrain" / "openwebtext.py"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "corpus.txt").write_text(lzma.decompress(BUNDLED_CORPUS[1].read_bytes()).decode()[:400_000])
    return prepare(str(folder / "corpus.txt"), folder / "prepared", train_tokenizer=512, val_fraction=0.05)


def tiny(data_dir, out_dir, **train) -> dict:
    """Arguments of a seconds-long run of the debug model."""
    args = dict(global_batch_size=8, micro_batch_size=4, max_steps=6, max_seq_length=64, learning_rate=1e-2,
                min_lr=1e-3, warmup_steps=2, save_interval=3)
    args.update(train)
    return dict(model_name="debug", model={"vocab_size": 512}, data=DataArgs(dir=data_dir), out_dir=out_dir,
                train=TrainArgs(**args), eval=EvalArgs(interval=3, max_iters=2, initial_validation=True))


def cli_args(data_dir, out_dir, *extra) -> list[str]:
    return ["--model_name", "debug", "--model.vocab_size", "512", "--data.dir", str(data_dir),
            "--out_dir", str(out_dir), "--train.global_batch_size", "8", "--train.micro_batch_size", "4",
            "--train.max_seq_length", "64", "--train.learning_rate", "0.01", "--train.warmup_steps", "2",
            "--eval.interval", "3", "--eval.max_iters", "2", *extra]


def test_pretraining_writes_checkpoints_that_the_other_tools_load(data_dir, tmp_path):
    setup(**tiny(data_dir, tmp_path / "run"))
    run = tmp_path / "run"
    assert is_checkpoint(run / "step-00000003") and is_checkpoint(run / "final")
    assert (run / "loss.png").stat().st_size > 0
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history if "train_loss" in h] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()] == history
    state = torch.load(run / "step-00000003" / "training_state.pth", weights_only=True)
    assert "history" not in state and state["step"] == 3  # the history grows with the run: not in every checkpoint
    val = [h["val_loss"] for h in history if "val_loss" in h]
    assert len(val) == 3 and val[-1] < val[0]  # initial, step 3, final
    model = load_checkpoint(run / "final")
    assert model.config.vocab_size == 512
    text = generate_text(model.eval(), Tokenizer(run / "final"), "The", max_new_tokens=5)
    assert isinstance(text, str)
    metrics = list(csv.DictReader(open(run / "logs" / "csv-1" / "metrics.csv")))
    assert any(row.get("val_ppl") for row in metrics)


@pytest.mark.parametrize("spelling", ["flag", "field"])
def test_ssa_switch_reaches_the_model(data_dir, tmp_path, spelling):
    args = tiny(data_dir, tmp_path / "run", max_steps=2, save_interval=None)
    if spelling == "flag":  # --ssa, the shorthand of --model.attention_temperature ssa (as in fine-tuning)
        args["ssa"] = True
    else:
        args["model"]["attention_temperature"] = "ssa"
    args["train"] = dataclasses.replace(args["train"], ssa_position_lr=0.1, ssa_token_lr=0.1)
    setup(**args)
    model = load_checkpoint(tmp_path / "run" / "final")
    assert model.config.attention_temperature == "ssa"
    assert model.transformer.h[0].attn.query_temperature.token_weight.abs().sum() > 0  # it trained


def test_gradient_accumulation_equals_one_large_batch(data_dir, tmp_path):
    setup(**tiny(data_dir, tmp_path / "big", micro_batch_size=8, max_steps=4, save_interval=None))
    setup(**tiny(data_dir, tmp_path / "small", micro_batch_size=2, max_steps=4, save_interval=None))
    losses = [[h["train_loss"] for h in json.loads((tmp_path / r / "history.json").read_text()) if "train_loss" in h]
              for r in ("big", "small")]
    assert len(losses[0]) == 4  # one optimizer step per global batch
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)
    big, small = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("big", "small"))
    for name in big:  # Adam normalises tiny gradients: float reordering may move a weight by ~1e-5 at lr 1e-2
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-4)


def losses_by_step(run: Path) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run logs the steps after its checkpoint again)."""
    losses = {}
    for log in sorted((run / "logs").glob("csv-*/metrics.csv"), key=lambda p: int(p.parent.name.split("-")[1])):
        losses.update({int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(open(log)) if r["train_loss"]})
    return losses


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_every_loss(data_dir, tmp_path):
    args = ["--train.max_steps", "20", "--train.save_interval", "5", "--train.micro_batch_size", "8",
            "--train.global_batch_size", "16", "--model.n_embd", "128"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, SCRIPT, *cli_args(data_dir, tmp_path / "whole", *args)], check=True, env=env,
                   capture_output=True)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, SCRIPT, *cli_args(data_dir, interrupted, *args)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (interrupted / "step-00000010").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "final").exists(), "the run finished before it could be killed"
    killed_at = max(losses_by_step(interrupted))
    subprocess.run([sys.executable, SCRIPT, *cli_args(data_dir, interrupted, *args, "--resume", "auto")],
                   check=True, env=env, capture_output=True)
    whole, resumed = losses_by_step(tmp_path / "whole"), losses_by_step(interrupted)
    assert sorted(resumed) == list(range(1, 21)) and killed_at < 20
    assert resumed == whole  # bit for bit
    history = json.loads((interrupted / "history.json").read_text())
    steps = [h["step"] for h in history if "train_loss" in h]
    assert steps == list(range(1, 21))  # each step once: records after the checkpoint were dropped on resume
    assert {h["step"]: h["train_loss"] for h in history if "train_loss" in h} == whole


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(data_dir, tmp_path):
    args = ["--train.max_steps", "4", "--train.micro_batch_size", "2", "--train.save_interval", "2"]
    subprocess.run([sys.executable, SCRIPT, *cli_args(data_dir, tmp_path / "one", *args)], check=True,
                   capture_output=True)
    result = subprocess.run([sys.executable, SCRIPT, *cli_args(data_dir, tmp_path / "two", *args, "--devices", "2")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    # the same global batches, the gradient averaged over two processes by all-reduce instead of over one
    torch.testing.assert_close(torch.tensor(list(two.values())), torch.tensor(list(one.values())), rtol=1e-5,
                               atol=1e-5)
    w1, w2 = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("one", "two"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = cli_args(data_dir, run, "--train.max_steps", "6", "--train.save_interval", "1", "--train.warmup_steps",
                    "1", "--train.learning_rate", "1e12", "--train.min_lr", "1e12", "--train.max_norm", "1e30")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(setup, argv)
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: The training loss became") and "last good checkpoint is intact" in message
    saved = sorted(p.name for p in run.glob("step-*"))
    assert saved and not (run / "final").exists()
    assert load_checkpoint(run / saved[-1]) is not None
    assert not list(run.glob(".*.tmp"))


BAD_INPUTS = {
    "missing data": (["--data.dir", "{tmp}/nowhere"], "No prepared data in"),
    "tokens beyond the vocabulary": (["--model.vocab_size", "256"], "holds token ids up to 511"),
    "window longer than the data": (["--train.max_seq_length", "100000", "--model.block_size", "100000"],
                                    "do not fit the data"),
    "window longer than the model": (["--train.max_seq_length", "512"], "exceeds the model's block_size 256"),
    "micro batch not dividing the global batch": (["--train.micro_batch_size", "3"], "must be a multiple of"),
    "resume from a non-checkpoint": (["--resume", "{tmp}"], "is not a training checkpoint"),
    "unknown preset": (["--model_name", "gpt3"], "Unknown model preset 'gpt3'"),
    "config field typo": (["--model.n_layers", "2"], "Unknown config field 'n_layers'. Did you mean 'n_layer'"),
    "no steps": (["--train.max_steps", "0"], "--train.max_steps must be at least 1, got 0"),
    "negative steps": (["--train.max_steps", "-3"], "--train.max_steps must be at least 1, got -3"),
    "no clipping norm": (["--train.max_norm", "0"], "--train.max_norm must be above 0"),
    "negative weight decay": (["--train.weight_decay", "-0.1"], "--train.weight_decay must be at least 0"),
    "save interval 0": (["--train.save_interval", "0"], "--train.save_interval must be at least 1"),
    "micro batch 0": (["--train.micro_batch_size", "0"], "--train.micro_batch_size must be at least 1"),
    "global batch 0": (["--train.global_batch_size", "0"], "--train.global_batch_size must be at least 1"),
    "log interval 0": (["--train.log_interval", "0"], "--train.log_interval must be at least 1"),
    "no validation batches": (["--eval.max_iters", "0"], "--eval.max_iters must be at least 1"),
    "negative slope rate": (["--train.ssa_position_lr", "-1"], "--train.ssa_position_lr must be at least 0"),
    "beta of one": (["--train.beta2", "1.0"], "--train.beta2 must lie in [0, 1)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(data_dir, tmp_path, capsys, case):
    extra, expected = BAD_INPUTS[case]
    run = tmp_path / "run"
    argv = cli_args(data_dir, run, "--train.max_steps", "2") + [a.format(tmp=tmp_path) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(setup, argv)
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not run.exists()


def test_unknown_flag_is_refused(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(setup, cli_args(data_dir, tmp_path / "run", "--train.max_steps", "2", "--train.lerning_rate", "1"))
    assert exit_info.value.code != 0
    assert "train.lerning_rate" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_earlier_run_is_not_overwritten(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    setup(**tiny(data_dir, run, max_steps=3))
    before = (run / "final" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit):
        run_cli(setup, cli_args(data_dir, run, "--train.max_steps", "3"))
    assert "holds an earlier run: pass --resume auto" in capsys.readouterr().err
    assert (run / "final" / "model.safetensors").read_bytes() == before


def test_no_arguments_say_how_to_prepare_or_run_the_demo(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "scripts/prepare_openwebtext.py" in result.stderr and "configs/demo.yaml" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_logged_throughput_is_the_true_rate(world_size):
    """A run with known work: each process does 5e11 FLOPs and 16,384 tokens per 0.5 s step, so every process runs
    at 1e12 FLOP/s and 32,768 tokens/s, and all of them together at world_size times that, at every step."""
    from lightning.fabric.utilities.throughput import Throughput

    from lit_gpt.training import throughput_counts

    args = TrainArgs(global_batch_size=16 * world_size, micro_batch_size=16)
    throughput = Throughput(world_size=world_size, window_size=10)
    state = {"step": 0, "tokens": 0}
    for step in range(1, 301):
        state["step"], state["tokens"] = step, step * 16 * 1024 * world_size
        throughput.update(time=0.5 * step, **throughput_counts(state, args, world_size, flops_per_step=int(5e11)))
        if step in (20, 300):
            metrics = throughput.compute()
            assert metrics["device/flops_per_sec"] == pytest.approx(1e12)
            assert metrics["device/items_per_sec"] == pytest.approx(32768)
            if world_size > 1:
                assert metrics["items_per_sec"] == pytest.approx(32768 * world_size)
                assert metrics["flops_per_sec"] == pytest.approx(1e12 * world_size)


def test_weight_decay_falls_on_matrices_only():
    from lit_gpt.config import Config
    from lit_gpt.training import parameter_groups

    model = GPT(Config.from_name("debug", bias=True, attention_temperature="ssa", ssa_token_weights="separate"))
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in parameter_groups(model, TrainArgs())}
    assert all(name.endswith("weight") and "norm" not in name and "temperature" not in name
               for name in groups["decay"])
    assert {n.rsplit(".", 1)[-1] for n in groups["no_decay"]} == {"weight", "bias"}  # norms' weights and biases
    assert all("norm" in n or "ln_f" in n or n.endswith("bias") for n in groups["no_decay"])
    assert all("temperature" in n for n in groups["ssa_position"] + groups["ssa_token"])
    assert sorted(n for g in groups.values() for n in g) == sorted(names.values())


def test_learning_rate_schedule_warms_up_then_decays_to_min_lr():
    from lit_gpt.training import get_lr

    args = TrainArgs(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [get_lr(step, 110, args) for step in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then never rises
    assert lrs[60] == pytest.approx(5.5e-4)  # half way through the cosine
    assert lrs[110] == pytest.approx(1e-4)


def test_lr_decay_steps_sets_the_schedule_apart_from_the_run_length():
    """nanoGPT's lr_decay_iters: a 40-step run with lr_decay_steps 110 follows the 110-step cosine, then min_lr."""
    import math

    from lit_gpt.training import get_lr

    args = TrainArgs(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, lr_decay_steps=110)
    cosine = lambda step: 1e-4 + 0.5 * (1 + math.cos(math.pi * (step - 10) / 100)) * 9e-4  # noqa: E731
    assert [get_lr(s, 40, args) for s in (10, 35, 40)] == pytest.approx([cosine(10), cosine(35), cosine(40)])
    assert get_lr(60, 40, args) == pytest.approx(5.5e-4)  # max_steps does not enter the schedule
    assert get_lr(200, 300, args) == pytest.approx(1e-4)  # past lr_decay_steps: the floor


def test_a_run_continued_in_parts_gives_the_losses_of_one_run(data_dir, tmp_path):
    """With lr_decay_steps fixed, 4 steps then --resume to 8 train exactly as one 8-step run does (the study's
    runs that stop when they reach a bar are trained like this)."""
    setup(**tiny(data_dir, tmp_path / "whole", max_steps=8, lr_decay_steps=8))
    setup(**tiny(data_dir, tmp_path / "parts", max_steps=4, lr_decay_steps=8))
    setup(**dict(tiny(data_dir, tmp_path / "parts", max_steps=8, lr_decay_steps=8), resume="auto"))
    assert losses_by_step(tmp_path / "parts") == losses_by_step(tmp_path / "whole")


def test_progress_redirected_to_a_file_is_whole_lines(data_dir, tmp_path):
    """Not a terminal: no carriage returns, a line with the step count, ETA and loss, and validation lines apart."""
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        subprocess.run([sys.executable, SCRIPT, *cli_args(data_dir, tmp_path / "run", "--train.max_steps", "3")],
                       check=True, stderr=stderr, stdout=subprocess.PIPE)
    text = log.read_text()
    assert "\r" not in text
    last = [line for line in text.splitlines() if line.startswith("training")][-1]
    assert "3/3" in last and "loss=" in last and "<" in last  # tqdm's elapsed<remaining


@pytest.mark.parametrize("columns", [0, 30, 200])
def test_progress_bar_in_a_terminal_keeps_a_width(monkeypatch, columns):
    import shutil

    from lit_gpt import utils

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((columns, 24)))
    bar = utils.progress_bar(total=10, desc="x", file=open(os.devnull, "w"))
    assert type(bar) is not utils.LineProgress
    assert (bar.ncols == 100) if columns == 0 else bar.dynamic_ncols
    bar.close()


def test_a_second_run_into_the_same_folder_is_refused(data_dir, tmp_path, capsys):
    from lit_gpt.checkpoint import RunLock

    run = tmp_path / "run"
    lock = RunLock(run)  # another run holds the folder
    try:
        with pytest.raises(SystemExit):
            run_cli(setup, cli_args(data_dir, run, "--train.max_steps", "2", "--resume", "auto"))
        assert f"is in use by another run (process {os.getpid()})" in capsys.readouterr().err
        assert [p.name for p in run.iterdir()] == [".lock"]  # nothing written
    finally:
        lock.release()
    setup(**tiny(data_dir, run, max_steps=2, save_interval=None))  # free again
    assert not (run / ".lock").exists() and (run / "final").is_dir()


def test_a_finished_run_is_not_replaced_by_resuming_it(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    setup(**tiny(data_dir, run, max_steps=4, save_interval=None))  # only final/ holds a training state
    before = {p: p.read_bytes() for p in (run / "final").iterdir()} | {run / "history.json": (run / "history.json")
                                                                      .read_bytes()}
    for steps in ("4", "3"):
        with pytest.raises(SystemExit):
            run_cli(setup, cli_args(data_dir, run, "--train.max_steps", steps, "--resume", "auto"))
        assert "already reached step 4" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    setup(**tiny(data_dir, run, max_steps=6, save_interval=None), resume="auto")  # continuing forward is fine
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history if "train_loss" in h] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("speedup, chosen", [(2.0, "bf16-mixed"), (1.0, "32-true")])
def test_precision_auto_follows_the_bf16_probe(monkeypatch, capsys, speedup, chosen):
    import lit_gpt.fabric as fabric

    monkeypatch.setattr(fabric.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fabric, "bf16_speedup", lambda: speedup)
    assert fabric.choose_precision("auto") == chosen
    assert f"--precision auto: {chosen} (bf16 matrix products run {speedup:.1f}x" in capsys.readouterr().out
    assert fabric.choose_precision(None) == "32-true"  # the default stays float32 on every CPU
    hint = capsys.readouterr().out
    assert ("--precision auto (bf16-mixed) would use it" in hint) == (speedup >= fabric.FAST_BF16)
    assert fabric.choose_precision("16-true") == "16-true"


def test_the_bf16_probe_reads_the_hardware_through_a_busy_machine(monkeypatch):
    """Another process that takes the cores during a timing only lengthens it: the probe keeps the fastest of its
    interleaved timings of each dtype, so one slowed timing of either does not flip its answer. A fake clock makes
    each float32 timing 4 units and each bf16 one 1 unit, with the machine busy (x30) during one timing of each. The
    clock is the thread's CPU time and the products run on one thread (a second thread that the system sets aside
    holds the whole product up), which the probe restores afterwards."""
    import lit_gpt.fabric as fabric

    clock = {"now": 0.0, "calls": 0}  # timing j (0, 1, ...) runs between the clock's calls 2j + 1 and 2j + 2
    real_matmul, threads = torch.Tensor.__matmul__, []

    def matmul(a, b):
        busy = clock["calls"] in (3, 5)  # the first bf16 timing and the second float32 one
        clock["now"] += (4.0 if a.dtype == torch.float32 else 1.0) * (30 if busy else 1)
        threads.append(torch.get_num_threads())
        return real_matmul(a, b)

    def thread_time():
        clock["calls"] += 1
        return clock["now"]

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    monkeypatch.setattr("time.thread_time", thread_time)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fabric.bf16_speedup(size=4) == pytest.approx(4.0)
        assert set(threads) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def wandb_history(run_dir: Path) -> dict[str, list[float]]:
    """The metrics an offline W&B run recorded, read from its .wandb file (a LevelDB-style log of protobuf records:
    a 7-byte header, then records of 7-byte headers in 32 KiB blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("logs/wandb/offline-run-*/run-*.wandb")
    data, pos, pending, metrics = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    metrics.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    return metrics


def test_wandb_logger_records_the_metrics_offline(data_dir, tmp_path):
    pytest.importorskip("wandb")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path), WANDB_DIR=str(tmp_path))
    args = cli_args(data_dir, tmp_path / "run", "--train.max_steps", "4", "--logger_name", "wandb")
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = wandb_history(tmp_path / "run")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert metrics["train_loss"] == pytest.approx([h["train_loss"] for h in history if "train_loss" in h])
    assert metrics["val_loss"] == pytest.approx([h["val_loss"] for h in history if "val_loss" in h])
    assert {"lr", "tokens", "val_ppl"} <= set(metrics)


def test_wandb_logger_without_wandb_installed_is_one_line(data_dir, tmp_path):
    code = ("import sys; sys.modules['wandb'] = None; sys.argv[0] = 'openwebtext.py'; import runpy;"
            f" runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, *cli_args(data_dir, tmp_path / "run", "--train.max_steps", "2",
                                                                   "--logger_name", "wandb")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --logger_name wandb needs the wandb package")
    assert not (tmp_path / "run" / "final").exists()


def test_compile_is_one_flag_and_reaches_the_blocks(data_dir, tmp_path, monkeypatch, capsys):
    """--compile compiles each block (recorded here instead of compiled, which takes a minute on a CPU); the help of
    every training script lists it once (there was a second one, --train.compile) and says what a null rate means."""
    from finetune.lora import setup as lora_setup

    compiled = []
    monkeypatch.setattr(GPT, "compile_blocks", lambda self, **kwargs: compiled.append(True) or self)
    setup(**tiny(data_dir, tmp_path / "run", max_steps=1), compile=True)
    assert compiled == [True]
    setup(**tiny(data_dir, tmp_path / "plain", max_steps=1))
    assert compiled == [True]
    for function in (setup, lora_setup):
        with pytest.raises(SystemExit):
            run_cli(function, ["--help"])
        text = capsys.readouterr().out
        assert "--compile" in text and "--train.compile" not in text
        assert "default the backbone's" not in text and "(null: learning_rate)" in text.replace("\n", " ").replace(
            "  ", " ")


def test_prefetched_batches_are_the_batches_of_each_step_and_the_next_is_read_ahead():
    """The next step's batch is read on a background thread while a step computes; every step still gets its own
    batch, also after a jump (a resumed run) and under another rank or process count."""
    import threading

    from lit_gpt.training import Prefetched

    class Recorded:
        def __init__(self) -> None:
            self.calls = []

        def train(self, step, rank, world_size):
            self.calls.append((step, rank, world_size, threading.current_thread().name))
            value = torch.full((2, 3), step * 10 + rank, dtype=torch.long)
            return value, value + 1

        def val(self, rank, world_size):
            return [(torch.zeros(1), torch.ones(1))]

    source = Recorded()
    batches = Prefetched(source, torch.device("cpu"))
    try:
        for step, rank, world_size in [(0, 0, 1), (1, 0, 1), (2, 0, 1), (7, 1, 2), (8, 1, 2)]:
            inputs, targets = batches.train(step, rank, world_size)
            assert torch.equal(inputs, torch.full((2, 3), step * 10 + rank)) and torch.equal(targets, inputs + 1)
            assert batches.pending[0] == (step + 1, rank, world_size)  # read ahead while this step runs
        assert all(name.startswith("prefetch") for *_, name in source.calls)
        assert [call[:3] for call in source.calls].count((2, 0, 1)) == 1  # read once, ahead, not again
        assert len(batches.val(0, 1)) == 1
    finally:
        batches.close()
