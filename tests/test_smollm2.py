"""A real pretrained model end to end: SmolLM2-135M-Instruct from ../shared/assets, through our converter.

Skipped when the shared assets are absent. The Hugging Face folder is built once per session with
../shared/tools/gguf_to_hf.py (about 20 seconds).
"""

import subprocess
import sys

import pytest
import torch
from helpers import SHARED, SHARED_ASSETS, randomize_temperatures

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.checkpoint import load_checkpoint, save_model_dir  # noqa: E402
from lit_gpt.convert import convert_hf_checkpoint, convert_lit_checkpoint  # noqa: E402
from lit_gpt.generation import generate_text  # noqa: E402
from lit_gpt.tokenizer import Tokenizer  # noqa: E402

GGUF = SHARED_ASSETS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} is absent"),
]


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    subprocess.run([sys.executable, str(SHARED / "tools" / "gguf_to_hf.py"), str(GGUF), str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="session")
def lit_dir(hf_dir):
    return convert_hf_checkpoint(hf_dir, hf_dir.with_name("lit"), model_name="SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def model(lit_dir):
    return load_checkpoint(lit_dir).eval()


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def test_logits_equal_transformers(model, hf_model, lit_dir):
    idx = Tokenizer(lit_dir).encode("The capital of France is Paris, and the capital of Italy is").unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, rtol=1e-4, atol=1e-4)


def test_greedy_generation_knows_paris(model, lit_dir):
    assert "Paris" in generate_text(model, Tokenizer(lit_dir), "The capital of France is", max_new_tokens=8)


def test_wiki_perplexity(model, lit_dir):
    text = (SHARED_ASSETS / "corpora" / "wiki.utf8").read_text(encoding="utf-8")[20000:60000]
    ids = Tokenizer(lit_dir).encode(text)[:1024].unsqueeze(0)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    assert loss.exp().item() == pytest.approx(16.3, abs=0.2)


def test_convert_back_loads_in_transformers_with_equal_logits(lit_dir, hf_model):
    back = transformers.AutoModelForCausalLM.from_pretrained(convert_lit_checkpoint(lit_dir, lit_dir.with_name("back")))
    idx = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx).logits, hf_model(idx).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fields", [{"attention_temperature": "ssa"}, {"selective_mask": "leviathan"}],
                         ids=["ssa", "selective"])
def test_the_real_model_with_ssa_or_selective_attention_exports_as_a_llama_that_computes_ours(model, lit_dir, hf_dir,
                                                                                              tmp_path, fields):
    """SmolLM2's real weights with SSA (temperatures moved from their start) or selective attention: exported, the
    folder loads as transformers' Llama with the addition (remote code), gives our logits and our greedy tokens; and
    lit_gpt.hf_ssa on the downloaded Llama itself gives the same."""
    from lit_gpt.generation import generate
    from lit_gpt.hf_ssa import add_selective

    ours = GPT(Config.from_dict(model.config.to_dict() | fields)).eval()
    missing, unexpected = ours.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("temperature" in name for name in missing)
    randomize_temperatures(ours)
    save_model_dir(ours, tmp_path / "lit", tokenizer_dir=lit_dir)
    exported = convert_lit_checkpoint(tmp_path / "lit", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert type(theirs).__name__ == "LlamaSSAForCausalLM"
    idx = Tokenizer(lit_dir).encode("The capital of France is Paris, and the capital of Italy is").unsqueeze(0)
    with torch.no_grad():
        expected = ours(idx)
        torch.testing.assert_close(theirs(idx).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(idx), expected, rtol=1e-4, atol=1e-4)  # the addition changes the model
        greedy = theirs.generate(idx, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, idx.size(1):]
        assert torch.equal(greedy, torch.cat(list(generate(ours, idx, 12)), 1))
        if "selective_mask" in fields:  # no parameters: the downloaded model with add_selective is the same model
            downloaded = add_selective(transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval())
            torch.testing.assert_close(downloaded(idx).logits, expected, rtol=1e-4, atol=1e-4)
