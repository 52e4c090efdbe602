"""Checks that need a CUDA GPU (marked `cuda`: skipped, saying why, where none is). `bash scripts/gpu_check.sh` runs
them with the rest of the suite's model tests on a GPU machine."""

import lzma

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.analysis import recording_attention
from lit_gpt.checkpoint import load_checkpoint
from lit_gpt.data.prepare import BUNDLED_CORPUS, prepare
from lit_gpt.generation import generate
from lit_gpt.training import EvalArgs, TrainArgs

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("mode", ["none", "ssa", "ssmax"])
def test_fused_attention_on_cuda_equals_the_explicit_path_and_the_cpu(mode):
    torch.manual_seed(0)
    model = GPT(Config.from_name("debug", attention_temperature=mode)).eval()
    with torch.no_grad():
        for p in model.temperature_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        cpu = model(x)
        model.to("cuda").reset_rope_cache()
        fused = model(x.cuda())
        with recording_attention(model):
            explicit = model(x.cuda())
    torch.testing.assert_close(fused.cpu(), cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-4)


def test_cached_decoding_on_cuda_equals_the_full_forward():
    torch.manual_seed(0)
    model = GPT(Config.from_name("debug", attention_temperature="ssa")).cuda().eval()
    model.reset_rope_cache()
    x = torch.randint(0, model.config.vocab_size, (1, 30), device="cuda")
    with torch.no_grad():
        full = model(x)
        model.set_kv_cache(1, 30)
        chunks = [model(x[:, a:b], input_pos=torch.arange(a, b, device="cuda")) for a, b in ((0, 7), (7, 8), (8, 30))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-4)
    assert len(list(generate(model.clear_kv_cache() or model, x[:, :5], 4))) == 4


def test_bf16_mixed_pretraining_step_with_ssa(tmp_path):
    """The real entry point, one GPU, bf16-mixed: the loss is finite and falls, temperatures stay float32."""
    from pretrain.openwebtext import DataArgs, setup

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "corpus.txt").write_text(lzma.decompress(BUNDLED_CORPUS[1].read_bytes()).decode()[:200_000])
    data = prepare(str(folder / "corpus.txt"), folder / "prepared", train_tokenizer=512, val_fraction=0.05)
    setup(model_name="debug", ssa=True, model={"vocab_size": 512}, data=DataArgs(dir=data), out_dir=tmp_path / "run",
          train=TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=20, max_seq_length=64,
                          learning_rate=1e-2, warmup_steps=2, save_interval=None),
          eval=EvalArgs(interval=10, max_iters=2, initial_validation=True), precision="bf16-mixed")
    model = load_checkpoint(tmp_path / "run" / "final")
    assert all(p.dtype == torch.float32 for p in model.temperature_parameters())
    import json

    val = [h["val_loss"] for h in json.loads((tmp_path / "run" / "history.json").read_text()) if "val_loss" in h]
    assert all(v == v for v in val) and val[-1] < val[0]


FLASH_CASES = {"ssa": {"attention_temperature": "ssa"},
               "ssa-gqa-1-group": {"attention_temperature": "ssa", "n_query_groups": 1},
               "vanilla-gqa": {"attention_temperature": "none", "n_query_groups": 2}}


@pytest.mark.parametrize("fields", FLASH_CASES.values(), ids=FLASH_CASES)
def test_the_flash_kernel_runs_ssa_and_grouped_queries_in_bf16(fields):
    """FlashAttention itself (forced: no fallback to the math kernel), bf16, with SSA's temperatures and grouped
    queries: the outputs of the math kernel to bf16's precision, gradients included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = GPT(Config.from_name("debug", head_size=64, n_head=4, n_embd=256, **fields)).cuda().to(torch.bfloat16)
    x = torch.randint(0, model.config.vocab_size, (2, 128), device="cuda")
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            loss = model(x, targets=x)
            loss.backward()
        results[backend] = (loss.float(), model.lm_head.weight.grad.float().clone())
        model.zero_grad(set_to_none=True)
    (flash_loss, flash_grad), (math_loss, math_grad) = results.values()
    torch.testing.assert_close(flash_loss, math_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(flash_grad, math_grad, rtol=5e-2, atol=5e-3)


def test_a_run_resumes_on_cuda_with_the_losses_of_one_run(tmp_path):
    from pretrain.openwebtext import DataArgs, setup

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "corpus.txt").write_text(lzma.decompress(BUNDLED_CORPUS[1].read_bytes()).decode()[:200_000])
    data = prepare(str(folder / "corpus.txt"), folder / "prepared", train_tokenizer=512, val_fraction=0.05)

    def run(out, steps, resume=False):
        setup(model_name="debug", ssa=True, model={"vocab_size": 512}, data=DataArgs(dir=data), out_dir=out,
              train=TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=steps, lr_decay_steps=6,
                              max_seq_length=64, learning_rate=1e-2, warmup_steps=2, save_interval=None),
              eval=EvalArgs(interval=100, max_iters=2), precision="32-true", resume=resume)

    import json

    def losses(out):
        return [h["train_loss"] for h in json.loads((out / "history.json").read_text()) if "train_loss" in h]

    run(tmp_path / "whole", 6)
    run(tmp_path / "parts", 3)
    run(tmp_path / "parts", 6, resume="auto")
    torch.testing.assert_close(losses(tmp_path / "parts"), losses(tmp_path / "whole"), rtol=1e-5, atol=1e-5)


def test_bf16_fine_tuning_on_cuda_keeps_float32_masters(tmp_path):
    """A bf16 checkpoint fine-tuned under bf16-mixed on the GPU: weights, SSA's parameters and AdamW's state float32."""
    import json

    from finetune.full import setup
    from lit_gpt.checkpoint import save_model_dir
    from lit_gpt.data.prepare import GPT2_TOKENIZER

    torch.manual_seed(0)
    save_model_dir(GPT(Config.from_name("debug", vocab_size=50257, block_size=64)).to(torch.bfloat16),
                   tmp_path / "base", tokenizer_dir=GPT2_TOKENIZER)
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i} " * 5} for i in range(20)]))
    setup(checkpoint_dir=tmp_path / "base", data=records, out_dir=tmp_path / "run", ssa=True, precision="bf16-mixed",
          train=TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=3, learning_rate=1e-4, warmup_steps=1,
                          save_interval=None), eval=EvalArgs(interval=100, max_iters=2))
    state = torch.load(tmp_path / "run" / "final" / "training_state.pth", weights_only=True)
    assert {t.dtype for t in state["model"].values()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in state["optimizer"]["state"].values()} == {torch.float32}
