"""LoRA and DoRA fine-tuning through its real entry point (finetune/lora.py), the adapters against independent
references of their formulas, and the merge script."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import FAMILIES, bf16_copy
from safetensors.torch import load_file

from finetune.lora import setup
from lit_gpt import GPT, Config
from lit_gpt.checkpoint import load_checkpoint, safe_torch_load
from lit_gpt.lora import LoRAArgs, LoRALinear, add_lora, lora_parameters, merged_state
from lit_gpt.training import EvalArgs, TrainArgs
from lit_gpt.utils import run_cli
from scripts.merge_lora import merge_lora

ALL = ["query", "key", "value", "projection", "mlp", "head"]


@pytest.fixture(scope="session")
def lora_base(trained_base) -> Path:
    return trained_base


@pytest.fixture
def base(lora_base) -> Path:
    return lora_base


def run_args(base, data, out_dir, lora=None, **train):
    args = dict(global_batch_size=4, micro_batch_size=2, max_steps=3, max_seq_length=64, learning_rate=3e-3,
                min_lr=3e-4, warmup_steps=1, save_interval=None)
    args.update(train)
    return dict(checkpoint_dir=base, data=data, out_dir=out_dir, lora=lora or LoRAArgs(rank=4, dropout=0.0),
                train=TrainArgs(**args), eval=EvalArgs(interval=100, max_iters=4, initial_validation=True))


def val_losses(run: Path) -> list[float]:
    return [h["val_loss"] for h in json.loads((run / "history.json").read_text()) if "val_loss" in h]


def train_losses(run: Path) -> list[float]:
    return [h["train_loss"] for h in json.loads((run / "history.json").read_text()) if "train_loss" in h]


def adapted(family: str, args: LoRAArgs, seed: int = 0) -> tuple[GPT, GPT]:
    """A random model and the same one with adapters whose B is far from zero."""
    torch.manual_seed(seed)
    plain = GPT(Config(**{**FAMILIES[family], "tie_embeddings": False})).eval()
    model = GPT(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    add_lora(model, args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.3 * torch.rand_like(p))
    return plain, model


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_start_as_the_base_and_merge_into_it(family, dora):
    torch.manual_seed(0)
    plain = GPT(Config(**{**FAMILIES[family], "tie_embeddings": False})).eval()
    model = GPT(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    add_lora(model, LoRAArgs(rank=4, targets=ALL, dropout=0.0, dora=dora))
    x = torch.randint(0, plain.config.vocab_size, (2, 20))
    with torch.no_grad():
        if dora:  # m / ||W|| * W: equal to rounding
            torch.testing.assert_close(model(x), plain(x), rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(model(x), plain(x))  # B = 0: exactly the base
    _, model = adapted(family, LoRAArgs(rank=4, targets=ALL, dropout=0.0, dora=dora))
    merged = GPT(model.config).eval()
    merged.load_state_dict(merged_state(model, model.state_dict(), LoRAArgs(rank=4, targets=ALL, dora=dora)))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x), plain(x), atol=1e-3)  # the adapters are at work: the test can fail


def test_qkv_carries_separate_adapters_of_their_own_sizes_under_gqa():
    _, model = adapted("llama", LoRAArgs(rank=3, targets=["key", "value"]))
    config, qkv = model.config, model.transformer.h[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and not hasattr(qkv, "lora_A_query")
    assert qkv.lora_B_key.shape == qkv.lora_B_value.shape == (config.n_query_groups * config.head_size, 3)
    assert qkv.lora_A_key.shape == (3, config.n_embd)
    assert set(model.state_dict()) >= set(GPT(config).state_dict())  # the backbone's names are unchanged


def test_dora_equals_the_float64_reference_in_outputs_and_gradients():
    """DoRA written from its formula: W' = m (W + s B A) / ||W + s B A||_row, y = x W'^T + b."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10).double()
    layer = LoRALinear(linear, {"mlp": 10}, LoRAArgs(rank=3, alpha=6.0, dropout=0.0, targets=["mlp"], dora=True))
    with torch.no_grad():
        layer.lora_B_mlp.normal_()
        layer.magnitude.mul_(torch.rand(10, dtype=torch.float64) + 0.5)
    for p in (layer.weight, layer.bias):
        p.requires_grad_(True)
    x = torch.randn(4, 5, 12, dtype=torch.float64, requires_grad=True)
    params = [x, layer.weight, layer.bias, layer.lora_A_mlp, layer.lora_B_mlp, layer.magnitude]

    def reference(x, w, b, a, bb, m):
        direction = w + 2.0 * bb @ a
        return x @ (m[:, None] * direction / torch.sqrt((direction**2).sum(1, keepdim=True))).T + b

    weight = torch.randn(4, 5, 10, dtype=torch.float64)
    expected = reference(*params)
    actual = layer(x)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
    for got, want in zip(torch.autograd.grad((actual * weight).sum(), params),
                         torch.autograd.grad((expected * weight).sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    lora = LoRALinear(linear, {"mlp": 10}, LoRAArgs(rank=3, alpha=6.0, dropout=0.0, targets=["mlp"]))
    with torch.no_grad():
        lora.lora_B_mlp.copy_(layer.lora_B_mlp)
        lora.lora_A_mlp.copy_(layer.lora_A_mlp)
        torch.testing.assert_close(lora(x), F.linear(x, linear.weight + 2.0 * lora.lora_B_mlp @ lora.lora_A_mlp,
                                                     linear.bias), rtol=1e-9, atol=1e-12)


def test_lora_run_with_ssa_starts_at_the_checkpoint_trains_only_the_adapters_and_merges(base, text_file, tmp_path):
    data = tmp_path / "data"
    # 6 steps at 1e-2: the first step (Adam moving B off zero) raises the validation loss and 3 steps at 3e-3 ended
    # 5e-4 above the start on an Intel Xeon (below it on an AMD EPYC); these end 3e-3 below it, falling from step 2
    setup(**run_args(base, data, tmp_path / "run", lora=LoRAArgs(rank=4, dropout=0.0, targets=ALL[:5]), max_steps=6,
                     learning_rate=1e-2, min_lr=1e-3), data_source=str(text_file), ssa=True)
    run = tmp_path / "run"
    from finetune.full import setup as full

    full(checkpoint_dir=base, data=data, out_dir=tmp_path / "plain",
         train=TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=1, max_seq_length=64),
         eval=EvalArgs(interval=100, max_iters=4, initial_validation=True))
    first, plain = val_losses(run)[0], val_losses(tmp_path / "plain")[0]
    assert plain < math.log(50257) - 3 and first == pytest.approx(plain, rel=1e-4)  # a trained base: a bad start shows
    assert val_losses(run)[-1] < first
    # only the adapters and the temperatures train: their optimizer state and nothing else
    state = safe_torch_load(run / "final" / "training_state.pth")
    model = GPT(Config.from_file(run / "final"))
    add_lora(model, LoRAArgs(rank=4, targets=ALL[:5]))
    trainable = lora_parameters(model) + model.added_parameters()
    assert len(state["optimizer"]["state"]) == len(trainable)
    base_weights, merged = load_file(base / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert torch.equal(merged["transformer.wte.weight"], base_weights["transformer.wte.weight"])  # frozen, no adapter
    assert not torch.equal(merged["transformer.h.0.attn.qkv.weight"], base_weights["transformer.h.0.attn.qkv.weight"])
    adapter = load_file(run / "final" / "lora.safetensors")
    assert any("lora_A_query" in k for k in adapter) and any("query_temperature" in k for k in adapter)
    assert not any(k.endswith("qkv.weight") for k in adapter)
    sizes = [(run / "final" / name).stat().st_size for name in ("lora.safetensors", "model.safetensors")]
    assert sizes[0] < sizes[1] / 10  # small, to share
    # every tool takes the merged folder; the merge script rebuilds it from the adapter alone
    loaded = load_checkpoint(run / "final")
    assert loaded.config.attention_temperature == "ssa"
    merge_lora(base, run, tmp_path / "merged")
    again = load_file(tmp_path / "merged" / "model.safetensors")
    for key, tensor in merged.items():
        torch.testing.assert_close(again[key], tensor, rtol=1e-6, atol=1e-6)


def test_dora_resume_gives_the_losses_of_an_uninterrupted_run(base, text_file, tmp_path):
    data = tmp_path / "data"
    lora = LoRAArgs(rank=4, dropout=0.1, dora=True, targets=["query", "value", "mlp"])
    setup(**run_args(base, data, tmp_path / "whole", lora=lora, max_steps=4), data_source=str(text_file))
    setup(**run_args(base, data, tmp_path / "cut", lora=lora, max_steps=4, save_interval=2))
    shutil.rmtree(tmp_path / "cut" / "final")
    (tmp_path / "cut" / "history.json").unlink()
    setup(**run_args(base, data, tmp_path / "cut", lora=lora, max_steps=4, save_interval=2), resume="auto")
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "cut")), torch.tensor(train_losses(
        tmp_path / "whole")), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flags, expected", [
    (["--lora.rank", "0"], "--lora.rank must be a whole number of at least 1"),
    (["--lora.alpha", "0"], "--lora.alpha must be above 0"),
    (["--lora.targets", "[query, gate]"], "--lora.targets"),
])
def test_bad_lora_settings_are_one_line(base, tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(setup, ["--checkpoint_dir", str(base), "--out_dir", str(tmp_path / "run"), *flags])
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) <= 3 and expected in lines[-1] and "Traceback" not in "".join(lines)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def lora_run(lora_base, text_file, tmp_path_factory) -> Path:
    """One short LoRA run (rank 4) that the tests of refusals read or copy; its prepared data is beside it."""
    root = tmp_path_factory.mktemp("lora_run")
    setup(**run_args(lora_base, root / "data", root / "run", max_steps=1), data_source=str(text_file))
    return root / "run"


