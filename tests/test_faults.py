"""Every command-line tool against bad input and faults, as a hostile user would try them.

Each case runs the tool's real entry point (`run_cli` over its main function) and asserts: a non-zero exit, at most
three lines on stderr, no traceback, the expected words in the message, and nothing written, changed or deleted in
the inputs or anywhere in the test's folder. The loss and corruption cases follow, as the tests that would have
caught them.
"""

import hashlib
import importlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import randomize_temperatures, wait_until_it_handles_sigterm

from lit_gpt import GPT, Config
from lit_gpt.checkpoint import save_model_dir
from lit_gpt.convert import convert_hf_checkpoint, convert_lit_checkpoint
from lit_gpt.data.prepare import BUNDLED_CORPUS, GPT2_TOKENIZER, prepare
from lit_gpt.utils import run_cli

ROOT = Path(__file__).resolve().parents[1]


def load_cli(path: str, name: str = "main") -> Callable:
    """The entry function of a script, imported once as the other tests import it (lm-eval's model registry
    refuses a second registration of the same name)."""
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


CLIS = {
    "generate": ("generate/base.py", "main"),
    "perplexity": ("eval/perplexity.py", "main"),
    "passkey": ("eval/passkey.py", "main"),
    "attention": ("eval/attention.py", "main"),
    "lm_eval": ("eval/lm_eval_harness.py", "main"),
    "pretrain": ("pretrain/openwebtext.py", "setup"),
    "finetune": ("finetune/full.py", "setup"),
    "lora": ("finetune/lora.py", "setup"),
    "download": ("scripts/download.py", "download"),
    "reproduce": ("study/reproduce.py", "main"),
}
_loaded: dict[str, Callable] = {}


