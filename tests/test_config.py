from pathlib import Path

import pytest
import torch
import yaml

from lit_gpt import GPT, Config
from lit_gpt.config import configs, name_to_config

REQUIRED_PRESETS = [
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
    "pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b",
    "pythia-2.8b", "pythia-6.9b", "pythia-12b", "pythia-70m-deduped", "pythia-12b-deduped",
    "Llama-2-7b-hf", "Llama-2-13b-hf", "Llama-2-70b-hf", "Llama-3-8B", "Llama-3-70B", "Llama-3.1-8B",
    "Llama-3.2-1B", "Llama-3.2-3B", "tiny-llama-1.1b", "SmolLM2-135M", "SmolLM2-360M", "SmolLM2-1.7B", "debug",
    *(f"Qwen2.5-{size}{suffix}" for size in ("0.5B", "1.5B", "3B", "7B") for suffix in ("", "-Instruct")),
    *(f"Qwen3-{size}" for size in ("0.6B", "1.7B", "4B", "8B")),
    "Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.1", "Mistral-7B-v0.3", "Mistral-7B-Instruct-v0.3",
]


def test_required_presets_exist_with_their_source():
    for name in REQUIRED_PRESETS:
        assert name in name_to_config, name
        assert name == "debug" or name_to_config[name]["hf_repo"], name


@pytest.mark.parametrize("row", configs, ids=[row["name"] for row in configs])
def test_every_preset_builds_on_the_meta_device(row):
    config = Config.from_name(row["name"], attention_temperature="ssa")
    with torch.device("meta"):
        model = GPT(config)
    assert model.lm_head.weight.shape == (config.padded_vocab_size, config.n_embd)


@pytest.mark.parametrize(
    "name, billions", [("gpt2", 0.124), ("pythia-160m", 0.162), ("Llama-2-7b-hf", 6.74), ("Llama-3-8B", 8.03),
                       ("SmolLM2-135M", 0.135), ("tiny-llama-1.1b", 1.10), ("Llama-3.2-1B", 1.24),
                       ("Qwen2.5-0.5B", 0.494), ("Qwen2.5-7B", 7.62), ("Qwen3-0.6B", 0.596), ("Qwen3-8B", 8.19),
                       ("Mistral-7B-v0.1", 7.24), ("Mistral-7B-v0.3", 7.25)]
)
def test_preset_sizes_match_the_published_parameter_counts(name, billions):
    with torch.device("meta"):
        model = GPT(Config.from_name(name))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)


def test_yaml_round_trip(tmp_path):
    config = Config.from_name("Llama-3.1-8B", attention_temperature="ssa", ssa_token_weights="separate")
    config.save(tmp_path)
    assert Config.from_file(tmp_path) == config
    assert Config.from_file(tmp_path / "model_config.yaml", n_layer=2).n_layer == 2


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'pythia-160m'"):
        Config.from_name("pythia-160")


def test_config_typo_is_named(tmp_path):
    (tmp_path / "model_config.yaml").write_text("n_layer: 2\nattention_temprature: ssa\n")
    with pytest.raises(ValueError, match="field 'attention_temprature'. Did you mean 'attention_temperature'"):
        Config.from_file(tmp_path)


def test_invalid_choice_is_refused():
    with pytest.raises(ValueError, match="attention_temperature must be one of"):
        Config.from_name("debug", attention_temperature="selective")


def test_derived_fields_are_checked():
    with pytest.raises(ValueError, match="divisible by n_query_groups"):
        Config.from_name("debug", n_query_groups=3)
    with pytest.raises(ValueError, match="needs a term on at least one side"):
        Config.from_name("debug", attention_temperature="ssa", ssa_query="none", ssa_value="none")
    with pytest.raises(ValueError, match="ssa_value must be one of"):
        Config.from_name("debug", attention_temperature="ssa", ssa_value="position-token")


@pytest.mark.parametrize("query", ["none", "position", "token", "position+token"])
@pytest.mark.parametrize("value", ["none", "position", "token", "position+token"])
def test_every_per_side_combination_is_a_config_value(query, value):
    if query == value == "none":
        return
    config = Config.from_name("debug", attention_temperature="ssa", ssa_query=query, ssa_value=value)
    assert config.ssa_terms("query") == ("position" in query, "token" in query)
    assert config.ssa_terms("value") == ("position" in value, "token" in value)
    assert config.ssa_terms("key") == (False, False)


def test_configs_written_before_the_per_side_terms_still_load():
    old = Config.from_name("debug", attention_temperature="ssa", ssa_query=True, ssa_value=False, ssa_key=True,
                           ssa_token=False)
    assert (old.ssa_query, old.ssa_value, old.ssa_key) == ("position", "none", "position")
    assert Config.from_name("debug", ssa_position=False).ssa_query == "token"


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.yaml"):
        Config.from_file(tmp_path)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*-ssa.yaml")))
def test_ssa_recipe_differs_from_its_base_only_in_attention_keys(recipe):
    folder = Path(__file__).parents[1] / "configs"
    ssa = yaml.safe_load((folder / recipe).read_text())
    base = yaml.safe_load((folder / recipe.replace("-ssa.yaml", ".yaml")).read_text())
    attention = {"ssa", "ssa_only"}
    assert {k: v for k, v in ssa.items() if k not in attention | {"model"}} == {
        k: v for k, v in base.items() if k not in attention | {"model"}}
    model_keys = set(ssa.get("model", {})) | set(base.get("model", {}))
    differing = {k for k in model_keys if ssa.get("model", {}).get(k) != base.get("model", {}).get(k)}
    assert all(k == "attention_temperature" or k.startswith("ssa_") for k in differing)
    assert ssa != base


