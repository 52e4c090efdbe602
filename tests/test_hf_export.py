"""Models with SSA (or a baseline temperature) exported as Hugging Face remote code: what transformers computes from
the exported folder, in a fresh process that cannot import lit_gpt, against this project's own results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_temperatures, write_sums_task

from lit_gpt import GPT, Config
from lit_gpt.checkpoint import load_checkpoint, save_model_dir
from lit_gpt.convert import convert_hf_checkpoint, convert_lit_checkpoint
from lit_gpt.data.prepare import GPT2_TOKENIZER
from lit_gpt.export import exports_as_family
from lit_gpt.generation import generate, load_for_inference
from lit_gpt.hf import ARCHITECTURES, hf_model_type

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_layer=2, n_embd=64, n_head=4, block_size=256, vocab_size=50257)
CASES = {
    "gpt2 ssa": dict(name="gpt2", **SMALL, attention_temperature="ssa"),
    "pythia ssa": dict(name="pythia-14m", attention_temperature="ssa"),
    "llama gqa rope-scaling ssa": dict(name="Llama-3.2-1B", **SMALL, n_query_groups=2, head_size=16,
                                       intermediate_size=128, padded_vocab_size=50304, attention_temperature="ssa"),
    "pythia ssa separate keys official": dict(name="pythia-14m", attention_temperature="ssa",
                                              ssa_token_weights="separate", ssa_key="position+token",
                                              ssa_slope_form="official"),
    "pythia ssa query position only": dict(name="pythia-14m", attention_temperature="ssa", ssa_query="position",
                                           ssa_value="none"),
    "pythia ssa_position": dict(name="pythia-14m", attention_temperature="ssa_position"),
    "pythia ssmax": dict(name="pythia-14m", attention_temperature="ssmax"),
    "llama logn": dict(name="Llama-3.2-1B", **SMALL, n_query_groups=1, head_size=16, intermediate_size=128,
                       padded_vocab_size=50304, attention_temperature="logn", logn_length=16),
    "gpt2 constant": dict(name="gpt2", **SMALL, attention_temperature="constant"),
    "pythia gate headwise": dict(name="pythia-14m", attention_gate="headwise"),
    "mistral gqa window selective elementwise gate": dict(name="Llama-3.2-1B", **SMALL, n_query_groups=2,
                                                          head_size=16, intermediate_size=128,
                                                          padded_vocab_size=50304, sliding_window=16,
                                                          selective_mask="leviathan", attention_gate="elementwise"),
    "gpt2 ssa with gate": dict(name="gpt2", **SMALL, attention_temperature="ssa", attention_gate="headwise"),
    "pythia selective": dict(name="pythia-14m", selective_mask="leviathan"),
}
WRAPPED = "mistral gqa window selective elementwise gate"  # what no family class expresses: the wrapper
TRAINED = ("llama gqa rope-scaling ssa", "gpt2 ssa with gate")  # also through pipeline, PEFT and the Trainer
TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case saved as our checkpoint, exported, and run by transformers in one fresh process."""
    root = tmp_path_factory.mktemp("export")
    folders = {}
    for i, (case, values) in enumerate(CASES.items()):
        values = dict(values)
        torch.manual_seed(i)
        model = GPT(Config.from_name(values.pop("name"), **values))
        randomize_temperatures(model, seed=i)
        save_model_dir(model, root / f"lit-{i}", tokenizer_dir=GPT2_TOKENIZER)
        convert_lit_checkpoint(root / f"lit-{i}", root / f"hf-{i}")
        folders[case] = (root / f"lit-{i}", root / f"hf-{i}")
    request = dict(folders=[str(hf) for _, hf in folders.values()], texts=[TEXT], length=24, pad=7,
                   train=[str(folders[case][1]) for case in TRAINED])
    (root / "request.json").write_text(json.dumps(request))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "remote_code_child.py"), str(root / "request.json"),
                             str(root / "result.pt")], capture_output=True, text=True, cwd=root,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    return folders, torch.load(root / "result.pt", weights_only=False), request