def cli(name: str) -> Callable:
    if name == "convert_hf":
        return convert_hf_checkpoint
    if name == "convert_lit":
        return convert_lit_checkpoint
    if name == "prepare":
        return prepare
    if name not in _loaded:
        _loaded[name] = load_cli(*CLIS[name])
    return _loaded[name]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under the roots, with a hash of each file's bytes and its mode."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if path.is_file():
                state[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest() + oct(path.stat().st_mode)
            else:
                state[str(path)] = "dir"
    return state


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> SimpleNamespace:
    """Shared inputs, never to be changed by any case: an SSA checkpoint (GPT-2 tokenizer, block 256), a vanilla one,
    its Hugging Face export, prepared token data and a finished two-step run."""
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    ssa = GPT(Config.from_name("debug", vocab_size=50257, attention_temperature="ssa"))
    randomize_temperatures(ssa)
    save_model_dir(ssa, root / "ssa", tokenizer_dir=GPT2_TOKENIZER)
    save_model_dir(GPT(Config.from_name("debug", vocab_size=50257)), root / "vanilla", tokenizer_dir=GPT2_TOKENIZER)
    save_model_dir(GPT(Config.from_name("debug", vocab_size=1000)), root / "small-vocab", tokenizer_dir=GPT2_TOKENIZER)
    convert_lit_checkpoint(root / "vanilla", root / "hf")
    text = lzma.decompress(BUNDLED_CORPUS[1].read_bytes()).decode()[:150_000]
    (root / "corpus.txt").write_text(text)
    (root / "records.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}] * 8))
    prepare(str(root / "corpus.txt"), root / "prepared", train_tokenizer=512, val_fraction=0.05)
    return SimpleNamespace(root=root, ssa=root / "ssa", vanilla=root / "vanilla", small_vocab=root / "small-vocab",
                           hf=root / "hf", corpus=root / "corpus.txt", records=root / "records.json",
                           prepared=root / "prepared")


def copy_of(folder: Path, tmp: Path, name: str = "copy") -> Path:
    shutil.copytree(folder, tmp / name)
    return tmp / name


def with_file(folder: Path, tmp: Path, name: str, content: bytes | str | None) -> Path:
    """A copy of `folder` whose file `name` holds `content` (None: removed)."""
    target = copy_of(folder, tmp)
    if content is None:
        (target / name).unlink()
    else:
        (target / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return target


def truncated(folder: Path, tmp: Path, name: str, keep: float = 0.5) -> Path:
    data = (folder / name).read_bytes()
    return with_file(folder, tmp, name, data[: int(len(data) * keep)])


def config_text(folder: Path, old: str, new: str) -> str:
    text = (folder / "model_config.yaml").read_text()
    assert old in text
    return text.replace(old, new, 1)


def a_file(tmp: Path) -> Path:
    (tmp / "a_file").write_text("not a folder")
    return tmp / "a_file"


def train_args(fx, out: Path, *extra: str) -> list[str]:
    return ["--model_name", "debug", "--model.vocab_size", "512", "--data.dir", str(fx.prepared), "--out_dir",
            str(out), "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "2",
            "--train.max_seq_length", "32", "--eval.max_iters", "1", *extra]


def tune_args(fx, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["--checkpoint_dir", str(fx.vanilla), "--data", str(data or fx.records), "--out_dir", str(out),
            "--train.global_batch_size", "2", "--train.micro_batch_size", "1", "--train.max_steps", "2",
            "--eval.max_iters", "1", *extra]


def gen(folder: Path, *extra: str) -> list[str]:
    return ["--checkpoint_dir", str(folder), "--prompt", "Hello", "--max_new_tokens", "4", *extra]


def meta_without(fx, tmp: Path, key: str) -> Path:
    target = copy_of(fx.prepared, tmp)
    meta = json.loads((target / "meta.json").read_text())
    del meta[key]
    (target / "meta.json").write_text(json.dumps(meta))
    return target


def hf_without(fx, tmp: Path, key: str) -> Path:
    target = copy_of(fx.hf, tmp)
    config = json.loads((target / "config.json").read_text())
    del config[key]
    (target / "config.json").write_text(json.dumps(config))
    return target


def foreign_folder(tmp: Path) -> Path:
    folder = tmp / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def jsonl(tmp: Path, content: bytes) -> Path:
    (tmp / "data.jsonl").write_bytes(content)
    return tmp / "data.jsonl"


def swapped_tokenizer(fx, tmp: Path) -> Path:
    target = copy_of(fx.prepared, tmp)
    shutil.copy(GPT2_TOKENIZER / "tokenizer.json", target / "tokenizer.json")
    return target


def permuted_tokenizer(fx, tmp: Path) -> Path:
    """The vanilla checkpoint with a tokenizer of the same size that gives " the" and " of" each other's ids."""
    target = copy_of(fx.vanilla, tmp, "permuted")
    tokenizer = json.loads((target / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġof"] = vocab["Ġof"], vocab["Ġthe"]
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    return target


def other_architecture_run(fx, tmp: Path) -> Path:
    run_cli(cli("pretrain"), train_args(fx, tmp / "run"))  # a finished 2-step run of the debug model
    return tmp / "run"


# (tool, arguments built from the fixtures and the test's folder, words the message must hold)
CASES: dict[str, tuple[str, Callable, str]] = {
    # generate/base.py
    "pretrain: seed past 2**32": ("pretrain", lambda fx, t: train_args(fx, t / "run", "--seed", str(2**70)),
                                  "--seed must be a whole number from 0 to 4,294,967,295"),
    "pretrain: negative seed": ("pretrain", lambda fx, t: train_args(fx, t / "run", "--seed", "-1"),
                                "--seed must be a whole number from 0"),
    "finetune: two processes do not prepare data": (
        "finetune", lambda fx, t: tune_args(fx, t / "run", "--data_source", str(fx.corpus), "--devices", "2",
                                            data=t / "tokens"), "does not prepare it"),
    "finetune: validation share above 1": ("finetune", lambda fx, t: tune_args(fx, t / "run", "--val_fraction", "1.5"),
                                           "--val_fraction must lie in (0, 1)"),
    "finetune: negative seed": ("finetune", lambda fx, t: tune_args(fx, t / "run", "--seed", "-1"),
                                "--seed must be a whole number from 0"),
    "generate: seed past 2**32": ("generate", lambda fx, t: gen(fx.ssa, "--seed", str(2**70)), "--seed must be"),
    "prepare: negative seed": ("prepare", lambda fx, t: ["--source", str(fx.corpus), "--output_dir", str(t / "o"),
                                                         "--seed", "-1"], "--seed must be a whole number"),
    # resource bombs: refused from the config before anything is allocated, naming the field
    "pretrain: 60,000 layers": ("pretrain", lambda fx, t: train_args(fx, t / "run", "--model.n_layer", "60000",
                                                                     "--model.n_embd", "4096"),
                                "lower --model.n_layer or --model.n_embd"),
    "pretrain: ten billion tokens of vocabulary": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--model.vocab_size", "10000000000"),
        "lower --model.vocab_size"),
    "pretrain: a micro-batch of a million": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--train.micro_batch_size", "1000000",
                                             "--train.global_batch_size", "1000000"), "lower --train.micro_batch_size"),
    "pretrain: a billion validation batches": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--eval.max_iters", "1000000000"),
        "lower --eval.max_iters"),
    "finetune: LoRA of rank a billion": ("lora", lambda fx, t: tune_args(fx, t / "run", "--lora.rank", "1000000000"),
                                         "lower --lora.rank"),
    "generate: a model_config.yaml of a million layers": (
        "generate", lambda fx, t: gen(with_file(fx.ssa, t, "model_config.yaml", (fx.ssa / "model_config.yaml")
                                                .read_text().replace("n_layer: 2", "n_layer: 1000000"))),
        "model_config.yaml: n_layer 1000000"),
    "generate: top_k 0": ("generate", lambda fx, t: gen(fx.ssa, "--top_k", "0"), "--top_k must be at least 1"),
    "generate: top_k negative": ("generate", lambda fx, t: gen(fx.ssa, "--top_k", "-3"), "--top_k must be at least 1"),
    "generate: top_p 0": ("generate", lambda fx, t: gen(fx.ssa, "--top_p", "0"), "--top_p must lie in (0, 1]"),
    "generate: top_p above 1": ("generate", lambda fx, t: gen(fx.ssa, "--top_p", "1.5"), "--top_p must lie in (0, 1]"),
    "generate: negative temperature": ("generate", lambda fx, t: gen(fx.ssa, "--temperature", "-1"),
                                       "--temperature must be 0"),
    "generate: no new tokens": ("generate", lambda fx, t: gen(fx.ssa, "--max_new_tokens", "0"),
                                "--max_new_tokens must be at least 1"),
    "generate: negative new tokens": ("generate", lambda fx, t: gen(fx.ssa, "--max_new_tokens", "-5"),
                                      "--max_new_tokens must be at least 1"),
    "generate: no samples": ("generate", lambda fx, t: gen(fx.ssa, "--num_samples", "0"),
                             "--num_samples must be at least 1"),
    "generate: unknown device": ("generate", lambda fx, t: gen(fx.ssa, "--device", "tpu9"), "--device"),
    "generate: top_k not a number": ("generate", lambda fx, t: gen(fx.ssa, "--top_k", "abc"),
                                     "--top_k takes int | null, got 'abc'"),
    "generate: unknown flag": ("generate", lambda fx, t: gen(fx.ssa, "--bogus", "1"), "unrecognized arguments"),
    "generate: unknown dtype": ("generate", lambda fx, t: gen(fx.ssa, "--dtype", "float8"), "Unknown dtype 'float8'"),
    "generate: missing checkpoint": ("generate", lambda fx, t: gen(t / "nowhere"), "found nothing there"),
    "generate: zero-byte weights": ("generate", lambda fx, t: gen(with_file(fx.ssa, t, "model.safetensors", b"")),
                                    "not a .safetensors file"),
    "generate: truncated weights": ("generate", lambda fx, t: gen(truncated(fx.ssa, t, "model.safetensors")),
                                    "truncated"),
    "generate: malformed config YAML": (
        "generate", lambda fx, t: gen(with_file(fx.ssa, t, "model_config.yaml", "n_layer: [2\n")), "not valid YAML"),
    "generate: config with a word for a number": (
        "generate", lambda fx, t: gen(with_file(fx.ssa, t, "model_config.yaml",
                                                config_text(fx.ssa, "n_layer: 2", "n_layer: two"))),
        "Config.n_layer must be int, got 'two'"),
    "generate: config field typo": (
        "generate", lambda fx, t: gen(with_file(fx.ssa, t, "model_config.yaml",
                                                config_text(fx.ssa, "n_layer:", "n_layre:"))),
        "Did you mean 'n_layer'"),
    "generate: config that is a list": (
        "generate", lambda fx, t: gen(with_file(fx.ssa, t, "model_config.yaml", "- 1\n- 2\n")),
        "should hold a mapping"),
    "generate: weights of another model": (
        "generate", lambda fx, t: gen(with_file(fx.ssa, t, "model.safetensors",
                                                (fx.small_vocab / "model.safetensors").read_bytes())),
        "from another model"),
    "generate: tokenizer larger than the vocabulary": ("generate", lambda fx, t: gen(fx.small_vocab),
                                                       "belong to another model"),
    "generate: no tokenizer": ("generate", lambda fx, t: gen(with_file(fx.ssa, t, "tokenizer.json", None)),
                               "tokenizer"),
    "generate: malformed tokenizer_config.json": (
        "generate", lambda fx, t: gen(with_file(fx.ssa, t, "tokenizer_config.json", "{oops")),
        "tokenizer_config.json' is not valid JSON"),
    "generate: prompt longer than the context": (
        "generate", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--prompt", "word " * 400], "exceeds the model's"),
    "generate: truncate with no room for a prompt": (
        "generate", lambda fx, t: gen(fx.ssa, "--max_new_tokens", "300", "--truncate"), "leaves no room for a prompt"),
    # eval/perplexity.py
    "perplexity: negative window": ("perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--window", "-5"],
                                    "--window must be at least 1"),
    "perplexity: window beyond the context": (
        "perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--window", "4096",
                                     "--output_file", str(t / "p.json")], "--window 4096 exceeds"),
    "perplexity: stride 0": ("perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--stride", "0"],
                             "--stride must be at least 1"),
    "perplexity: no tokens": ("perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--max_tokens", "0"],
                              "--max_tokens must be at least 1"),
    "perplexity: negative start": ("perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--start_char", "-1"],
                                   "--start_char must be 0 or more"),
    "perplexity: missing text": (
        "perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--data", str(t / "none.txt"),
                                     "--output_file", str(t / "p.json")], "found nothing there"),
    "perplexity: binary text": (
        "perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--data", str(jsonl(t, b"\xff\xfe\x00\x81")
                                                                                       .rename(t / "bin.txt")),
                                     "--output_file", str(t / "p.json")], "is not valid UTF-8"),
    "perplexity: output is a folder": (
        "perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--output_file", str(t)],
        "should be a file but a folder is there"),
    "perplexity: output under a file": (
        "perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--output_file", str(a_file(t) / "p.json")],
        "which is a file, not a folder"),
    "perplexity: disk full": (
        "perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--max_tokens", "20",
                                     "--output_file", "/dev/full"], "No space left on device"),
    # eval/passkey.py
    "passkey: length shorter than the prompt": (
        "passkey", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--lengths", "[10]", "--output_dir", str(t / "o")],
        "a passkey prompt needs at least"),
    "passkey: zero length": (
        "passkey", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--lengths", "[0]", "--output_dir", str(t / "o")],
        "a passkey prompt needs at least"),
    "passkey: no lengths": (
        "passkey", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--lengths", "[]", "--output_dir", str(t / "o")],
        "--lengths is empty"),
    "passkey: length beyond the context": (
        "passkey", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--lengths", "[2048]", "--output_dir", str(t / "o")],
        "leave no room"),
    "passkey: no answer tokens": (
        "passkey", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--max_new_tokens", "0"],
        "--max_new_tokens must be at least 1"),
    "passkey: no trials": ("passkey", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--trials", "0"],
                           "--trials must be at least 1"),
    "passkey: depth outside [0, 1]": ("passkey", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--depths", "[1.5]"],
                                      "--depths must be"),
    "passkey: output is a file": (
        "passkey", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--output_dir", str(a_file(t))],
        "should be a folder but a file is there"),
    # eval/attention.py
    "attention: head beyond the model": (
        "attention", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--head", "99", "--output_dir", str(t / "o")],
        "--head 99 does not exist"),
    "attention: one token": (
        "attention", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--max_tokens", "1", "--output_dir", str(t / "o")],
        "--max_tokens must be at least 2"),
    "attention: missing text": (
        "attention", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--text_file", str(t / "none.txt"),
                                    "--output_dir", str(t / "o")], "--text_file"),
    "attention: missing comparison": (
        "attention", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--compare_dir", str(t / "none"),
                                    "--output_dir", str(t / "o")], "found nothing there"),
    "pretrain: val_fraction above 1": (
        "pretrain", lambda fx, t: train_args(fx, t / "o", "--data.val_fraction", "1.5"),
        "--data.val_fraction must lie in (0, 1)"),
    "attention: a comparison with another tokenizer of the same size": (
        "attention", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--compare_dir", str(permuted_tokenizer(fx, t)),
                                    "--output_dir", str(t / "o")], "reads the text as other tokens"),
    "attention: output under a file": (
        "attention", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--output_dir", str(a_file(t) / "o")],
        "which is a file, not a folder"),
    # eval/lm_eval_harness.py
    "lm_eval: negative limit": ("lm_eval", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--limit", "-1"],
                                "--limit must be above 0"),
    "lm_eval: negative few-shot": ("lm_eval", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--num_fewshot", "-1"],
                                   "--num_fewshot must be 0 or more"),
    "lm_eval: missing include path": (
        "lm_eval", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--tasks", "[mine]", "--include_path",
                                  str(t / "tasks")], "--include_path"),
    "lm_eval: output is a folder": ("lm_eval", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--output_file", str(t)],
                                    "should be a file"),
    # scripts/convert_hf_checkpoint.py
    "convert_hf: no config.json": (
        "convert_hf", lambda fx, t: ["--checkpoint_dir", str(with_file(fx.hf, t, "config.json", None)),
                                     "--output_dir", str(t / "out")], "config.json"),
    "convert_hf: malformed config.json": (
        "convert_hf", lambda fx, t: ["--checkpoint_dir", str(with_file(fx.hf, t, "config.json", "{\"n_layer\": ")),
                                     "--output_dir", str(t / "out")], "config.json' is not valid JSON"),
    "convert_hf: config.json missing a key": (
        "convert_hf", lambda fx, t: ["--checkpoint_dir", str(hf_without(fx, t, "num_hidden_layers")),
                                     "--output_dir", str(t / "out")], "lacks the key 'num_hidden_layers'"),
    "convert_hf: unsupported model type": (
        "convert_hf", lambda fx, t: ["--checkpoint_dir", str(with_file(fx.hf, t, "config.json",
                                                                       '{"model_type": "bert"}')),
                                     "--output_dir", str(t / "out")], "Unsupported model_type 'bert'"),
    "convert_hf: truncated download": (
        "convert_hf", lambda fx, t: ["--checkpoint_dir", str(truncated(fx.hf, t, "model.safetensors", 0.7)),
                                     "--output_dir", str(t / "out")], "truncated"),
    "convert_hf: output is the input": (
        "convert_hf", lambda fx, t: ["--checkpoint_dir", str(fx.hf), "--output_dir", str(fx.hf), "--overwrite"],
        "must be apart from the input"),
    "convert_hf: overwrite a folder of other files": (
        "convert_hf", lambda fx, t: ["--checkpoint_dir", str(fx.hf), "--output_dir", str(foreign_folder(t)),
                                     "--overwrite"], "holds files this project did not write (thesis.tex)"),
    "convert_hf: output is a file": (
        "convert_hf", lambda fx, t: ["--checkpoint_dir", str(fx.hf), "--output_dir", str(a_file(t))],
        "is a file, not a folder"),
    "convert_hf: unknown dtype": (
        "convert_hf", lambda fx, t: ["--checkpoint_dir", str(fx.hf), "--output_dir", str(t / "o"), "--dtype", "fp8"],
        "Unknown dtype 'fp8'"),
    # scripts/convert_lit_checkpoint.py
    "convert_lit: missing checkpoint": (
        "convert_lit", lambda fx, t: ["--checkpoint_dir", str(t / "none"), "--output_dir", str(t / "o")],
        "Expected a checkpoint folder"),
    "convert_lit: output inside the input": (
        "convert_lit", lambda fx, t: ["--checkpoint_dir", str(fx.vanilla), "--output_dir", str(fx.vanilla / "hf")],
        "lies inside --checkpoint_dir"),
    "convert_lit: overwrite a folder of other files": (
        "convert_lit", lambda fx, t: ["--checkpoint_dir", str(fx.vanilla), "--output_dir", str(foreign_folder(t)),
                                      "--overwrite"], "did not write"),
    "convert_lit: truncated weights": (
        "convert_lit", lambda fx, t: ["--checkpoint_dir", str(truncated(fx.vanilla, t, "model.safetensors")),
                                      "--output_dir", str(t / "o")], "truncated"),
    # scripts/prepare_openwebtext.py
    "prepare: missing local file": (
        "prepare", lambda fx, t: ["--source", str(t / "corpus.jsonl"), "--output_dir", str(t / "o")],
        "expected a local file or folder there"),
    "prepare: malformed jsonl": (
        "prepare", lambda fx, t: ["--source", str(jsonl(t, b'{"text": "a"}\n{"text": \n')), "--output_dir",
                                  str(t / "o")], "is not a readable json file"),
    "prepare: binary jsonl": (
        "prepare", lambda fx, t: ["--source", str(jsonl(t, bytes(range(256)) * 8)), "--output_dir", str(t / "o")],
        "is not a readable json file"),
    "prepare: jsonl without the text column": (
        "prepare", lambda fx, t: ["--source", str(jsonl(t, b'{"body": "a"}\n{"body": "b"}\n')), "--output_dir",
                                  str(t / "o")], "has no column 'text'"),
    "prepare: no validation share": (
        "prepare", lambda fx, t: ["--source", str(fx.corpus), "--output_dir", str(t / "o"), "--val_fraction", "0"],
        "val_fraction must lie in (0, 1)"),
    "prepare: already prepared": (
        "prepare", lambda fx, t: ["--source", str(fx.corpus), "--output_dir", str(fx.prepared)], "pass --overwrite"),
    "prepare: overwrite a folder of other files": (
        "prepare", lambda fx, t: ["--source", str(fx.corpus), "--output_dir", str(foreign_folder(t)), "--overwrite"],
        "did not write"),
    "prepare: output is the source folder": (
        "prepare", lambda fx, t: ["--source", str(copy_of(fx.prepared, t)), "--output_dir", str(t / "copy"),
                                  "--overwrite"], "must be apart from the input"),
    # pretrain/openwebtext.py
    "pretrain: zero steps": ("pretrain", lambda fx, t: train_args(fx, t / "run", "--train.max_steps", "0"),
                             "--train.max_steps must be at least 1"),
    "pretrain: keep no checkpoints": ("pretrain", lambda fx, t: train_args(fx, t / "run", "--train.keep_last", "0"),
                                      "--train.keep_last must be at least 1"),
    "pretrain: zero clipping norm": ("pretrain", lambda fx, t: train_args(fx, t / "run", "--train.max_norm", "0"),
                                     "--train.max_norm must be above 0"),
    "pretrain: word for a number": ("pretrain", lambda fx, t: train_args(fx, t / "run", "--model.n_layer", "two"),
                                    "n_layer"),
    "pretrain: model field typo": ("pretrain", lambda fx, t: train_args(fx, t / "run", "--model.n_layre", "2"),
                                   "Did you mean 'n_layer'"),
    "pretrain: malformed model_config": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--model_config",
                                             str(with_file(fx.ssa, t, "model_config.yaml", "a: [")
                                                 / "model_config.yaml")), "not valid YAML"),
    "pretrain: window beyond the block": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--train.max_seq_length", "4096"), "exceeds the model's"),
    "pretrain: meta.json missing a key": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--data.dir", str(meta_without(fx, t, "train_tokens"))),
        "lacks the key(s) ['train_tokens']"),
    "pretrain: malformed meta.json": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--data.dir",
                                             str(with_file(fx.prepared, t, "meta.json", "{"))), "not valid JSON"),
    "pretrain: tokenizer files swapped after preparing": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--data.dir", str(swapped_tokenizer(fx, t))),
        "are not those its tokens were made with"),
    "pretrain: another tokenizer asked for": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--data.tokenizer_dir", str(fx.ssa)),
        "another tokenizer"),
    "pretrain: out_dir is a file": ("pretrain", lambda fx, t: train_args(fx, a_file(t)), "is a file, not a folder"),
    "pretrain: resume with another architecture": (
        "pretrain", lambda fx, t: train_args(fx, other_architecture_run(fx, t), "--resume", "auto",
                                             "--train.max_steps", "3", "--model.n_embd", "32"),
        "was trained with another model (n_embd: 64 there, 32 now"),
    # finetune/full.py
    "finetune: a text file as data": ("finetune", lambda fx, t: tune_args(fx, t / "run", data=fx.corpus),
                                      "--data_source"),
    "finetune: missing records": ("finetune", lambda fx, t: tune_args(fx, t / "run", data=t / "none.jsonl"),
                                  "found nothing"),
    "finetune: malformed records": (
        "finetune", lambda fx, t: tune_args(fx, t / "run", data=jsonl(t, b'{"instruction": "a", "output"\n')),
        "is not valid JSON"),
    "finetune: output is the checkpoint": ("finetune", lambda fx, t: tune_args(fx, fx.vanilla),
                                           "must be apart from the input"),
    "finetune: architecture change": ("finetune", lambda fx, t: tune_args(fx, t / "run", "--ssa", "--model.n_layer",
                                                                          "3"), "would change the architecture"),
    "finetune: zero batch": ("finetune", lambda fx, t: tune_args(fx, t / "run", "--train.global_batch_size", "0"),
                             "--train.global_batch_size must be at least 1"),
    "finetune: missing checkpoint": (
        "finetune", lambda fx, t: tune_args(fx, t / "run") + ["--checkpoint_dir", str(t / "none")],
        "found nothing there"),
    # scripts/download.py (the Hub made unreachable whatever the machine's network)
    "download: hub unreachable": ("download", lambda fx, t: ["--repo_id", "org/model", "--checkpoint_root",
                                                             str(t / "ckpts")], "Cannot reach the Hugging Face Hub"),
    # study/reproduce.py
    "reproduce: missing grid": ("reproduce", lambda fx, t: ["--grid", str(t / "grid.yaml")], "found nothing"),
    "reproduce: malformed grid": ("reproduce", lambda fx, t: ["--grid", str(jsonl(t, b"seeds: [1, 2\n"))],
                                  "is not valid YAML"),
    "reproduce: grid without sections": ("reproduce", lambda fx, t: ["--grid", str(jsonl(t, b"seeds: [1]\n")),
                                                                     "--out_dir", str(t / "o")], "lacks the section"),
}


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_in_one_line_and_changes_nothing(fx, tmp_path, capsys, monkeypatch, case):
    tool, build, expected = CASES[case]
    monkeypatch.chdir(tmp_path)
    if tool == "generate" and "device" in case:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if tool == "download":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    argv = build(fx, tmp_path)
    capsys.readouterr()
    before = snapshot(fx.root, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli(tool), argv)
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) <= 3, err
    assert expected in err, err
    assert snapshot(fx.root, tmp_path) == before


