"""llm.c / modded-nanogpt `.bin` shards as pretraining data: shards written here in llm.c's format (a 256-int32
header: magic 20240520, version 1, the token count; then uint16 GPT-2 tokens), read, checked and trained on."""

import json
import lzma

import numpy as np
import pytest
import torch

from lit_gpt.checkpoint import is_checkpoint
from lit_gpt.data.prepare import BUNDLED_CORPUS, GPT2_TOKENIZER, split_documents
from lit_gpt.data.tokens import BinShardData, ConcatenatedTokens, TokenBatches, read_bin_header
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.training import EvalArgs, TrainArgs
from pretrain.openwebtext import DataArgs, setup


def write_llmc_shard(path, tokens, magic=20240520, version=1, dtype=np.uint16):
    """llm.c's data_common.write_datafile, written again from its format."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=dtype).tobytes())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two training shards and one validation shard of GPT-2 tokens, documents led by <|endoftext|> as in llm.c."""
    folder = tmp_path_factory.mktemp("fineweb10B")
    tokenizer = Tokenizer(GPT2_TOKENIZER)
    text = lzma.decompress(BUNDLED_CORPUS[2].read_bytes()).decode()[:120_000]
    tokens = np.concatenate([np.append(50256, tokenizer.encode(d, bos=False).numpy())
                             for d in split_documents(text, size=2000)])
    third = len(tokens) // 3
    write_llmc_shard(folder / "fineweb_val_000000.bin", tokens[:third])
    write_llmc_shard(folder / "fineweb_train_000001.bin", tokens[third:2 * third])
    write_llmc_shard(folder / "fineweb_train_000002.bin", tokens[2 * third:])
    return folder, tokens, third


def test_shards_read_as_one_sequence_across_their_boundary(shards):
    folder, tokens, third = shards
    train = ConcatenatedTokens(sorted(folder.glob("fineweb_train_*.bin")))
    assert len(train) == len(tokens) - third and train.dtype == np.uint16
    boundary = third  # the second shard starts here, in the training sequence
    assert np.array_equal(train[boundary - 5:boundary + 5], tokens[third + boundary - 5:third + boundary + 5])
    assert np.array_equal(train[0:len(train)], tokens[third:])
    assert read_bin_header(folder / "fineweb_val_000000.bin") == (third, np.dtype("<u2"), 50257)


def test_batches_are_a_function_of_seed_and_step_over_the_shards(shards):
    folder, tokens, third = shards
    data = BinShardData(str(folder / "fineweb_train_*.bin"), str(folder / "fineweb_val_*.bin"), GPT2_TOKENIZER)
    batches = TokenBatches(data, 64, seed=1, global_batch=4, micro_batch=2, eval_iters=2)
    x, y = batches.train(step=5, rank=0, world_size=1)
    x1, _ = batches.train(step=5, rank=1, world_size=2)
    assert torch.equal(x[2:], x1) and torch.equal(x[:, 1:], y[:, :-1])
    starts = TokenBatches(data, 64, seed=1, global_batch=4, micro_batch=2, eval_iters=2, window_start="document")
    assert len(starts.starts) > 20  # every document's first token (after llm.c's leading <|endoftext|>), both shards
    assert all(o == 0 or data.train[o - 1:o][0] == 50256 for o in starts.starts.tolist())
    assert (starts.starts > len(data.train.parts[0])).any()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:1000], "fewer than the 1024-byte header"),
    (lambda b: b[:-2], "its header counts"),
    (lambda b: np.int32(12345).tobytes() + b[4:], "is not an llm.c .bin shard: its header starts with 12345"),
    (lambda b: b[:4] + np.int32(2).tobytes() + b[8:], "header version 2, expected 1"),
])
def test_a_truncated_or_foreign_shard_is_one_line(shards, tmp_path, damage, message):
    folder, _, _ = shards
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage((folder / "fineweb_val_000000.bin").read_bytes()))
    with pytest.raises(ValueError, match=message) as error:
        read_bin_header(bad)
    assert "\n" not in str(error.value)


def test_pretraining_runs_from_llmc_shards_and_resumes(shards, tmp_path):
    folder, _, _ = shards
    data = DataArgs(train_bin=str(folder / "fineweb_train_*.bin"), val_bin=str(folder / "fineweb_val_*.bin"))
    train = dict(global_batch_size=4, micro_batch_size=2, max_seq_length=64, learning_rate=1e-2, min_lr=1e-3,
                 warmup_steps=1, save_interval=2)
    args = dict(model_name="debug", model={"vocab_size": 50257}, data=data,
                eval=EvalArgs(interval=2, max_iters=2, initial_validation=False))
    setup(**args, out_dir=tmp_path / "whole", train=TrainArgs(max_steps=4, **train))
    setup(**args, out_dir=tmp_path / "half", train=TrainArgs(max_steps=2, **train))
    setup(**args, out_dir=tmp_path / "half", train=TrainArgs(max_steps=4, **train), resume="auto")
    whole, half = (json.loads((tmp_path / name / "history.json").read_text()) for name in ("whole", "half"))
    whole_losses, half_losses = ([h["train_loss"] for h in history if "train_loss" in h] for history in (whole, half))
    assert len(whole_losses) == 4 and whole_losses == half_losses  # the resumed run saw the same batches
    assert is_checkpoint(tmp_path / "whole" / "final")
    assert Tokenizer(tmp_path / "whole" / "final").vocab_size == 50257  # the checkpoint carries the GPT-2 tokenizer


def test_shards_need_both_patterns_and_a_matching_tokenizer(shards, tmp_path):
    folder, _, _ = shards
    with pytest.raises(ValueError, match="--data.train_bin and --data.val_bin go together"):
        setup(model_name="debug", data=DataArgs(train_bin=str(folder / "fineweb_train_*.bin")), out_dir=tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        BinShardData(str(folder / "nothing_*.bin"), str(folder / "fineweb_val_*.bin"), GPT2_TOKENIZER)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    from lit_gpt.data.prepare import train_bpe

    train_bpe(["some text to learn from"] * 10, 300, tokenizer)
    with pytest.raises(ValueError, match="50,257-token vocabulary but --data.tokenizer_dir"):
        BinShardData(str(folder / "fineweb_train_*.bin"), str(folder / "fineweb_val_*.bin"), tokenizer)
    assert not (tmp_path / "o").exists()


def test_a_multi_process_launch_does_not_prepare_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `python scripts/prepare_openwebtext.py --source bundled"):
        setup(model_name="debug", data=DataArgs(dir=tmp_path / "data", source="bundled", train_tokenizer=512),
              out_dir=tmp_path / "o", devices=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
