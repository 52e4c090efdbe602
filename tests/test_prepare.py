"""Data preparation: local sources, token files, the completion marker, refusals."""

import json
import lzma

import numpy as np
import pytest
import torch
from helpers import SHARED_ASSETS

from lit_gpt.data import prepare as prepare_module
from lit_gpt.data.prepare import BUNDLED_CORPUS, GPT2_TOKENIZER, prepare, split_documents, token_dtype, unigram_loss
from lit_gpt.data.tokens import TokenData
from lit_gpt.tokenizer import Tokenizer

SAMPLE = lzma.decompress(BUNDLED_CORPUS[0].read_bytes()).decode()[:60_000]


def read_tokens(folder, name):
    meta = json.loads((folder / "meta.json").read_text())
    return np.fromfile(folder / f"{name}.bin", dtype=meta["dtype"]), meta


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "folder"])
def test_local_sources_become_documents_separated_by_eos(tmp_path, kind):
    documents = split_documents(SAMPLE, size=2000)
    if kind == "txt":
        source = tmp_path / "corpus.txt"
        source.write_text(SAMPLE)
    elif kind == "jsonl":
        source = tmp_path / "corpus.jsonl"
        source.write_text("\n".join(json.dumps({"text": d}) for d in documents))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({"text": documents}), source)
    else:
        source = tmp_path / "texts"
        source.mkdir()
        (source / "a.txt").write_text(SAMPLE[:30_000])
        (source / "b.md").write_text(SAMPLE[30_000:])
    out = prepare(str(source), tmp_path / "out", val_fraction=0.1)
    train, meta = read_tokens(out, "train")
    val, _ = read_tokens(out, "val")
    tokenizer = Tokenizer(GPT2_TOKENIZER)
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tokenizer.eos_id == 50256
    assert meta["train_tokens"] == train.size and meta["val_tokens"] == val.size
    n_documents = (train == 50256).sum() + (val == 50256).sum()
    assert n_documents == meta["documents"] and val[-1] == 50256
    # every document is tokenized exactly as the tokenizer does it, wherever the split put it
    direct = sum(tokenizer.encode(d).numel() + 1 for d in (documents if kind in ("jsonl", "parquet") else
                                                            split_documents_of(source)))
    assert train.size + val.size == direct


def split_documents_of(source):
    files = sorted(source.iterdir()) if source.is_dir() else [source]
    return [d for f in files for d in split_documents(f.read_text())]


def test_token_dtype_widens_past_uint16():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


@pytest.mark.skipif(not (SHARED_ASSETS / "tokenizers" / "llama3").is_dir(), reason="Llama 3 tokenizer absent")
def test_large_vocabulary_is_stored_as_uint32_without_overflow(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(SAMPLE[:20_000])
    out = prepare(str(source), tmp_path / "out", tokenizer_dir=SHARED_ASSETS / "tokenizers" / "llama3",
                  val_fraction=0.2)
    train, meta = read_tokens(out, "train")
    assert meta["dtype"] == "uint32" and meta["eos_id"] == 128001
    assert train.max() >= 2**16  # ids beyond uint16 survive (the end-of-text token is 128001)


def test_bpe_trained_on_the_training_split(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(SAMPLE)
    out = prepare(str(source), tmp_path / "out", train_tokenizer=300, val_fraction=0.1)
    train, meta = read_tokens(out, "train")
    assert meta["vocab_size"] == 300 and train.max() < 300
    assert Tokenizer(out).decode(train[:200].tolist()) in SAMPLE


def test_unigram_loss_is_the_cross_entropy_of_smoothed_counts():
    train, val = np.array([0, 0, 1, 2, 2, 2]), np.array([2, 0, 3])
    probs = (np.bincount(train, minlength=4) + 1) / (6 + 4)
    assert unigram_loss(train, val, 4) == pytest.approx(-np.log(probs[val]).mean())


def test_refuses_to_overwrite_prepared_data(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(SAMPLE[:20_000])
    out = prepare(str(source), tmp_path / "out", val_fraction=0.2)
    before = (out / "train.bin").read_bytes()
    with pytest.raises(FileExistsError, match="already holds prepared data; pass --overwrite"):
        prepare(str(source), out, val_fraction=0.2)
    assert (out / "train.bin").read_bytes() == before
    prepare(str(source), out, val_fraction=0.5, overwrite=True)
    assert (out / "train.bin").read_bytes() != before


def test_interrupted_preparation_leaves_nothing_that_passes_as_complete(tmp_path, monkeypatch):
    source = tmp_path / "corpus.txt"
    source.write_text(SAMPLE[:20_000])
    original = prepare_module.write_tokens

    def interrupted(rows, tokenizer, path, dtype, num_proc):
        original(rows, tokenizer, path, dtype, num_proc)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(source), tmp_path / "out", val_fraction=0.2)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="No prepared data"):
        TokenData(tmp_path / "out")


def test_truncated_token_file_is_detected(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(SAMPLE[:20_000])
    out = prepare(str(source), tmp_path / "out", val_fraction=0.2)
    (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:100])
    with pytest.raises(ValueError, match="the folder is incomplete"):
        TokenData(out)


def test_broken_utf8_is_named(tmp_path):
    source = tmp_path / "broken.txt"
    source.write_bytes(b"fine text\n" * 10 + b"\xff\xfe broken")
    with pytest.raises(ValueError, match=r"broken.txt' is not valid UTF-8 \(byte 100"):
        prepare(str(source), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_text_column_is_named(tmp_path):
    source = tmp_path / "corpus.jsonl"
    source.write_text(json.dumps({"content": "a"}) + "\n" + json.dumps({"content": "b"}))
    with pytest.raises(ValueError, match="has no column 'text'"):
        prepare(str(source), tmp_path / "out")


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No .txt, .jsonl or .parquet files"):
        prepare(str(tmp_path / "empty"), tmp_path / "out")


def test_document_windows_start_at_document_starts():
    from lit_gpt.data.tokens import document_starts, train_offsets

    tokens = np.array([5, 6, 0, 7, 8, 9, 0, 1, 2, 3, 4, 0, 3, 3], dtype=np.uint16)  # 0 = end of text
    starts = document_starts(tokens, eos_id=0, block_size=3)
    assert starts.tolist() == [0, 3, 7]  # 12 is a start too, but a window of 4 tokens does not fit after it
    offsets = train_offsets(len(tokens), 3, 64, seed=1, step=0, starts=starts)
    assert set(offsets.tolist()) == {0, 3, 7}
    assert torch.equal(offsets, train_offsets(len(tokens), 3, 64, seed=1, step=0, starts=starts))  # resumable