def test_the_export_loads_without_this_project(exported):
    folders, results, _ = exported
    assert results["imported lit_gpt"] is False
    for case, (lit, hf) in folders.items():
        config = Config.from_file(lit)
        if exports_as_family(config):  # transformers' own class of the family, with the temperatures (hf_ssa)
            family = ARCHITECTURES[hf_model_type(config)]
            ssa_class = family.replace("ForCausalLM", "SSAForCausalLM").replace("LMHeadModel", "SSALMHeadModel")
            assert results[str(hf)]["class_name"] == ssa_class, case
            assert family in results[str(hf)]["bases"], case
            code = {"modeling_lit_gpt_hf_ssa.py"}
        else:
            assert results[str(hf)]["class_name"] == "LitGPTSSAForCausalLM", case
            code = {"configuration_lit_gpt_ssa.py", "modeling_lit_gpt_ssa.py"}
        assert results[str(hf)]["module"].startswith("transformers_modules")
        names = {p.name for p in hf.iterdir()}
        assert code | {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                       "generation_config.json", "README.md"} <= names, case
        card = (hf / "README.md").read_text()
        assert "attention_temperature" in card and f"`{folders[case][0].name}`" in card
        assert str(folders[case][0].parent) not in card  # the folder's name, never the machine's path


@pytest.mark.parametrize("case", TRAINED)
def test_a_family_export_runs_in_a_pipeline_and_trains_with_peft_and_the_trainer(exported, case):
    """In the process that cannot import lit_gpt: the text-generation pipeline writes what generate does, and LoRA
    with the added modules in modules_to_save trains them and the adapters in a step of the Trainer."""
    folders, results, _ = exported
    got = results[str(folders[case][1])]
    assert got["piped"] == got["generated"] and got["piped"]
    assert any("lora_B" in n for n in got["moved"]) and any("query_temperature" in n for n in got["moved"])
    assert any(".gate." in n for n in got["moved"]) == ("gate" in case)


@pytest.mark.parametrize("case", CASES)
def test_transformers_computes_what_we_compute(exported, case):
    folders, results, request = exported
    lit, hf = folders[case]
    got = results[str(hf)]
    model = load_checkpoint(lit).eval()
    ids = got["ids"]
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(ids), rtol=1e-5, atol=1e-5)
        # generate/base.py's path: load_for_inference, greedy decoding with the KV cache
        fast, _ = load_for_inference(lit)
        ours = torch.cat(list(generate(fast, ids, 32)), 1)
    assert torch.equal(got["greedy"], ours), case