def one_line_error(capsys, exit_info) -> str:
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(lines) and lines[-1].startswith("error: ")
    return lines[-1]


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.pop("base"), "should have a 'base' section (a mapping), found nothing"),
    (lambda s: s["base"].pop("weights_sha256"), "its 'base' section lacks 'weights_sha256'"),
    (lambda s: s["lora"].update(ranks=4), "unknown LoRA field 'ranks'"),
    (lambda s: s["lora"].update(rank=0), "lora.rank must be a whole number of at least 1"),
    (lambda s: s["lora"].update(rank=8), "lora_A_query has shape (4, 64) there, (8, 64) by the settings"),
    (lambda s: s["lora"].update(targets=["query", "mlp"]), "missing ['transformer.h.0.mlp"),
])
def test_a_damaged_lora_yaml_is_one_line_in_merge_lora(lora_base, lora_run, tmp_path, capsys, edit, expected):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run / "final", adapter)
    settings = yaml.safe_load((adapter / "lora.yaml").read_text())
    edit(settings)
    (adapter / "lora.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(merge_lora, ["--checkpoint_dir", str(lora_base), "--lora_dir", str(adapter), "--output_dir",
                             str(tmp_path / "merged")])
    assert expected in one_line_error(capsys, exit_info)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("script, flags, expected", [
    ("full", [], "is a LoRA run's checkpoint (rank 4): resume it with finetune/lora.py"),
    ("lora", ["--lora.rank", "8"], "was trained with other adapters (rank: 4 there, 8 now)"),
    ("lora", ["--lora.targets", "[query, value]"], "targets: ['query', 'key', 'value'] there, ['query', 'value'] now"),
    ("lora-into-full", [], "is a checkpoint without adapters (no lora.yaml)"),
])
def test_resuming_into_a_run_of_another_kind_is_one_line(lora_base, lora_run, tmp_path, capsys, script, flags,
                                                         expected):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    if script == "lora-into-full":  # a checkpoint as finetune/full.py writes it: no adapter settings
        (run / "final" / "lora.yaml").unlink()
        (run / "final" / "lora.safetensors").unlink()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    from finetune.full import setup as full

    with pytest.raises(SystemExit) as exit_info:
        run_cli(full if script == "full" else setup, ["--checkpoint_dir", str(lora_base), "--data",
                                                      str(lora_run.parent / "data"), "--out_dir", str(run),
                                                      "--resume", "auto", *flags])
    assert expected in one_line_error(capsys, exit_info)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written, nothing lost


