"""Several processes on the CPU (gloo), as a multi-GPU or multi-node run would have them: no hangs, one line when a
process is lost, dropout of its own on each process, a multi-node start that cannot find its nodes refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.checkpoint import load_checkpoint, save_model_dir
from lit_gpt.data.prepare import GPT2_TOKENIZER
from lit_gpt.fabric import check_nodes, close_process_group
from lit_gpt.lora import LoRAArgs, add_lora
from lit_gpt.training import seed_ranks

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "finetune" / "full.py")


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "debug"
    torch.manual_seed(0)
    model = GPT(Config.from_name("debug", vocab_size=50257, block_size=64))
    save_model_dir(model, folder, tokenizer_dir=GPT2_TOKENIZER)
    return folder


def records(folder: Path, count: int) -> Path:
    path = folder / "records.json"
    path.write_text(json.dumps([{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i % 7 + 1)))}
                                for i in range(count)]))
    return path


def finetune_cli(base: Path, data: Path, out_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, FINETUNE, "--checkpoint_dir", str(base), "--data", str(data), "--out_dir", str(out_dir),
            "--train.global_batch_size", "4", "--train.micro_batch_size", "1", "--train.max_seq_length", "64",
            "--train.learning_rate", "1e-3", "--train.warmup_steps", "1", "--eval.max_iters", "100", *extra]


def val_losses(run: Path) -> list[float]:
    return [h["val_loss"] for h in json.loads((run / "history.json").read_text()) if "val_loss" in h]


@pytest.mark.slow
def test_a_rank_with_fewer_validation_batches_does_not_hang_the_run(small_base, tmp_path):
    """16 records hold out one for validation: rank 0 has one batch, rank 1 none. A forward pass under DDP is a
    collective, so rank 0 used to wait forever; now the validation equals one process's."""
    data = records(tmp_path, 16)
    steps = ["--train.max_steps", "2", "--eval.interval", "1", "--eval.initial_validation", "true"]
    one = subprocess.run(finetune_cli(small_base, data, tmp_path / "one", *steps), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(finetune_cli(small_base, data, tmp_path / "two", *steps, "--devices", "2"),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(val_losses(tmp_path / "two")) == 3  # before, after step 1, after the last step
    torch.testing.assert_close(val_losses(tmp_path / "two"), val_losses(tmp_path / "one"), rtol=1e-5, atol=1e-5)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_a_killed_rank_ends_the_others_in_one_line(small_base, tmp_path):
    """Rank 1 killed mid-run (out of memory, a node lost): rank 0 sees only a broken connection. It says so in one
    line, naming itself and where the run can continue from, not in a 60-line traceback."""
    run = tmp_path / "run"
    process = subprocess.Popen(finetune_cli(small_base, records(tmp_path, 64), run, "--devices", "2",
                                            "--train.max_steps", "10000", "--train.save_interval", "2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(run.glob("step-*")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
        assert list(run.glob("step-*")), "the run did not reach its first checkpoint"
        (rank_one,) = children(process.pid)
        os.kill(rank_one, signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    lines = [line for line in stderr.splitlines() if line.strip() and not line.lstrip().startswith("training:")]
    assert lines[-1].startswith("error: rank 0 of 2 lost another process of the run (Connection"), lines[-1]
    assert "continue the run with --resume auto" in lines[-1]
    assert "Traceback" not in stderr


def draw_masks(fabric: L.Fabric) -> list:
    fabric.seed_everything(7)
    model = GPT(Config.from_name("debug", vocab_size=64, block_size=8))
    add_lora(model, LoRAArgs(rank=2, dropout=0.5))
    seed_ranks(fabric, 7)
    mask = model.transformer.h[0].attn.qkv.dropout(torch.ones(64)) > 0
    gathered = fabric.all_gather(mask).tolist()  # a list: a tensor would not survive its process
    close_process_group()  # a rank of this ddp_spawn run once aborted in CI as it exited with the group open
    return gathered


def test_each_process_draws_its_own_dropout_masks():
    """Every process used to draw the same LoRA dropout masks (one seed for all): now rank 0 draws what one process
    draws and rank 1 draws others."""
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    ranks = fabric.launch(draw_masks)
    single = draw_masks(L.Fabric(accelerator="cpu", devices=1))
    assert ranks[0] == single
    assert ranks[0] != ranks[1]


def test_a_finished_run_closes_its_process_group_after_every_rank_is_done(monkeypatch):
    """The training scripts launch through launch_and_close: after the run, a rank of a multi-process run waits for the
    others and closes its process group (a gloo process that exits with it open can abort; Lightning closes it for
    NCCL only). One process has no group and nothing to close. The two-process tests here run it for real."""
    from lit_gpt.fabric import launch_and_close

    class Launcher:
        def launch(self, function, *args):
            calls.append("launch")
            function(*args)

    calls = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    for initialized, closed in ((True, ["barrier", "destroy"]), (False, [])):
        calls.clear()
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda value=initialized: value)
        launch_and_close(Launcher(), calls.append, "the run")
        assert calls == ["launch", "the run", *closed]


def test_a_multi_node_start_that_cannot_find_its_nodes_is_refused():
    for environ in ({}, {"MASTER_ADDR": "10.0.0.1"}, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}):
        with pytest.raises(ValueError, match="would wait forever") as error:
            check_nodes(2, environ)
        missing = [name for name in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in environ]
        assert all(name in str(error.value) for name in missing)
    check_nodes(2, {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    check_nodes(2, {"SLURM_PROCID": "3"})  # srun tells every process where the others are
    check_nodes(2, {"TORCHELASTIC_RUN_ID": "x"})  # so does torchrun


@pytest.mark.slow
def test_num_nodes_with_only_master_addr_is_one_line_before_any_work(small_base, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_PORT", "SLURM_PROCID")}
    result = subprocess.run(finetune_cli(small_base, records(tmp_path, 16), tmp_path / "run", "--num_nodes", "2",
                                         "--train.max_steps", "1"),
                            capture_output=True, text=True, timeout=120, env=dict(env, MASTER_ADDR="127.0.0.1"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --num_nodes 2: NODE_RANK, MASTER_PORT are not")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_saves_one_step_and_resumes(small_base, tmp_path):
    """What Slurm does at the end of a job's time: SIGTERM to every process. They need not receive it at the same
    moment: here only rank 1 gets it, the far end of a race in which rank 0 gets it a step later or not at all. Both
    stop at the same step, that step is saved once, every rank says "Terminated" in one line and the run exits 143
    (rank 0, which never got the signal, once stopped as "Interrupted" with 130); --resume auto continues from it."""
    run, data = tmp_path / "run", records(tmp_path, 64)
    args = finetune_cli(small_base, data, run, "--devices", "2", "--train.save_interval", "1000")
    process = subprocess.Popen([*args, "--train.max_steps", "10000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and not (
                (run / "history.jsonl").exists() and len((run / "history.jsonl").read_text().splitlines()) >= 2):
            time.sleep(0.5)
        (rank1,) = children(process.pid)  # Fabric's launcher: rank 0 is the command itself, rank 1 its child
        os.kill(rank1, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, stderr[-2000:]
    (saved,) = run.glob("step-*")
    step = int(saved.name.removeprefix("step-"))
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last == f"Terminated (SIGTERM): the last checkpoint is {saved}; continue the run with --resume auto."
    assert "Traceback" not in stderr and "Interrupted" not in stderr
    resumed = subprocess.run([*args, "--train.max_steps", str(step + 1), "--resume", "auto"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [h["step"] for h in json.loads((run / "history.json").read_text()) if "train_loss" in h]
    assert steps == list(range(1, step + 2))


PRETRAIN = str(ROOT / "pretrain" / "openwebtext.py")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    import lzma

    from lit_gpt.data.prepare import BUNDLED_CORPUS, prepare

    folder = tmp_path_factory.mktemp("corpus")
    (folder / "corpus.txt").write_text(lzma.decompress(BUNDLED_CORPUS[1].read_bytes()).decode()[:200_000])
    return prepare(str(folder / "corpus.txt"), folder / "prepared", train_tokenizer=512, val_fraction=0.05)


def pretrain(prepared: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PRETRAIN, "--model_name", "debug", "--model.vocab_size", "512", "--ssa",
                           "--data.dir", str(prepared), "--out_dir", str(out_dir), "--train.global_batch_size", "8",
                           "--train.micro_batch_size", "2", "--train.max_seq_length", "64", "--train.learning_rate",
                           "0.01", "--train.warmup_steps", "2", "--eval.interval", "2", "--eval.max_iters", "2",
                           *extra], capture_output=True, text=True, timeout=600)


FOUR_STEPS = ("--train.max_steps", "4", "--train.lr_decay_steps", "4")  # a later --train.max_steps cuts it short


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory) -> Path:
    """Four steps in one process: what every run below, in parts or over processes, must equal."""
    run = tmp_path_factory.mktemp("one") / "run"
    result = pretrain(prepared, run, *FOUR_STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def step_losses(run: Path) -> dict[int, float]:
    return {h["step"]: h["train_loss"] for h in json.loads((run / "history.json").read_text()) if "train_loss" in h}


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_as_one_process_and_saves_whole_weights(prepared, one_process, tmp_path):
    """FSDP2 shards every block over the processes: the losses are one process's, and final/ holds whole tensors
    (Lightning's FSDP wrote this rank's shards, lm_head of shape (0,)), the same as one process's, loadable by every
    tool."""
    from safetensors.torch import load_file

    result = pretrain(prepared, tmp_path / "fsdp", *FOUR_STEPS, "--devices", "2", "--strategy", "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    one, fsdp = step_losses(one_process), step_losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3, 4]
    torch.testing.assert_close(list(fsdp.values()), list(one.values()), rtol=1e-5, atol=1e-5)
    w1, w2 = (load_file(run / "final" / "model.safetensors") for run in (one_process, tmp_path / "fsdp"))
    assert {k: v.shape for k, v in w2.items()} == {k: v.shape for k, v in w1.items()}
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)
    model = load_checkpoint(tmp_path / "fsdp" / "final")
    assert model.config.attention_temperature == "ssa"


@pytest.mark.slow
def test_fsdp_under_bf16_mixed_keeps_ssa_and_adamw_in_float32(prepared, tmp_path):
    """Lightning's FSDP with bf16-mixed cast SSA's slopes and token weights, and their gradient reduction, to bf16."""
    result = pretrain(prepared, tmp_path / "run", "--train.max_steps", "2", "--devices", "2", "--strategy", "fsdp",
                      "--precision", "bf16-mixed")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "final" / "training_state.pth", weights_only=True)
    ssa = [name for name in state["model"] if "temperature" in name]
    assert ssa and {state["model"][name].dtype for name in ssa} == {torch.float32}
    moments = {name: s["exp_avg"] for name, s in state["optimizer"]["state"].items()}
    assert {moments[name].dtype for name in ssa} == {torch.float32}
    assert all(moments[name].abs().sum() > 0 for name in ssa)  # they trained


@pytest.mark.slow
def test_a_run_resumes_across_ddp_fsdp_and_world_sizes(prepared, one_process, tmp_path):
    """Trained in three parts, each under another strategy or process count (DDP on two processes, then FSDP2 on
    two, then one process): the losses of one uninterrupted run."""
    run = tmp_path / "parts"
    parts = {"2": ("--devices", "2"), "3": ("--devices", "2", "--strategy", "fsdp"), "4": ()}
    for max_steps, extra in parts.items():
        resume = ("--resume", "auto") if max_steps != "2" else ()
        part = pretrain(prepared, run, *FOUR_STEPS, "--train.max_steps", max_steps, *resume, *extra)
        assert part.returncode == 0, part.stderr[-3000:]
    resumed, expected = step_losses(run), step_losses(one_process)
    assert sorted(resumed) == [1, 2, 3, 4]
    torch.testing.assert_close(list(resumed.values()), list(expected.values()), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_with_the_optimizer_keyed_by_position_still_resumes(prepared, one_process, tmp_path):
    """Checkpoints written before the optimizer state was keyed by parameter name (every earlier run's) keep
    resuming, with the state of each parameter where it belongs."""
    run = tmp_path / "parts"
    assert pretrain(prepared, run, *FOUR_STEPS, "--train.max_steps", "2").returncode == 0
    path = run / "final" / "training_state.pth"
    state = torch.load(path, weights_only=True)
    order = [name for group in state["optimizer"]["param_groups"] for name in group["params"]]
    position = {name: i for i, name in enumerate(order)}
    state["optimizer"] = {"state": {position[k]: v for k, v in state["optimizer"]["state"].items()},
                          "param_groups": [{**g, "params": [position[n] for n in g["params"]]}
                                           for g in state["optimizer"]["param_groups"]]}
    torch.save(state, path)
    part = pretrain(prepared, run, *FOUR_STEPS, "--resume", "auto")
    assert part.returncode == 0, part.stderr[-3000:]
    torch.testing.assert_close(list(step_losses(run).values()), list(step_losses(one_process).values()),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_lora_with_ssa_under_fsdp_saves_what_ddp_saves(small_base, tmp_path):
    """Under Lightning's FSDP LoRA saved unmerged base weights and dropped SSA's parameters from lora.safetensors:
    under FSDP2 both files equal the DDP run's."""
    from safetensors.torch import load_file

    data = records(tmp_path, 32)
    for name, extra in {"ddp": (), "fsdp": ("--strategy", "fsdp")}.items():
        args = finetune_cli(small_base, data, tmp_path / name, "--devices", "2", "--train.max_steps", "2", "--ssa",
                            "--lora.dropout", "0", *extra)
        args[1] = str(ROOT / "finetune" / "lora.py")
        result = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    for filename in ("lora.safetensors", "model.safetensors"):
        ddp, fsdp = (load_file(tmp_path / name / "final" / filename) for name in ("ddp", "fsdp"))
        assert {k: v.shape for k, v in fsdp.items()} == {k: v.shape for k, v in ddp.items()}
        for key in ddp:
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-6)
    adapter = load_file(tmp_path / "fsdp" / "final" / "lora.safetensors")
    assert any("temperature" in k for k in adapter) and any("lora_A" in k for k in adapter)
    base = load_file(small_base / "model.safetensors")
    merged = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert not torch.equal(merged["transformer.h.0.attn.qkv.weight"], base["transformer.h.0.attn.qkv.weight"])