@pytest.mark.parametrize("case", CASES)
def test_left_padded_rows_equal_the_unpadded_ones(exported, case):
    folders, results, request = exported
    got = results[str(folders[case][1])]
    torch.testing.assert_close(got["padded_logits"], got["short_logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["batch_greedy"][1:], got["short_greedy"])
    assert torch.equal(got["batch_greedy"][:1], got["greedy"][:, :8])


def test_what_a_family_class_can_express_exports_as_the_family_and_the_rest_as_the_wrapper(exported):
    """What transformers' family classes with lit_gpt.hf_ssa can express (a temperature, a gate, selective attention)
    goes out that way; selective attention in a sliding window (the family's cache drops keys whose sums it needs)
    goes out as the wrapper."""
    kinds = {case: exports_as_family(Config.from_file(lit)) for case, (lit, _) in exported[0].items()}
    assert kinds["llama gqa rope-scaling ssa"] and kinds["llama logn"] and kinds["pythia ssa"]
    assert kinds["pythia gate headwise"] and kinds["gpt2 ssa"] and kinds["gpt2 constant"]
    assert kinds["gpt2 ssa with gate"] and kinds["pythia selective"]
    assert not kinds[WRAPPED]


@pytest.mark.parametrize("case", ["gpt2 ssa", "llama gqa rope-scaling ssa", "llama logn", "pythia ssa separate keys"
                                  " official", "pythia gate headwise", "pythia selective"])
def test_round_trip_gives_identical_weights(exported, tmp_path, case):
    from safetensors.torch import load_file

    lit, hf = exported[0][case]
    back = convert_hf_checkpoint(hf, tmp_path / "back")
    a, b = load_file(lit / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Config.from_file(back).to_dict() == Config.from_file(lit).to_dict()


def test_a_model_without_temperature_stays_a_plain_hugging_face_folder(tmp_path):
    model = GPT(Config.from_name("pythia-14m", vocab_size=50257))
    save_model_dir(model, tmp_path / "lit", tokenizer_dir=GPT2_TOKENIZER)
    convert_lit_checkpoint(tmp_path / "lit", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and "auto_map" not in config
    assert not (tmp_path / "hf" / "modeling_lit_gpt_ssa.py").exists()


def test_the_modeling_file_is_generated_from_the_model_file(exported):
    from lit_gpt.export import modeling_source

    hf = exported[0][WRAPPED][1]
    text = (hf / "modeling_lit_gpt_ssa.py").read_text()
    assert text == modeling_source()
    model_py = (ROOT / "lit_gpt" / "model.py").read_text()
    assert "class ScaleByTemperature" in text and model_py.split("class GPT(")[1][:2000] in text


def test_the_modeling_file_imports_only_what_a_transformers_user_has(exported):
    """Project imports are removed by parsing (one over several lines and one inside a function included): what is
    left is the standard library, torch, transformers and what it depends on (yaml, safetensors) and the exported
    configuration module."""
    import ast
    import sys

    from lit_gpt.export import without_project_imports

    tree = ast.parse((exported[0][WRAPPED][1] / "modeling_lit_gpt_ssa.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or "").split(".")[0])
    allowed = {"torch", "transformers", "yaml", "safetensors", ".configuration_lit_gpt_ssa"}
    assert imported - allowed <= set(sys.stdlib_module_names), imported
    assert "torch" in imported and ".configuration_lit_gpt_ssa" in imported
    source = ("import math\nfrom lit_gpt.config import (\n    Config,\n    read_yaml,\n)\n\n\ndef f():\n"
              "    from lit_gpt.checkpoint import load_checkpoint\n\n    return math.pi\n")
    assert without_project_imports(source, "x.py") == "import math\n\n\ndef f():\n\n    return math.pi\n"


def test_lm_eval_hf_model_agrees_with_our_adapter(exported, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    import importlib

    from lm_eval.tasks import TaskManager

    importlib.import_module("lm_eval.models")  # registers "hf" (lm-eval skips it once our adapter has registered)

    from lit_gpt.harness import LitLM

    lit, hf = exported[0]["pythia ssa"]
    tasks = TaskManager(include_path=str(write_sums_task(tmp_path, "tiny_sums_hf")))
    runs = [lm_eval.simple_evaluate(model=model, model_args=args, tasks=["tiny_sums_hf"], task_manager=tasks,
                                    log_samples=True, batch_size=1)
            for model, args in (("hf", f"pretrained={hf},trust_remote_code=True,dtype=float32,device=cpu"),
                                (LitLM(str(lit)), None))]
    scores = [[[r[0] for r in s["filtered_resps"]] for s in run["samples"]["tiny_sums_hf"]] for run in runs]
    assert len(scores[0]) == 4
    for a, b in zip(*scores):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert runs[0]["results"]["tiny_sums_hf"]["acc,none"] == runs[1]["results"]["tiny_sums_hf"]["acc,none"]


def test_an_export_whose_slope_form_was_edited_is_refused(exported, tmp_path):
    """The weights record the form their slopes are stored in; a config.json that names another one would read other
    slopes from the same numbers. (Every SSA case here goes out as its family, so the wrapper is written directly:
    an architecture no family expresses would get it.)"""
    from transformers import AutoModelForCausalLM

    from lit_gpt.export import write_remote_model

    lit = exported[0]["gpt2 ssa"][0]
    folder = tmp_path / "edited"
    folder.mkdir()
    write_remote_model(lit, Config.from_file(lit), folder, None)
    config = json.loads((folder / "config.json").read_text())
    config["lit_config"]["ssa_slope_form"] = "sigmoid"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the weights store the slopes in the 'log' form"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_a_family_export_whose_slope_form_was_edited_is_refused_by_transformers_and_by_conversion(exported, tmp_path):
    """The same for an export as its family (LlamaSSAForCausalLM): its weights record the form too."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = shutil.copytree(exported[0]["llama gqa rope-scaling ssa"][1], tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    assert config["lit_gpt_ssa"]["ssa_slope_form"] == "log"
    config["lit_gpt_ssa"]["ssa_slope_form"] = "sigmoid"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the weights store the slopes in the 'log' form"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(ValueError, match="the weights store the slopes in the 'log' form"):
        convert_hf_checkpoint(folder, tmp_path / "back")
    assert not (tmp_path / "back").exists()