def test_an_adapter_of_another_base_is_refused(base, lora_run, tmp_path, capsys):
    shutil.copytree(lora_run, tmp_path / "run")
    other = tmp_path / "other"
    from lit_gpt.checkpoint import save_model_dir

    torch.manual_seed(5)
    save_model_dir(GPT(Config.from_file(base)), other, tokenizer_dir=base)  # same architecture, other weights
    with pytest.raises(SystemExit):
        run_cli(merge_lora, ["--checkpoint_dir", str(other), "--lora_dir", str(tmp_path / "run"), "--output_dir",
                             str(tmp_path / "merged")])
    assert "was trained on other weights" in capsys.readouterr().err
    wider = tmp_path / "wider"
    save_model_dir(GPT(Config.from_file(base, n_layer=3)), wider, tokenizer_dir=base)
    with pytest.raises(SystemExit):
        run_cli(merge_lora, ["--checkpoint_dir", str(wider), "--lora_dir", str(tmp_path / "run"), "--output_dir",
                             str(tmp_path / "merged")])
    assert "n_layer is 2 there and 3" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_adapters_and_ssa_train_in_float32_on_a_bf16_checkpoint(base, text_file, tmp_path):
    """Adapters used to be made in their layer's dtype: bf16 on every real download, where most updates round away."""
    bf16 = bf16_copy(base, tmp_path / "bf16")
    setup(**run_args(bf16, tmp_path / "data", tmp_path / "run", max_steps=1), data_source=str(text_file), ssa=True)
    adapter = load_file(tmp_path / "run" / "final" / "lora.safetensors")
    assert any("lora_A" in k for k in adapter) and any("temperature" in k for k in adapter)
    assert {tensor.dtype for tensor in adapter.values()} == {torch.float32}
