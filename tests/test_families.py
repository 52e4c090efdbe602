"""Qwen2 / Qwen2.5, Qwen3 and Mistral as a user meets them: a Hugging Face folder (tiny random models built by
`transformers`) converted by the streaming converter, generation against `transformers`' own, fine-tuning with
--ssa, and the SSA model exported as remote code and run by `transformers` in a process without lit_gpt."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from finetune.full import setup  # noqa: E402
from lit_gpt.checkpoint import load_checkpoint  # noqa: E402
from lit_gpt.convert import convert_hf_checkpoint, convert_lit_checkpoint  # noqa: E402
from lit_gpt.data.prepare import BUNDLED_WIKI, GPT2_TOKENIZER, REPO_DATA, read_text  # noqa: E402
from lit_gpt.generation import generate, load_for_inference  # noqa: E402
from lit_gpt.tokenizer import Tokenizer  # noqa: E402
from lit_gpt.training import EvalArgs, TrainArgs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_TOKENIZER = REPO_DATA / "tokenizers" / "mistral"
SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
             max_position_embeddings=128)
FAMILIES = {  # (config, tokenizer folder)
    "qwen2": (lambda: transformers.Qwen2Config(**SMALL, vocab_size=50304, tie_word_embeddings=True,
                                               use_sliding_window=False), GPT2_TOKENIZER),
    "qwen3": (lambda: transformers.Qwen3Config(**SMALL, head_dim=16, vocab_size=50304, tie_word_embeddings=False,
                                               use_sliding_window=False), GPT2_TOKENIZER),
    "mistral": (lambda: transformers.MistralConfig(**SMALL, vocab_size=32000, sliding_window=16), MISTRAL_TOKENIZER),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, the Hugging Face folder, the model transformers built, our converted checkpoint)."""
    name = request.param
    make_config, tokenizer_dir = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
    with torch.no_grad():  # biases and q/k norms away from their start, so that the mapping of each is tested
        for key, p in hf_model.named_parameters():
            if key.endswith("bias") or "_norm" in key:
                p.normal_(mean=1.0 if "_norm" in key else 0.0, std=0.1)
    hf_model.save_pretrained(root / "hf")
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, root / "hf" / file.name)
    lit = convert_hf_checkpoint(root / "hf", root / "lit")
    return name, root, hf_model, lit


def test_the_converted_model_computes_and_generates_what_transformers_does(family):
    name, _, hf_model, lit = family
    model, tokenizer = load_for_inference(lit)
    assert model.config.sliding_window == (16 if name == "mistral" else None)
    assert model.config.norm_qk == (name == "qwen3") and model.config.attn_bias == (name == "qwen2")
    ids = tokenizer.encode("The grass is green. The sky is blue. " * 4)[None, :40]  # longer than Mistral's window
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., : hf_model.config.vocab_size], hf_model(ids).logits,
                                   rtol=1e-5, atol=1e-5)
        expected = hf_model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = torch.cat(list(generate(model, ids, 12)), dim=1)
    assert torch.equal(ours, expected[:, ids.size(1):])


def test_the_plain_folder_round_trips(family, tmp_path):
    name, _, hf_model, lit = family
    back = transformers.AutoModelForCausalLM.from_pretrained(convert_lit_checkpoint(lit, tmp_path / "back")).eval()
    assert type(back).__name__ == type(hf_model).__name__
    ids = torch.randint(0, 1000, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_fine_tuning_with_ssa_and_the_remote_code_export(family, tmp_path):
    name, root, _, lit = family
    text = tmp_path / "wiki.txt"
    text.write_text(read_text(BUNDLED_WIKI)[:60_000])
    setup(checkpoint_dir=lit, ssa=True, data=tmp_path / "data", data_source=str(text), out_dir=tmp_path / "run",
          train=TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=2, max_seq_length=48, learning_rate=1e-3,
                          warmup_steps=1, save_interval=None, ssa_position_lr=0.1, ssa_token_lr=0.1),
          eval=EvalArgs(interval=100, max_iters=2, initial_validation=True))
    final = tmp_path / "run" / "final"
    model = load_checkpoint(final).eval()
    assert model.config.attention_temperature == "ssa" and model.transformer.h[0].attn.query_temperature is not None
    hf = convert_lit_checkpoint(final, tmp_path / "remote")
    request = dict(folders=[str(hf)], texts=["The grass is green. The sky is blue. " * 4], length=40, pad=5)
    (tmp_path / "request.json").write_text(json.dumps(request))
    child = [sys.executable, str(ROOT / "tests" / "remote_code_child.py"), str(tmp_path / "request.json"),
             str(tmp_path / "result.pt")]
    result = subprocess.run(child, capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    assert not got["imported lit_gpt"]
    with torch.no_grad():
        torch.testing.assert_close(got[str(hf)]["logits"], model(got[str(hf)]["ids"]), rtol=1e-5, atol=1e-5)


def test_the_mistral_tokenizer_agrees_with_transformers():
    ours = Tokenizer(MISTRAL_TOKENIZER)
    theirs = transformers.AutoTokenizer.from_pretrained(MISTRAL_TOKENIZER)  # converted by transformers itself
    text = "The pass key is 12345. Remember it.\nÉté, naïve café: 3.14 and   spaces."
    assert ours.vocab_size == 32000 and ours.bos_id == 1 and ours.eos_id == 2
    assert ours.encode("Hello world").tolist() == [1, 22557, 1526]  # BOS first, as Mistral's models expect
    assert ours.encode(text, bos=False).tolist() == theirs(text, add_special_tokens=False).input_ids
    assert ours.decode(ours.encode(text)) == text
