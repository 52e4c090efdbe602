"""Fine-tuning with SSA through its real entry point."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import bf16_copy
from safetensors.torch import load_file

from finetune.full import setup
from lit_gpt import GPT, Config
from lit_gpt.checkpoint import load_checkpoint, save_model_dir
from lit_gpt.convert import convert_lit_checkpoint
from lit_gpt.data.alpaca import encode_records, load_records
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.training import EvalArgs, TrainArgs, get_lr, parameter_groups
from lit_gpt.utils import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def base(trained_base) -> Path:
    return trained_base


def arguments(base, data, out_dir, **train):
    args = dict(global_batch_size=4, micro_batch_size=2, max_steps=3, max_seq_length=64, learning_rate=1e-3,
                min_lr=1e-4, warmup_steps=1, save_interval=None)
    args.update(train)
    return dict(checkpoint_dir=base, data=data, out_dir=out_dir, train=TrainArgs(**args),
                eval=EvalArgs(interval=100, max_iters=4, initial_validation=True))


def history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def val_losses(run: Path) -> list[float]:
    return [h["val_loss"] for h in history(run) if "val_loss" in h]


def test_ssa_starts_from_the_checkpoints_own_validation_loss(base, text_file, tmp_path):
    data = tmp_path / "data"
    setup(**arguments(base, data, tmp_path / "vanilla"), data_source=str(text_file))
    setup(**arguments(base, data, tmp_path / "ssa"), ssa=True)
    vanilla, ssa = val_losses(tmp_path / "vanilla"), val_losses(tmp_path / "ssa")
    assert vanilla[0] < math.log(50257) - 3  # a trained checkpoint: a wrong start would show
    # slope 6e-4: temperatures within 0.3% of 1, so the loss moves by about 5e-7 of itself; a slope of 0.5 moves it
    # by about 3e-4 of itself (this briefly trained checkpoint leans little on attention): the tolerance lies
    # between the two, more than ten times from each, so the check can fail
    start = pytest.approx(vanilla[0], rel=2e-5)
    assert ssa[0] == start
    setup(**arguments(base, data, tmp_path / "wrong-start"), ssa=True, model={"ssa_position_init": 0.5})
    assert val_losses(tmp_path / "wrong-start")[0] != start
    model = load_checkpoint(tmp_path / "ssa" / "final")
    assert model.config.attention_temperature == "ssa" and model.config.ssa_position_init == 6e-4
    assert model.transformer.h[0].attn.query_temperature.token_weight.abs().sum() > 0


def test_the_attention_flags_are_those_of_pretraining(base, text_file, tmp_path, capsys):
    """--model.attention_temperature alone adds a baseline (no --ssa needed); --ssa is its shorthand for ssa, and
    the two may not disagree."""
    setup(**arguments(base, tmp_path / "data", tmp_path / "logn", max_steps=1), data_source=str(text_file),
          model={"attention_temperature": "ssmax", "ssmax_init": 0.2})
    model = load_checkpoint(tmp_path / "logn" / "final")
    assert model.config.attention_temperature == "ssmax" and model.transformer.h[0].attn.query_temperature.scale.numel()
    setup(**arguments(base, tmp_path / "data", tmp_path / "ssa", max_steps=1),
          model={"attention_temperature": "ssa", "ssa_token_weights": "separate"})
    config = load_checkpoint(tmp_path / "ssa" / "final").config
    assert config.ssa_token_weights == "separate" and config.ssa_position_init == 6e-4  # the fine-tuning start
    with pytest.raises(ValueError, match="--ssa means --model.attention_temperature ssa"):
        setup(**arguments(base, tmp_path / "data", tmp_path / "both"), ssa=True,
              model={"attention_temperature": "logn"})


def test_a_gate_starts_at_the_checkpoints_validation_loss_and_selective_attention_does_not(base, text_file,
                                                                                         tmp_path):
    data = tmp_path / "data"
    setup(**arguments(base, data, tmp_path / "vanilla", max_steps=1), data_source=str(text_file))
    setup(**arguments(base, data, tmp_path / "gate", max_steps=2, gate_lr=1e-2),
          model={"attention_gate": "headwise"})
    setup(**arguments(base, data, tmp_path / "selective", max_steps=1), model={"selective_mask": "leviathan"})
    vanilla = val_losses(tmp_path / "vanilla")[0]
    assert vanilla < math.log(50257) - 3  # a trained checkpoint: a start that is not the identity would show
    assert val_losses(tmp_path / "gate")[0] == pytest.approx(vanilla, rel=1e-6)
    assert abs(val_losses(tmp_path / "selective")[0] - vanilla) > 1e-4 * vanilla  # far above float noise (1e-6)
    gated = load_checkpoint(tmp_path / "gate" / "final")
    assert gated.config.attention_gate_scale == 2.0
    assert gated.transformer.h[0].attn.gate.proj.weight.abs().sum() > 0  # it learned


def test_ssa_only_trains_only_the_temperatures(base, text_file, tmp_path):
    setup(**arguments(base, tmp_path / "data", tmp_path / "run"), data_source=str(text_file), ssa=True,
          ssa_only=True)
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    added = set(after) - set(before)
    assert added == load_checkpoint(tmp_path / "run" / "final").added_parameter_names()
    assert any(after[k].abs().sum() > 0 for k in added if k.endswith("token_weight"))


@pytest.mark.parametrize("weights", ["shared", "separate"])
def test_position_slopes_and_token_weights_get_their_own_learning_rates(weights):
    model = GPT(Config.from_name("debug", attention_temperature="ssa", ssa_token_weights=weights))
    args = TrainArgs(learning_rate=3e-5, min_lr=3e-6, warmup_steps=10, weight_decay=0.1, ssa_position_lr=1e-2,
                     ssa_token_lr=1e-3)
    groups = {g["name"]: g for g in parameter_groups(model, args)}
    names = {id(p): name for name, p in model.named_parameters()}
    position = {names[id(p)].rsplit(".", 1)[-1] for p in groups["ssa_position"]["params"]}
    token = {names[id(p)].split("temperature.")[-1] for p in groups["ssa_token"]["params"]}
    assert position == {"position_param"}
    assert token == ({"token_weight"} if weights == "shared" else {"token_weight", "token_proj.weight"})
    assert groups["ssa_position"]["peak_lr"] == 1e-2 and groups["ssa_token"]["peak_lr"] == 1e-3
    assert groups["ssa_position"]["weight_decay"] == groups["ssa_token"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    # each group follows the backbone's warmup and cosine decay, to the same fraction of its own peak
    assert get_lr(0, 100, TrainArgs(learning_rate=3e-5, warmup_steps=10), peak=1e-2) == pytest.approx(1e-3)
    assert get_lr(100, 100, args, peak=1e-2) == pytest.approx(1e-3)
    assert get_lr(100, 100, dataclasses.replace(args, learning_rate=0.0), peak=1e-2) == 0.0  # no division by zero


def test_output_is_a_checkpoint_every_tool_takes(base, text_file, tmp_path):
    setup(**arguments(base, tmp_path / "data", tmp_path / "run"), data_source=str(text_file), ssa=True)
    final = tmp_path / "run" / "final"
    assert Tokenizer(final).vocab_size == 50257
    with pytest.warns(UserWarning, match="Dropping"):
        convert_lit_checkpoint(final, tmp_path / "hf", drop_ssa=True)
    assert (tmp_path / "hf" / "ssa_parameters.safetensors").is_file()


def test_ssa_on_an_ssa_checkpoint_keeps_its_parameters(base, text_file, tmp_path, capsys):
    setup(**arguments(base, tmp_path / "data", tmp_path / "first"), data_source=str(text_file), ssa=True)
    first = load_file(tmp_path / "first" / "final" / "model.safetensors")
    setup(**arguments(tmp_path / "first" / "final", tmp_path / "data", tmp_path / "second", max_steps=1,
                      learning_rate=1e-9, min_lr=0.0, ssa_position_lr=0.0, ssa_token_lr=0.0), ssa=True)
    assert "already has attention_temperature='ssa'" in capsys.readouterr().out
    second = load_file(tmp_path / "second" / "final" / "model.safetensors")
    temperatures = load_checkpoint(tmp_path / "first" / "final").added_parameter_names()
    assert temperatures and all(torch.equal(first[k], second[k]) for k in temperatures)  # loaded, not re-initialised


def alpaca_records():
    return [{"instruction": f"Add {a} and {b}.", "input": "" if a % 2 else "Be brief.", "output": f"{a + b}"}
            for a in range(12) for b in range(2)]


def test_instruction_targets_cover_the_response_only(base):
    tokenizer = Tokenizer(base)
    (x, y), = encode_records([{"instruction": "Say hi.", "output": "hi"}], tokenizer, 100, False, "test")
    response = tokenizer.encode("hi", bos=False, eos=True)
    assert torch.equal(y[y != -100], response)
    scored = y[:-1] != -100
    assert torch.equal(x[1:][scored], y[:-1][scored])  # targets are the next input tokens


def test_instruction_tuning_runs(base, tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca_records()))
    setup(**arguments(base, tmp_path / "alpaca.json", tmp_path / "run"), ssa=True, val_fraction=0.25)
    losses = val_losses(tmp_path / "run")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_record_with_missing_field_is_named(tmp_path):
    records = alpaca_records()
    del records[3]["output"]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="Record 3 of .*bad.json' lacks the text field 'output'"):
        load_records(tmp_path / "bad.json")


def test_too_long_records_are_refused_or_cut(base):
    records = [{"instruction": "Repeat.", "output": "word " * 200}]
    with pytest.raises(ValueError, match="Record 0 of test is .* pass --truncate"):
        encode_records(records, Tokenizer(base), 64, False, "test")
    with pytest.warns(UserWarning, match="Cut 1 of 1 records"):
        (x, y), = encode_records(records, Tokenizer(base), 64, True, "test")
    assert x.numel() == 64
    long_prompt = [{"instruction": "Repeat. " * 100, "output": "ok"}]
    with pytest.raises(ValueError, match="Record 0 of test keeps no response token after --truncate"):
        encode_records(long_prompt, Tokenizer(base), 64, True, "test")


BAD = {
    "config missing": (lambda base, tmp: dict(checkpoint_dir=str(empty_folder(tmp))), "model config file"),
    "tokenizer missing": (lambda base, tmp: dict(checkpoint_dir=str(strip_tokenizer(base, tmp))), "No tokenizer"),
    "other model": (lambda base, tmp: dict(checkpoint_dir=str(other_model(base, tmp))), "from another model?"),
    "output is the input's run folder": (lambda base, tmp: dict(checkpoint_dir=str(base), out_dir=str(base.parent)),
                                         "contains --checkpoint_dir"),
    "output is the input": (lambda base, tmp: dict(checkpoint_dir=str(base), out_dir=str(base)), "is --checkpoint_dir"),
    "no steps": (lambda base, tmp: dict(checkpoint_dir=str(base), **{"train.max_steps": "0"}),
                 "--train.max_steps must be at least 1"),
}


def empty_folder(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def strip_tokenizer(base: Path, tmp: Path) -> Path:
    folder = tmp / "no-tokenizer"
    folder.mkdir()
    for name in ("model.safetensors", "model_config.yaml"):
        (folder / name).write_bytes((base / name).read_bytes())
    return folder


def other_model(base: Path, tmp: Path) -> Path:
    folder = tmp / "other"
    save_model_dir(GPT(Config.from_name("debug", vocab_size=50257, block_size=128)), folder, tokenizer_dir=base)
    Config.from_file(base, n_layer=3).save(folder)  # the config no longer describes the weights
    return folder


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_fail_in_one_line(base, text_file, tmp_path, capsys, case):
    make, expected = BAD[case]
    argv = ["--data", str(tmp_path / "data"), "--data_source", str(text_file), "--out_dir", str(tmp_path / "run"),
            "--train.max_steps", "1", "--train.max_seq_length", "64", "--ssa", "true"]
    for key, value in make(base, tmp_path).items():
        argv += [f"--{key}", value]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(setup, argv)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines
    assert not (tmp_path / "run" / "final").exists()


def test_data_from_another_tokenizer_is_refused(base, text_file, tmp_path, capsys):
    from lit_gpt.data.prepare import prepare

    prepare(str(text_file), tmp_path / "data", train_tokenizer=300, val_fraction=0.1)
    with pytest.raises(SystemExit):
        run_cli(setup, ["--checkpoint_dir", str(base), "--data", str(tmp_path / "data"), "--out_dir",
                        str(tmp_path / "run"), "--train.max_steps", "1", "--train.max_seq_length", "64"])
    assert "was tokenized with another tokenizer" in capsys.readouterr().err


def share_changed(after: dict, before: dict) -> float:
    matrices = [name for name, tensor in before.items() if tensor.ndim == 2]
    changed = sum((after[name].float() != before[name].float()).sum().item() for name in matrices)
    return changed / sum(before[name].numel() for name in matrices)


def test_a_bf16_checkpoint_fine_tunes_float32_master_weights(base, text_file, tmp_path):
    """In bf16 most updates at a fine-tuning rate round away (a bf16 SmolLM2 kept in bf16 changed 16% of its weights in
    6 steps): the weights, SSA's parameters and AdamW's state are float32, and final/ holds float32."""
    bf16 = bf16_copy(base, tmp_path / "bf16")
    setup(**arguments(bf16, tmp_path / "data", tmp_path / "run", max_steps=6, learning_rate=1e-4, min_lr=1e-4),
          data_source=str(text_file), ssa=True)
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert {tensor.dtype for tensor in final.values()} == {torch.float32}
    assert share_changed(final, load_file(bf16 / "model.safetensors")) > 0.9
    state = torch.load(tmp_path / "run" / "final" / "training_state.pth", weights_only=True)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}