@pytest.mark.parametrize("recipe", ["gpt2-owt.yaml", "gpt2-owt-ssa.yaml", "gpt2-fineweb10b.yaml"])
def test_gpt2_pretraining_pads_the_vocabulary_while_the_preset_matches_the_released_weights(recipe):
    """From scratch, the output layer gets 50,304 rows (a multiple of 64, as nanoGPT and llm.c); the gpt2 preset keeps
    the released checkpoints' 50,257, so conversion and export are unchanged."""
    values = yaml.safe_load((Path(__file__).parents[1] / "configs" / recipe).read_text())
    config = Config.from_name(values["model_name"], **values["model"])
    assert config.padded_vocab_size == 50304 and config.vocab_size == 50257
    assert Config.from_name("gpt2").padded_vocab_size == 50257


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")
                                          if p.name != "reproduce.yaml"))
def test_every_recipe_parses_with_its_entry_point(recipe):
    from jsonargparse import ArgumentParser

    from finetune.full import setup as finetune
    from pretrain.openwebtext import setup as pretrain

    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(finetune if recipe.startswith("finetune") else pretrain)
    values = parser.parse_path(str(Path(__file__).parents[1] / "configs" / recipe))
    if not recipe.startswith("finetune"):
        model = Config.from_name(values.model_name, **(values.model or {}))
        assert model.attention_temperature == ("ssa" if "-ssa" in recipe else "none")


@pytest.mark.parametrize("script", ["pretrain/openwebtext.py", "finetune/full.py", "finetune/lora.py"])
def test_every_flag_has_a_description_and_a_readable_type(script):
    import re
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True, text=True,
                            env={"COLUMNS": "200", "PATH": ""})
    assert result.returncode == 0, result.stderr
    options = re.findall(r"^  (--[\w.]+)(?: [A-Z_{},a-z]+)?\s+(.*?)(?=^  --|\Z)", result.stdout, re.S | re.M)
    described = {flag: " ".join(text.split()) for flag, text in options}
    assert "--train.max_steps" in described and "--data.source" in described if "pretrain" in script else True
    for flag, text in described.items():
        if flag in ("--help", "--config", "--print_config") or flag.count(".") == 0 and text.startswith("Path to"):
            continue
        assert not text.startswith("(type:") and text, f"{flag} has no description"
    assert "<class" not in result.stdout and "Union[" not in result.stdout and "Literal[" not in result.stdout
    assert str(root) not in result.stdout  # defaults as a user types them, relative to the repository
    if "pretrain" in script:
        assert "default: data/tokenizers/gpt2" in " ".join(result.stdout.split())
    if "pretrain" in script:
        assert "bundled" in described["--data.source"] and "python -m lit_gpt" in described["--model_name"]
        assert "max_steps wins" in described["--train.max_tokens"]


def test_choice_lists_come_from_the_annotations():
    import typing

    from lit_gpt.config import CHOICES, SSA_TERMS, TEMPERATURE_MODES

    hints = typing.get_type_hints(Config)
    assert CHOICES["attention_temperature"] == TEMPERATURE_MODES == typing.get_args(hints["attention_temperature"])
    assert CHOICES["ssa_query"] == CHOICES["ssa_key"] == CHOICES["ssa_value"] == SSA_TERMS
    assert "position+token" in SSA_TERMS and "LLaMAMLP" in CHOICES["mlp_class_name"]


def test_python_dash_m_lit_gpt_lists_every_preset():
    import subprocess
    import sys

    from lit_gpt.config import name_to_config

    result = subprocess.run([sys.executable, "-m", "lit_gpt"], capture_output=True, text=True, check=True)
    presets, choices = result.stdout.split("\n\n")
    assert [line.split()[0] for line in presets.splitlines()] == list(name_to_config)
    assert "--model.attention_gate" in choices and "headwise | elementwise" in choices and "leviathan" in choices
    assert not result.stderr



def test_every_entry_script_imports_as_a_user_runs_it(tmp_path):
    """Each `python <folder>/<script>.py` sees its own folder as sys.path[0] and the installed packages, not the
    repository root that pytest adds (finetune/lora.py once imported finetune.full, benchmarks/lm_eval_throughput.py
    benchmarks.common and eval.lm_eval_harness, which a user's Python cannot find). One interpreter loads every script
    that way, from another directory, without running its main."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    scripts = sorted(p for folder in ("pretrain", "finetune", "generate", "eval", "scripts", "study", "benchmarks")
                     for p in (root / folder).glob("*.py") if p.name != "__init__.py")
    assert len(scripts) >= 14
    code = """
import runpy, sys, traceback
failures = []
for script in sys.argv[1:]:
    sys.path[0] = script.rsplit("/", 1)[0]
    try:
        runpy.run_path(script, run_name="loaded_by_test")
    except Exception as error:
        failures.append(f"{script}: {type(error).__name__}: {error}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""
    result = subprocess.run([sys.executable, "-c", code, *map(str, scripts)], capture_output=True, text=True,
                            cwd=tmp_path, env={"PATH": ""})
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
