"""Checkpoint conversion both ways on tiny random Hugging Face models, and its refusals."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from lit_gpt.checkpoint import is_checkpoint, load_checkpoint, safe_torch_load  # noqa: E402
from lit_gpt.convert import convert_hf_checkpoint, convert_lit_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama_config(**overrides):
    return transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=128, max_position_embeddings=64, **overrides,
    )


HF_CONFIGS = {
    "llama": tiny_llama_config,
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=128),
    "pythia": lambda: transformers.GPTNeoXConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64, vocab_size=128,
        max_position_embeddings=64, rotary_pct=0.25,
    ),
}


def save_hf(tmp_path: Path, family: str = "llama", layout: str = "safetensors") -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family]()).eval()
    folder = tmp_path / f"hf-{family}"
    model.save_pretrained(folder, **({"max_shard_size": "20KB"} if layout == "sharded" else {}))
    if layout == "bin":  # the pickle format of older checkpoints (transformers 5 writes safetensors only)
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder, model


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits[..., :128]


@pytest.mark.parametrize("family", HF_CONFIGS)
@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_convert_both_ways_preserves_logits(tmp_path, family, layout):
    hf_dir, hf_model = save_hf(tmp_path, family, layout)
    if layout == "sharded":
        assert (hf_dir / "model.safetensors.index.json").is_file()
    if layout == "bin":
        assert list(hf_dir.glob("*.bin")) and not list(hf_dir.glob("*.safetensors"))
    lit_dir = convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    model = load_checkpoint(lit_dir).eval()
    idx = torch.randint(0, 128, (2, 17))
    torch.testing.assert_close(logits(model, idx)[..., :128], logits(hf_model, idx), rtol=1e-5, atol=1e-5)

    back_dir = convert_lit_checkpoint(lit_dir, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(back_dir).eval()
    torch.testing.assert_close(logits(back, idx), logits(hf_model, idx), rtol=1e-5, atol=1e-5)


def test_dtype_option_and_default(tmp_path):
    hf_dir, _ = save_hf(tmp_path)
    convert_hf_checkpoint(hf_dir, tmp_path / "bf16", dtype="bfloat16")
    assert load_file(tmp_path / "bf16" / "model.safetensors")["transformer.wte.weight"].dtype == torch.bfloat16
    assert load_checkpoint(tmp_path / "bf16").lm_head.weight.dtype == torch.bfloat16
    convert_hf_checkpoint(hf_dir, tmp_path / "default")
    assert load_file(tmp_path / "default" / "model.safetensors")["transformer.wte.weight"].dtype == torch.float32


def test_ssa_checkpoint_exports_remote_code_or_its_backbone_when_dropped(tmp_path):
    hf_dir, hf_model = save_hf(tmp_path)
    lit_dir = convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    vanilla = load_checkpoint(lit_dir)
    config = vanilla.config.__class__(**{**vanilla.config.to_dict(), "attention_temperature": "ssa"})
    ssa = load_checkpoint(lit_dir, config=config, allow_added=True)
    from lit_gpt.checkpoint import save_model_dir

    save_model_dir(ssa, tmp_path / "ssa", tokenizer_dir=lit_dir)
    convert_lit_checkpoint(tmp_path / "ssa", tmp_path / "remote")  # tests/test_hf_export.py runs such folders
    exported = json.loads((tmp_path / "remote" / "config.json").read_text())
    assert exported["model_type"] == "llama" and exported["lit_gpt_ssa"]["attention_temperature"] == "ssa"
    with pytest.warns(UserWarning, match="Dropping attention_temperature='ssa'"):
        convert_lit_checkpoint(tmp_path / "ssa", tmp_path / "back", drop_ssa=True)
    side = load_file(tmp_path / "back" / "ssa_parameters.safetensors")
    assert set(side) == ssa.added_parameter_names()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    idx = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(logits(back, idx), logits(hf_model, idx), rtol=1e-5, atol=1e-5)


def test_refuses_folder_without_weights(tmp_path):
    hf_dir, _ = save_hf(tmp_path)
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"No weights in .*expected \*\.safetensors"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0, 5, 200, -100])
def test_truncated_download_is_refused_in_both_directions(tmp_path, keep):
    """A cut-off .safetensors (keep: bytes left; negative: bytes cut from the end) must not convert into a model
    whose tensors are zeros."""
    hf_dir, _ = save_hf(tmp_path)
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match="model.safetensors' (is truncated|ended inside)"):
        convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    assert not (tmp_path / "lit").exists()
    weights.write_bytes(data)
    lit_dir = convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    lit_weights = lit_dir / "model.safetensors"
    lit_weights.write_bytes(lit_weights.read_bytes()[: (keep if keep >= 0 else keep)])
    with pytest.raises(ValueError, match="model.safetensors' (is truncated|ended inside)"):
        convert_lit_checkpoint(lit_dir, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_refuses_unsupported_model_type(tmp_path):
    hf_dir, _ = save_hf(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="Unsupported model_type 'mamba'; supported: gpt2, gpt_neox, llama"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")


def edit_weights(hf_dir: Path, edit) -> None:
    weights = load_file(hf_dir / "model.safetensors")
    edit(weights)
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})


def test_names_a_missing_tensor(tmp_path):
    hf_dir, _ = save_hf(tmp_path)
    edit_weights(hf_dir, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.fc_2\.weight"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_names_an_extra_tensor(tmp_path):
    hf_dir, _ = save_hf(tmp_path)
    edit_weights(hf_dir, lambda w: w.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")


def test_names_both_shapes_of_a_mismatch(tmp_path):
    hf_dir, _ = save_hf(tmp_path)
    edit_weights(hf_dir, lambda w: w.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(32, 48)}))
    with pytest.raises(ValueError, match=r"shape \(32, 48\), the model config expects \(32, 64\)"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")


def test_refuses_preset_that_disagrees_with_config_json(tmp_path):
    hf_dir, _ = save_hf(tmp_path)
    with pytest.raises(ValueError, match="does not describe preset 'pythia-14m'"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out", model_name="pythia-14m")


def test_refuses_to_overwrite_an_existing_checkpoint(tmp_path):
    hf_dir, _ = save_hf(tmp_path)
    out = convert_hf_checkpoint(hf_dir, tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        convert_hf_checkpoint(hf_dir, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    convert_hf_checkpoint(hf_dir, out, overwrite=True)
    assert is_checkpoint(out)


def test_interrupted_conversion_leaves_nothing_that_loads(tmp_path, monkeypatch):
    hf_dir, _ = save_hf(tmp_path)
    from lit_gpt import checkpoint

    original = checkpoint.SafetensorsStreamWriter.write
    calls = []

    def interrupt_midway(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(checkpoint.SafetensorsStreamWriter, "write", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [hf_dir.name]


class PlantedCode:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "training_state.pth"])
def test_loading_never_runs_code_from_a_checkpoint(tmp_path, filename):
    marker = tmp_path / "code-ran"
    path = tmp_path / filename
    with open(path, "wb") as f:
        pickle.dump({"weight": PlantedCode(marker)}, f)
    with pytest.raises(ValueError, match="Refusing to load .* could run code"):
        safe_torch_load(path)
    assert not marker.exists()


def test_planted_bin_is_refused_by_the_converter(tmp_path):
    hf_dir, _ = save_hf(tmp_path)
    (hf_dir / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(1)}, hf_dir / "pytorch_model.bin")
    with open(hf_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": PlantedCode(marker)}, f)
    with pytest.raises(ValueError, match="Refusing to load"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path):
    script = ROOT / "scripts" / "convert_hf_checkpoint.py"
    result = subprocess.run([sys.executable, str(script), "--checkpoint_dir", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: Expected a Hugging Face model folder at '{tmp_path / 'nope'}', found nothing there."
    ]


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_apart_from_the_input_in_both_converters(tmp_path, where):
    hf_dir, _ = save_hf(tmp_path)
    before = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    output = {"same": hf_dir, "inside": hf_dir / "lit", "contains": tmp_path}[where]
    with pytest.raises(ValueError, match="the output must be apart from the input"):
        convert_hf_checkpoint(hf_dir, output, overwrite=True)
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == before  # the source is untouched
    lit_dir = convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    output = {"same": lit_dir, "inside": lit_dir / "hf", "contains": tmp_path}[where]
    with pytest.raises(ValueError, match="the output must be apart from the input"):
        convert_lit_checkpoint(lit_dir, output, overwrite=True)
    assert is_checkpoint(lit_dir)