def test_cuda_asked_for_without_a_gpu_is_one_line(fx, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        run_cli(cli("generate"), gen(fx.ssa, "--device", "cuda"))
    assert "asks for CUDA but this machine has no usable GPU" in capsys.readouterr().err


def test_passkey_defaults_fit_a_small_model(fx, tmp_path):
    """Block 256: the default lengths (powers of two from 256) do not fit; the context itself is tested instead of
    dividing by zero over no lengths."""
    result = cli("passkey")(checkpoint_dir=fx.ssa, trials=1, depths=[0.5], output_dir=tmp_path / "o")
    assert [cell["length"] for cell in result["cells"]] == [256 - 8]


# ---------------------------------------------------------------- loss and corruption


def pretrain(fx, out: Path, *extra: str) -> None:
    run_cli(cli("pretrain"), train_args(fx, out, "--eval.interval", "100", *extra))


def test_keep_last_prunes_old_step_checkpoints_only(fx, tmp_path):
    pretrain(fx, tmp_path / "run", "--train.max_steps", "5", "--train.save_interval", "1", "--train.keep_last", "2")
    (tmp_path / "run" / "step-notes").mkdir()  # not a checkpoint of the run: never touched
    pretrain(fx, tmp_path / "run", "--train.max_steps", "7", "--train.save_interval", "1", "--train.keep_last", "2",
             "--resume", "auto")
    names = sorted(p.name for p in (tmp_path / "run").glob("step-*"))
    assert names == ["step-00000004", "step-00000006", "step-notes"], names  # the run saved 1-4, then 6
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_resume_skips_a_truncated_latest_checkpoint(fx, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(fx, run, "--train.max_steps", "3", "--train.save_interval", "1")
    shutil.rmtree(run / "final")
    state = run / "step-00000002" / "training_state.pth"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    pretrain(fx, run, "--train.max_steps", "3", "--resume", "auto")
    out = capsys.readouterr().out
    assert "Skipping" in out and "step-00000002" in out and "truncated" in out
    assert f"Resuming from {run / 'step-00000001'}" in out
    assert (run / "final" / "training_state.pth").is_file()


def test_weights_are_readable_by_others(fx, tmp_path):
    old = os.umask(0o022)
    try:
        save_model_dir(GPT(Config.from_name("debug")), tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert oct((tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)


def test_interrupted_writes_leave_no_temporaries_behind(fx, tmp_path):
    """A conversion killed mid-write leaves `.NAME.tmp-PID`; the next write into that place removes it (its process
    is gone), and never one whose process still runs."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.tmp-{os.getppid()}"
    alive.mkdir()
    convert_lit_checkpoint(fx.vanilla, tmp_path / "out")
    assert not stale.exists() and alive.exists()
    assert (tmp_path / "out" / "config.json").is_file()


def test_overwrite_replaces_only_this_projects_output(fx, tmp_path):
    convert_lit_checkpoint(fx.vanilla, tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        convert_lit_checkpoint(fx.vanilla, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    (tmp_path / "out" / "notes.txt").unlink()
    convert_lit_checkpoint(fx.vanilla, tmp_path / "out", overwrite=True)


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "Interrupted"),
                                                   (signal.SIGTERM, 143, "Terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_save_the_step_and_print_one_line(fx, tmp_path, signum, status, word):
    """Ctrl-C, or SIGTERM as Slurm, Kubernetes and systemd send it: the run stops after the step in progress, saves
    it (no checkpoint was due: save_interval is far away) and says in one line where it is; --resume auto goes on."""
    run = tmp_path / "run"
    args = train_args(fx, run, "--train.max_steps", "100000", "--train.save_interval", "1000", "--eval.interval",
                      "1000")
    process = subprocess.Popen([sys.executable, str(ROOT / "pretrain" / "openwebtext.py"), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not (run / "history.jsonl").is_file() and time.time() < deadline:  # training has begun
        time.sleep(0.2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = [line for line in err.splitlines() if line.startswith(word)]
    saved = sorted(run.glob("step-*"))
    assert len(saved) == 1 and len(last) == 1, err
    assert f"the last checkpoint is {saved[0]}" in last[0] and "--resume auto" in last[0], err
    assert not (run / ".lock").exists()
    step = int(saved[0].name.split("-")[1])
    resumed = run_cli(cli("pretrain"), [*train_args(fx, run, "--train.max_steps", str(step + 1)), "--resume",
                                           "auto"])
    assert resumed is None and (run / "final").is_dir()


def test_sigterm_stops_a_tool_in_one_line(fx, tmp_path):
    """Outside a training loop too (here generation, with a long output): exit 143, one line, no traceback."""
    process = subprocess.Popen([sys.executable, str(ROOT / "generate" / "base.py"), "--checkpoint_dir", str(fx.ssa),
                                "--prompt", "The", "--max_new_tokens", "20", "--num_samples", "1000000"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_until_it_handles_sigterm(process.pid)
    time.sleep(1)  # into the generation
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("Terminated (SIGTERM)")


def test_a_process_without_validation_windows_gets_no_empty_batch(fx):
    """Two validation windows over four processes: two processes get none, and no empty array is stacked."""
    from lit_gpt.data.tokens import TokenBatches, TokenData

    batches = TokenBatches(TokenData(fx.prepared), 32, seed=0, global_batch=4, micro_batch=1, eval_iters=2)
    shares = [batches.val(rank, 4) for rank in range(4)]
    assert [len(share) for share in shares] == [1, 1, 0, 0]
    assert all(x.shape == (1, 32) for share in shares for x, _ in share)


# ---------------------------------------------------------------- round two: hostile inputs


def rewrite_header(folder: Path, tmp: Path, edit: Callable[[dict], object], name: str = "model.safetensors") -> Path:
    """A copy of `folder` whose safetensors header is replaced by edit(header) (the data bytes stay as they are)."""
    import struct

    target = copy_of(folder, tmp)
    data = (target / name).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    encoded = json.dumps(edit(header)).encode()
    encoded += b" " * (-len(encoded) % 8)
    (target / name).write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])
    return target


def first_entry(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def relabel(header: dict, dtype: str) -> dict:
    header[first_entry(header)]["dtype"] = dtype
    return header


def overlap(header: dict) -> dict:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = names[0], names[1]
    header[b] = dict(header[b], dtype=header[a]["dtype"], shape=header[a]["shape"],
                     data_offsets=header[a]["data_offsets"])
    return header


def reshape(header: dict) -> dict:
    entry = header[first_entry(header)]
    entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
    return header


def hf_config_with(fx, tmp: Path, **values) -> Path:
    target = copy_of(fx.hf, tmp)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **values}))
    return target


def outside_index(fx, tmp: Path) -> Path:
    target = copy_of(fx.hf, tmp)
    shutil.copy(target / "model.safetensors", tmp / "elsewhere.safetensors")
    (target / "model.safetensors").rename(target / "model-00001.safetensors")
    keys = json.loads((target / "model-00001.safetensors").read_bytes()[8:].split(b"}}")[0] + b"}}").keys()
    index = {"weight_map": {k: "../elsewhere.safetensors" for k in keys if k != "__metadata__"}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    return target


def conv(source: Path, tmp: Path) -> list[str]:
    """A converter's flags: `source` into tmp/out."""
    return ["--checkpoint_dir", str(source), "--output_dir", str(tmp / "out")]


def linked_folder(tmp: Path) -> Path:
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    return tmp / "link"


def meta_with(fx, tmp: Path, **values) -> Path:
    target = copy_of(fx.prepared, tmp)
    meta = json.loads((target / "meta.json").read_text())
    (target / "meta.json").write_text(json.dumps({**meta, **values}))
    return target


def config_with(folder: Path, tmp: Path, **values) -> Path:
    import yaml

    target = copy_of(folder, tmp)
    config = yaml.safe_load((target / "model_config.yaml").read_text())
    (target / "model_config.yaml").write_text(yaml.safe_dump({**config, **values}))
    return target


def nan_weights(folder: Path, tmp: Path) -> Path:
    from safetensors.torch import load_file, save_file

    target = copy_of(folder, tmp)
    state = load_file(target / "model.safetensors")
    state["transformer.ln_f.weight"][0] = float("nan")
    save_file(state, target / "model.safetensors")
    return target


def sentencepiece_only(folder: Path, tmp: Path, content: bytes) -> Path:
    target = copy_of(folder, tmp)
    (target / "tokenizer.json").unlink()
    (target / "tokenizer.model").write_bytes(content)
    return target


def alias_bomb(tmp: Path) -> Path:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp / "bomb.yaml").write_text("\n".join(lines) + "\nname: debug\n")
    return tmp / "bomb.yaml"


def grid_with_misspelt_arm(tmp: Path) -> Path:
    import yaml

    grid = yaml.safe_load((ROOT / "study" / "grid.yaml").read_text())
    grid["quick"]["length"]["arms"] = ["vanilla", "vanila"]
    (tmp / "grid.yaml").write_text(yaml.safe_dump(grid))
    return tmp / "grid.yaml"


CASES.update({
    # outputs that would overwrite inputs
    "perplexity: output is the weights": (
        "perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--output_file",
                                     str(fx.ssa / "model.safetensors")],
        "would replace a file of the input"),
    "perplexity: output is the text": (
        "perplexity", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--data", str(fx.corpus), "--output_file",
                                     str(fx.corpus)], "would replace the input"),
    "lm_eval: output is the config": (
        "lm_eval", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--tasks", "[x]", "--output_file",
                                  str(fx.ssa / "model_config.yaml")], "would replace a file of the input"),
    "convert_lit: output is a symbolic link": (
        "convert_lit", lambda fx, t: ["--checkpoint_dir", str(fx.vanilla), "--output_dir", str(linked_folder(t))],
        "is a symbolic link"),
    # headers that lie
    "convert_hf: float32 labelled I32": (
        "convert_hf", lambda fx, t: conv(rewrite_header(fx.hf, t, lambda h: relabel(h, "I32")), t),
        "mislabels it"),
    "convert_hf: an unknown dtype": (
        "convert_hf", lambda fx, t: conv(rewrite_header(fx.hf, t, lambda h: relabel(h, "F8_X")), t),
        "which this project does not read"),
    "convert_hf: dtype U32": (
        "convert_hf", lambda fx, t: conv(rewrite_header(fx.hf, t, lambda h: relabel(h, "U32")), t),
        "mislabels it"),
    "convert_hf: two entries share bytes": (
        "convert_hf", lambda fx, t: conv(rewrite_header(fx.hf, t, overlap), t),
        "overlaps"),
    "convert_hf: shape does not match the bytes": (
        "convert_hf", lambda fx, t: conv(rewrite_header(fx.hf, t, reshape), t), "needs"),
    "convert_hf: header is a list": (
        "convert_hf", lambda fx, t: conv(rewrite_header(fx.hf, t, lambda h: [1, 2]), t),
        "not a mapping of tensors"),
    "convert_hf: an entry is a number": (
        "convert_hf", lambda fx, t: conv(rewrite_header(fx.hf, t, lambda h: {**h, first_entry(h): 7}), t),
        "is described by 7"),
    "convert_hf: index names a file outside the folder": (
        "convert_hf", lambda fx, t: conv(outside_index(fx, t), t), "not a file of this folder"),
    "convert_lit: float32 labelled I32": (
        "convert_lit", lambda fx, t: conv(rewrite_header(fx.vanilla, t, lambda h: relabel(h, "I32")), t),
        "mislabels it"),
    # weights the config would drop or misread
    "convert_hf: tie_word_embeddings over an own output layer": (
        "convert_hf", lambda fx, t: conv(hf_config_with(fx, t, tie_word_embeddings=True), t),
        "holds its own trained output layer"),
    "generate: tie_embeddings over an own output layer": (
        "generate", lambda fx, t: gen(config_with(fx.vanilla, t, tie_embeddings=True)),
        "holds its own trained output layer"),
    "generate: ssa_slope_form edited": ("generate", lambda fx, t: gen(config_with(fx.ssa, t, ssa_slope_form="sigmoid")),
                                        "the weights store the slopes in the 'log' form"),
    "generate: NaN weights": ("generate", lambda fx, t: gen(nan_weights(fx.ssa, t)), "NaN or infinite weights"),
    "perplexity: NaN weights": ("perplexity", lambda fx, t: ["--checkpoint_dir", str(nan_weights(fx.ssa, t)),
                                                             "--output_file", str(t / "p.json")], "NaN or infinite"),
    "finetune: NaN weights": ("finetune", lambda fx, t: ["--checkpoint_dir", str(nan_weights(fx.vanilla, t)),
                                                         *tune_args(fx, t / "run")[2:]], "NaN or infinite weights"),
    # damaged tokenizer files
    "generate: damaged tokenizer.json": ("generate", lambda fx, t: gen(with_file(fx.ssa, t, "tokenizer.json", "{]")),
                                         "not a tokenizer file"),
    "generate: integer bos_token": ("generate", lambda fx, t: gen(with_file(fx.ssa, t, "tokenizer_config.json",
                                                                            '{"bos_token": 5}')),
                                    "bos_token should be a token"),
    "generate: empty tokenizer.model": ("generate", lambda fx, t: gen(sentencepiece_only(fx.ssa, t, b"")),
                                        "holds no vocabulary"),
    "generate: binary tokenizer.model": ("generate",
                                         lambda fx, t: gen(sentencepiece_only(fx.ssa, t, bytes(range(256)))),
                                         "neither a SentencePiece model"),
    "convert_lit: damaged tokenizer.json": (
        "convert_lit", lambda fx, t: conv(with_file(fx.ssa, t, "tokenizer.json", "{]"), t),
        "not a tokenizer file"),
    # impossible sizes
    "generate: no key/value groups": ("generate", lambda fx, t: gen(config_with(fx.ssa, t, n_query_groups=0)),
                                      "n_query_groups must be at least 1"),
    "generate: block_size 1": ("generate", lambda fx, t: gen(config_with(fx.ssa, t, block_size=1)),
                               "block_size must lie in"),
    "generate: block_size of a billion": ("generate", lambda fx, t: gen(config_with(fx.ssa, t, block_size=10**9)),
                                          "block_size must lie in"),
    "generate: negative head_size": ("generate", lambda fx, t: gen(config_with(fx.ssa, t, head_size=-16)),
                                     "head_size must be at least 1"),
    "generate: rotary_percentage 2": ("generate", lambda fx, t: gen(config_with(fx.ssa, t, rotary_percentage=2.0)),
                                      "rotary_percentage"),
    "generate: partial rope_adjustments": ("generate", lambda fx, t: gen(config_with(fx.ssa, t,
                                                                                     rope_adjustments={"factor": 8})),
                                           "rope_adjustments needs"),
    "convert_hf: zero attention heads": (
        "convert_hf", lambda fx, t: conv(hf_config_with(fx, t, num_attention_heads=0), t),
        "num_attention_heads should be"),
    "convert_hf: rope_scaling as text": (
        "convert_hf", lambda fx, t: conv(hf_config_with(fx, t, rope_scaling="llama3"), t),
        "rope_scaling should be a mapping"),
    "convert_hf: sliding_window as text": (
        "convert_hf", lambda fx, t: conv(hf_config_with(fx, t, sliding_window="4k"), t),
        "sliding_window must be"),
    # wrong types elsewhere
    "pretrain: bogus dtype in meta.json": ("pretrain", lambda fx, t: train_args(fx, t / "run")[:5] + [
        str(meta_with(fx, t, dtype="float99"))] + train_args(fx, t / "run")[6:], "dtype should be one of"),
    "pretrain: max_token_id as text": ("pretrain", lambda fx, t: train_args(fx, t / "run")[:5] + [
        str(meta_with(fx, t, max_token_id="511"))] + train_args(fx, t / "run")[6:], "max_token_id should be a whole"),
    "pretrain: train_tokens as text": ("pretrain", lambda fx, t: train_args(fx, t / "run")[:5] + [
        str(meta_with(fx, t, train_tokens="many"))] + train_args(fx, t / "run")[6:], "train_tokens should be a whole"),
    "prepare: numbers in the text column": (
        "prepare", lambda fx, t: ["--source", str(jsonl(t, b'{"text": "one"}\n{"text": 2}\n')), "--output_dir",
                                  str(t / "p"), "--train_tokenizer", "300"], "not text"),
    "generate: prompt that is not UTF-8": ("generate", lambda fx, t: ["--checkpoint_dir", str(fx.ssa), "--prompt",
                                                                      "caf\udce9", "--max_new_tokens", "2"],
                                           "not valid UTF-8"),
    "reproduce: misspelt arm": ("reproduce", lambda fx, t: ["--grid", str(grid_with_misspelt_arm(t)), "--quick",
                                                            "--out_dir", str(t / "o")], "names the arm 'vanila'"),
    # bounded: a YAML bomb, a multi-node start without its nodes
    "pretrain: YAML alias bomb": ("pretrain", lambda fx, t: ["--model_config", str(alias_bomb(t)),
                                                             *train_args(fx, t / "run")[2:]], "expands into more than"),
    "pretrain: --num_nodes 2 on one machine": ("pretrain", lambda fx, t: train_args(fx, t / "run", "--num_nodes", "2"),
                                               "would wait forever"),
    # misleading messages, now naming the right thing
    "finetune: Latin-1 records": ("finetune", lambda fx, t: tune_args(fx, t / "run", data=jsonl(t, json.dumps(
        [{"instruction": "Café?", "output": "Oui."}], ensure_ascii=False).encode("latin-1"))), "is not UTF-8 text"),
    "finetune: bad line 4 of a jsonl": ("finetune", lambda fx, t: tune_args(fx, t / "run", data=jsonl(
        t, b'{"instruction": "a", "output": "b"}\n' * 3 + b'{"instruction": \n')), "line 4"),
    "pretrain: out_dir is the data folder": ("pretrain", lambda fx, t: train_args(fx, fx.prepared),
                                             "must be apart from the input"),
    "convert_hf: checkpoint_dir '.'": ("convert_hf", lambda fx, t: ["--checkpoint_dir", "."], "config.json"),
    "pretrain: --devices 4 with a batch of 4 x 2": (
        "pretrain", lambda fx, t: train_args(fx, t / "run", "--devices",
        "4"),
                                                    "must be a multiple of --train.micro_batch_size 2 times"),
})


