"""Checks that need a CUDA GPU (marked `cuda`: skipped, saying why, where none is). `bash scripts/gpu_check.sh` runs
them with the rest of the suite's model tests on a GPU machine."""

import lzma

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.analysis import recording_attention
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
    model = GPT.from_checkpoint(tmp_path / "run" / "final")
    assert all(p.dtype == torch.float32 for p in model.temperature_parameters())
    import json

    val = [h["val_loss"] for h in json.loads((tmp_path / "run" / "history.json").read_text()) if "val_loss" in h]
    assert all(v == v for v in val) and val[-1] < val[0]
