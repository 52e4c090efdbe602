"""Helpers shared by the tests (fixtures live in conftest.py): the real assets beside the repository, the tiny model
families, a local lm-eval task and temperatures set to non-trivial values."""

import json
import os
from pathlib import Path

import pytest
import torch

from lit_gpt.checkpoint import load_checkpoint
from lit_gpt.config import TEMPERATURE_MODES  # noqa: F401 (re-exported for the tests)

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_ASSETS = Path(os.environ.get("SSA_SHARED_ASSETS", SHARED / "assets"))

# every tokenizer folder in ../shared/assets/tokenizers, for tests that need a real one
needs_shared_assets = pytest.mark.skipif(
    not SHARED_ASSETS.is_dir(), reason=f"real assets folder {SHARED_ASSETS} is absent"
)

# tiny configs of the three families, for tests of the architecture
FAMILIES = {
    "gpt2": dict(name="gpt2-tiny", block_size=64, vocab_size=97, padding_multiple=32, n_layer=2, n_head=4, n_embd=32,
                 position_embedding="learned", parallel_residual=False, gelu_approximate="tanh", tie_embeddings=True),
    "pythia": dict(name="pythia-tiny", block_size=64, vocab_size=97, padding_multiple=32, n_layer=2, n_head=4,
                   n_embd=32, rotary_percentage=0.25),
    "llama": dict(name="llama-tiny", block_size=64, vocab_size=97, padding_multiple=32, n_layer=2, n_head=4,
                  n_embd=32, n_query_groups=2, rotary_percentage=1.0, parallel_residual=False, bias=False,
                  norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=48,
                  rope_adjustments=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_seq_len=16)),
}


def write_sums_task(folder, name: str):
    """A local lm-evaluation-harness task (four multiple-choice sums) in folder/tasks; returns that folder."""
    records = [{"question": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}"], "answer": 0}
               for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (folder / "tasks").mkdir()
    (folder / "tasks" / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    return folder / "tasks"


def randomize_temperatures(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every temperature (and gate) parameter a non-trivial value, so that tests see SSA at work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.added_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5 + p)


def rotate(x, cos, sin):
    """RoPE on the first cos.size(-1) channels of x (B, T, h, d), rotate-half layout, written from its formula."""
    n = cos.size(-1)
    if n == 0:
        return x
    half = n // 2
    x1, x2, rest = x[..., :half], x[..., half:n], x[..., n:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:], rest), -1)


def trained_checkpoint(folder, text_file):
    """A vanilla checkpoint (debug size, GPT-2 tokenizer) trained briefly on the text, so that its loss lies far
    below ln(vocab) and a wrong start of anything added to it shows in the first validation loss: 50 steps reach a
    training loss of about 6.3 against ln(50257) = 10.8 (120 reached 6.0, for 2.4 times the time)."""
    from lit_gpt import GPT, Config
    from lit_gpt.checkpoint import save_model_dir
    from lit_gpt.data.prepare import GPT2_TOKENIZER
    from lit_gpt.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = GPT(Config.from_name("debug", vocab_size=50257, block_size=128))
    ids = Tokenizer(GPT2_TOKENIZER).encode(text_file.read_text())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(50):
        starts = torch.randint(0, ids.numel() - 65, (8,)).tolist()
        batch = torch.stack([ids[s : s + 65] for s in starts])
        model(batch[:, :-1], targets=batch[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model_dir(model, folder, tokenizer_dir=GPT2_TOKENIZER)
    return folder


def bf16_copy(base, target):
    """The checkpoint as a real download ships it (Llama, Qwen, SmolLM2): every weight in bf16."""
    from lit_gpt.checkpoint import save_model_dir

    save_model_dir(load_checkpoint(base).to(torch.bfloat16), target, tokenizer_dir=base)
    return target


def assert_attention_matches(model, reference, T: int = 12):
    """The first attention layer of a float64 `model` against `reference(attn, config, x, cos, sin)`, written from
    the method's formula: outputs and the gradients of the input and of every parameter agree to 1e-9 relative.
    Returns the input, its cos and sin, and the layer's parameters by name."""
    config, attn = model.config, model.transformer.h[0].attn
    x = torch.randn(2, T, config.n_embd, dtype=torch.float64, requires_grad=True)
    cos, sin = model.cos[:T], model.sin[:T]
    weight = torch.randn(2, T, config.n_embd, dtype=torch.float64)
    params = dict(attn.named_parameters())

    expected = reference(attn, config, x, cos, sin)
    expected_grads = torch.autograd.grad((expected * weight).sum(), [x, *params.values()])
    actual = attn(x, cos, sin, torch.arange(T), torch.arange(T))  # the whole forward of the attention
    actual_grads = torch.autograd.grad((actual * weight).sum(), [x, *params.values()])

    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # without gradients (decoding, evaluation) the temperatures take another path
        torch.testing.assert_close(attn(x, cos, sin, torch.arange(T), torch.arange(T)), expected, rtol=1e-9,
                                   atol=1e-12)
    for name, got, want in zip(["input", *params], actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    return x, cos, sin, params


def wait_until_it_handles_sigterm(pid: int, timeout: float = 120.0) -> None:
    """Wait until process `pid` has installed its SIGTERM handler (Linux: bit 14 of SigCgt in /proc/PID/status), so
    that a signal sent next tests the handler and not how fast a loaded machine starts Python."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = open(f"/proc/{pid}/status").read()
        except FileNotFoundError:
            return  # it ended; the caller's assertions say how
        caught = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
        if caught & (1 << 14):
            return
        time.sleep(0.1)