def test_round_two_counts(fx):
    assert len(CASES) >= 140


def test_perplexity_never_writes_through_a_link(fx, tmp_path):
    folder = copy_of(fx.ssa, tmp_path)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (folder / "perplexity.json").symlink_to(outside)
    run_cli(cli("perplexity"), ["--checkpoint_dir", str(folder), "--max_tokens", "40", "--output_file",
                                str(folder / "perplexity.json")])
    assert outside.read_text() == "keep me"
    assert not (folder / "perplexity.json").is_symlink() and "nll" in (folder / "perplexity.json").read_text()


def test_an_output_file_in_folders_that_do_not_exist_yet_is_written_not_lost_after_the_work(fx, tmp_path):
    """Round three, item 6: the scores are written, the folders made, rather than a failure after minutes of work."""
    target = tmp_path / "no" / "such" / "dir" / "x.json"
    run_cli(cli("perplexity"), ["--checkpoint_dir", str(fx.ssa), "--max_tokens", "40", "--output_file", str(target)])
    assert "nll" in target.read_text()


def test_checkpoints_are_staged_on_the_outputs_own_disk(fx, tmp_path, monkeypatch):
    """A system temporary folder that cannot be written (a small TMPDIR, full) does not stop the checkpoints."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", "/dev/full/none")
    pretrain(fx, tmp_path / "run")
    assert (tmp_path / "run" / "final" / "training_state.pth").is_file()


def full_disk(monkeypatch, after: int = 0) -> None:
    """safetensors' writer as it fails on a full disk (checked on a 40 MB tmpfs: its own error type, the reason in
    the text), after `after` successful files; half of the file is written first, as a full disk leaves it."""
    from safetensors import SafetensorError

    import lit_gpt.checkpoint

    real, calls = lit_gpt.checkpoint.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) <= after:
            return real(tensors, path, metadata=metadata)
        Path(path).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(lit_gpt.checkpoint, "save_file", save_file)


@pytest.mark.parametrize("tool", ["pretrain", "lora", "merge_lora", "convert_lit"])
def test_a_full_disk_while_writing_names_the_output_and_leaves_no_temporary(fx, tmp_path, monkeypatch, capsys, tool):
    from scripts.merge_lora import merge_lora

    out = tmp_path / "out"
    if tool == "merge_lora":
        run_cli(cli("lora"), tune_args(fx, tmp_path / "run"))
        full_disk(monkeypatch)
        argv = ["--checkpoint_dir", str(fx.vanilla), "--lora_dir", str(tmp_path / "run"), "--output_dir", str(out)]
    elif tool == "convert_lit":  # streamed by our own writer: a plain OSError without a file name
        from lit_gpt.checkpoint import SafetensorsStreamWriter

        def write(self, name, tensor):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(SafetensorsStreamWriter, "write", write)
        argv = ["--checkpoint_dir", str(fx.vanilla), "--output_dir", str(out)]
    else:
        full_disk(monkeypatch, after=1 if tool == "lora" else 0)  # LoRA: the adapter file is written, the merge not
        argv = train_args(fx, out, "--eval.interval", "100") if tool == "pretrain" else tune_args(fx, out)
    function = {"merge_lora": merge_lora, "convert_lit": convert_lit_checkpoint}.get(tool) or cli(tool)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(function, argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    named = out / "final" if tool in ("pretrain", "lora") else out
    assert err.startswith("error: No space left on device while writing") and f"{str(named)!r}" in err, err
    assert "Traceback" not in err and ".tmp" not in err
    assert not list(tmp_path.rglob(".*tmp*")) and not named.exists()

def test_a_second_conversion_into_the_same_folder_is_refused(fx, tmp_path):
    from lit_gpt.checkpoint import output_lock

    with output_lock(tmp_path / "out"):  # another conversion is writing there
        with pytest.raises(FileExistsError, match="is being written by another process"):
            convert_lit_checkpoint(fx.vanilla, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    convert_lit_checkpoint(fx.vanilla, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file() and not list(tmp_path.glob(".out.*"))


def test_resume_drops_a_torn_last_history_record(fx, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(fx, run, "--train.max_steps", "2", "--train.save_interval", "1")
    shutil.rmtree(run / "final")
    with open(run / "history.jsonl", "a") as f:
        f.write('{"step": 3, "tokens": 1')  # what a kill during the append leaves
    capsys.readouterr()
    pretrain(fx, run, "--train.max_steps", "3", "--resume", "auto")
    assert "its last line is incomplete" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == sorted(s for s in steps if s) and (run / "final").is_dir()


def test_resume_with_another_global_batch_is_refused(fx, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(fx, run, "--train.max_steps", "2", "--train.save_interval", "1")
    shutil.rmtree(run / "final")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        pretrain(fx, run, "--train.max_steps", "3", "--train.global_batch_size", "2", "--resume", "auto")
    assert "resume with the run's own batch size" in capsys.readouterr().err


def test_a_tiktoken_file_replaced_in_place_is_read_again(tmp_path):
    import base64

    from lit_gpt.tokenizer import Tokenizer

    def vocabulary(tokens: list[bytes]) -> None:
        lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
        lines += [f"{base64.b64encode(t).decode()} {256 + i}" for i, t in enumerate(tokens)]
        (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")

    vocabulary([b"ab"])
    first = Tokenizer(tmp_path).encode("ab", bos=False).tolist()
    vocabulary([b"ba", b"ab"])  # the same path, other contents
    assert Tokenizer(tmp_path).encode("ab", bos=False).tolist() != first == [256]


def test_reexport_onto_an_earlier_ssa_export_with_overwrite(fx, tmp_path):
    convert_lit_checkpoint(fx.ssa, tmp_path / "hf")
    convert_lit_checkpoint(fx.ssa, tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "modeling_lit_gpt_hf_ssa.py").is_file()  # the debug layout: a Llama with SSA


def test_an_unknown_key_in_an_exports_lit_config_names_the_file(fx, tmp_path):
    from lit_gpt.remote.configuration import LitGPTSSAConfig
    from lit_gpt.remote.modeling import LitGPTSSAForCausalLM

    config = LitGPTSSAConfig(lit_config={**Config.from_name("debug").to_dict(), "n_layers": 3})
    config._name_or_path = str(tmp_path / "export")
    with pytest.raises(ValueError, match=r"export/config.json, lit_config: Unknown config field 'n_layers'"):
        LitGPTSSAForCausalLM(config)


def test_a_terminal_that_cannot_show_a_character_gets_an_escape(tmp_path):
    code = ("from lit_gpt.utils import run_cli\n"
            "def main(word: str = 'café') -> None:\n    print(word)\n"
            "run_cli(main, [])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert result.returncode == 0 and result.stdout.strip() == "caf\\xe9", result.stderr


def test_replacing_a_folder_leaves_the_old_or_the_new_one_at_every_instant(tmp_path):
    """The swap is atomic where renameat2 exists (Linux); a replacement killed between the fallback's two renames
    leaves `.NAME.old-PID`, which the next look for the folder puts back instead of deleting it as stale."""
    from lit_gpt.checkpoint import exchange, move_into_place, recover_replaced, remove_stale_temporaries

    target, new = tmp_path / "final", tmp_path / ".final.tmp"
    target.mkdir()
    (target / "which").write_text("old")
    new.mkdir()
    (new / "which").write_text("new")
    if sys.platform == "linux":
        assert exchange(new, target) and (target / "which").read_text() == "new"
        assert (new / "which").read_text() == "old"
        exchange(new, target)
    move_into_place(new, target)
    assert (target / "which").read_text() == "new" and not new.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".final.old-{dead.pid}"  # the fallback killed between its renames: no final/ at all
    target.rename(aside)
    remove_stale_temporaries(target)
    assert (target / "which").read_text() == "new" and not aside.exists()
    assert recover_replaced(target) is None  # nothing to do when the folder is there


def test_resume_after_a_kill_between_the_renames_of_final_continues_the_run(fx, tmp_path, capsys):
    """The continued run's final/ was set aside and the new one not yet in place: --resume auto must find the old
    final/, keep the history and continue from its step, not start again from step 0."""
    run = tmp_path / "run"
    run_cli(cli("pretrain"), train_args(fx, run, "--train.max_steps", "2"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "final").rename(run / f".final.old-{dead.pid}")
    (run / ".final.tmp").mkdir()  # the new one, half written
    capsys.readouterr()
    run_cli(cli("pretrain"), [*train_args(fx, run, "--train.max_steps", "3"), "--resume", "auto"])
    assert f"Resuming from {run / 'final'}" in capsys.readouterr().out  # not a new run from step 0
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history if "train_loss" in h] == [1, 2, 3]
    assert torch.load(run / "final" / "training_state.pth", weights_only=True)["step"] == 3


def test_a_deleted_lock_file_does_not_let_a_second_run_in(tmp_path):
    from lit_gpt.checkpoint import RunLock

    first = RunLock(tmp_path / "run")
    (tmp_path / "run" / ".lock").unlink()  # someone tidies the folder while the run goes on
    with pytest.raises(FileExistsError, match="is in use by another run"):
        RunLock(tmp_path / "run")
    first.release()
    RunLock(tmp_path / "run").release()


def test_generate_piped_into_head_stops_quietly(fx):
    """`generate | head -c 5`: the reader goes away; no "Broken pipe" message, no traceback (exit 141, as SIGPIPE)."""
    command = (f"{sys.executable} {ROOT / 'generate' / 'base.py'} --checkpoint_dir {fx.ssa} --prompt The"
               " --max_new_tokens 20 --num_samples 200 | head -c 5")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, cwd=ROOT)
    assert len(result.stdout) == 5 and result.returncode == 141, result.stderr
    assert "Broken pipe" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_named_pipe_as_output_file_is_refused_before_the_work(fx, tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    with pytest.raises(SystemExit) as error:
        run_cli(cli("perplexity"), ["--checkpoint_dir", str(fx.ssa), "--max_tokens", "64", "--output_file", str(fifo)])
    assert error.value.code == 1 and fifo.is_fifo()


def test_a_legal_long_output_name_is_written_and_a_stale_temporary_removed(tmp_path):
    from lit_gpt.utils import write_file

    long = tmp_path / ("p" * 245 + ".json")  # 250 bytes: legal; ".NAME.tmp-PID" would not be
    write_file(long, "{}")
    assert long.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == [long.name]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, alive = tmp_path / f".perplexity.json.tmp-{dead.pid}", tmp_path / f".perplexity.json.tmp-{os.getppid()}"
    stale.write_text("half")
    alive.write_text("being written")
    write_file(tmp_path / "perplexity.json", "{}")
    assert not stale.exists() and alive.exists()  # a live writer's temporary is never touched


def test_an_export_never_copies_a_linked_file_from_outside_the_folder(fx, tmp_path):
    private = tmp_path / "secrets.json"
    private.write_text('{"token": "hf_private"}')
    source = copy_of(fx.vanilla, tmp_path)
    (source / "special_tokens_map.json").symlink_to(private)
    convert_lit_checkpoint(source, tmp_path / "export")
    assert not (tmp_path / "export" / "special_tokens_map.json").exists()
    assert "hf_private" not in "".join(p.read_text(errors="replace") for p in (tmp_path / "export").iterdir()
                                       if p.is_file())


@pytest.mark.parametrize("name", ["tokenizer_config.json", "meta.json"])
def test_a_json_nesting_bomb_is_one_line(fx, tmp_path, name):
    from lit_gpt.data.tokens import TokenData
    from lit_gpt.tokenizer import Tokenizer

    folder = with_file(fx.prepared if name == "meta.json" else fx.vanilla, tmp_path, name, "[" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        TokenData(folder) if name == "meta.json" else Tokenizer(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_a_file_this_user_may_not_read_is_said_to_be_unreadable_not_missing(fx, tmp_path, monkeypatch, capsys, name):
    """safetensors reports a file it may not open as "No such file or directory"; the loaders check first."""
    import builtins
    import errno

    import lit_gpt.utils

    folder = copy_of(fx.vanilla, tmp_path)
    (folder / name).chmod(0)
    if os.geteuid() == 0:  # root reads anything: refuse the open as the system does for any other user

        def refusing_open(path, *args, **kwargs):
            if Path(path) == folder / name:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return builtins.open(path, *args, **kwargs)

        monkeypatch.setattr(lit_gpt.utils, "open", refusing_open, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli("generate"), gen(folder))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{str(folder / name)!r}" in err and "exists but cannot be read (Permission denied)" in err, err


def test_evaluations_write_beside_a_runs_checkpoint_not_inside_it(fx, tmp_path, monkeypatch):
    """Round three, item 6: a run's final/ is replaced when the run continues, and took the results inside it along."""
    monkeypatch.chdir(tmp_path)
    final = copy_of(fx.ssa, tmp_path / "run", "final")
    before = snapshot(final)
    run_cli(cli("perplexity"), ["--checkpoint_dir", str(final), "--max_tokens", "40"])
    run_cli(cli("passkey"), ["--checkpoint_dir", str(final), "--lengths", "[128]", "--depths", "[0.5]", "--trials",
                          "1"])
    run_cli(cli("attention"), ["--checkpoint_dir", "run/final", "--max_tokens", "16"])
    assert snapshot(final) == before
    results = tmp_path / "out" / "eval" / "run-final"
    assert "nll" in (results / "perplexity.json").read_text()
    assert "per_length" in (results / "passkey" / "passkey.json").read_text()
    assert (results / "attention" / "attention.json").is_file()


def test_a_run_that_loses_the_race_to_prepare_its_data_uses_the_winners(fx, tmp_path, capsys):
    """Two launches found the folder unprepared; the second to get there used to be told to pass --overwrite, which
    the training scripts do not have. It now finds the data prepared and uses it, changing nothing."""
    from lit_gpt.data.prepare import prepare_before_launch

    folder = copy_of(fx.prepared, tmp_path)
    before = snapshot(folder)
    prepare_before_launch(str(fx.corpus), folder, 1, train_tokenizer=512, val_fraction=0.05)
    assert "was prepared meanwhile by another run; using it" in capsys.readouterr().out
    assert snapshot(folder) == before
