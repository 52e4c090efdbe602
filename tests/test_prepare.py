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
    original = prepare_module.assemble

    def interrupted(shards, order, path, *args):
        original(shards, order, path, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(source), tmp_path / "out", val_fraction=0.2)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    with pytest.raises(FileNotFoundError, match="No prepared data"):
        TokenData(tmp_path / "out")
    monkeypatch.setattr(prepare_module, "assemble", original)
    prepare(str(source), tmp_path / "out", val_fraction=0.2)  # the same command continues, to the same bytes
    prepare(str(source), tmp_path / "again", val_fraction=0.2)
    assert not (tmp_path / ".out.partial").exists()
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


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


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64])
def test_text_read_in_pieces_is_cut_as_the_whole_text_is(tmp_path, piece):
    """Documents from a file read `piece` bytes at a time equal split_documents of the whole text, whatever line
    breaks (\\r\\n split across pieces, \\r, \\u2028, \\x85) and multi-byte characters straddle the pieces."""
    def line(i):
        end = ("\r\n" if i % 3 else "\r") + ("\u2028" if i % 7 == 0 else "") + ("\x85" if i % 11 == 0 else "")
        return f"line {i} caf\u00e9 \u4e2d\u6587" + end + "x" * (i % 50) + "\n"

    text = "".join(line(i) for i in range(400)) + "tail without break"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    whole = split_documents(text, size=300)
    assert len(whole) > 10
    assert list(split_documents(prepare_module.text_pieces(path, size=piece), size=300)) == whole
    assert prepare_module.read_text(path) == text


def test_a_byte_that_is_not_utf8_is_named_at_its_offset_across_pieces(tmp_path):
    path = tmp_path / "b.txt"
    path.write_bytes("\u00e9".encode() * 1000 + b"\xff" + b"x" * 10)
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(byte 2000: b'\\xff"):
        list(prepare_module.text_pieces(path, size=7))


def test_split_is_datasets_own_train_test_split():
    import datasets

    for n, fraction, seed in ((2, 0.5, 0), (10, 0.1, 1), (1001, 0.02, 2357), (57, 0.33, 7)):
        rows = datasets.Dataset.from_dict({"i": list(range(n))})
        reference = rows.train_test_split(test_size=fraction, seed=seed)
        train, val = prepare_module.split_indices(n, fraction, seed)
        assert train.tolist() == reference["train"]["i"] and val.tolist() == reference["test"]["i"]
    with pytest.raises(ValueError, match="leaves 0 for training"):
        prepare_module.split_indices(2, 0.9, 0)


def test_prepared_files_hold_the_split_documents_in_the_split_order(tmp_path):
    """An independent reference: datasets' own split of the documents, each tokenized directly, concatenated."""
    import datasets

    documents = split_documents(SAMPLE, size=1500)
    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(json.dumps({"text": d}) for d in documents))
    out = prepare(str(source), tmp_path / "out", val_fraction=0.15, seed=3, shard_documents=4, num_proc=2)
    split = datasets.Dataset.from_dict({"text": documents}).train_test_split(test_size=0.15, seed=3)
    tokenizer = Tokenizer(GPT2_TOKENIZER)
    for name, rows in (("train", split["train"]), ("val", split["test"])):
        expected = np.concatenate([np.append(tokenizer.encode(d, bos=False).numpy(), 50256) for d in rows["text"]])
        assert np.array_equal(read_tokens(out, name)[0], expected.astype(np.uint16))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == len(documents) and not list(tmp_path.glob(".out.*"))


KILL_AFTER_SHARDS = """
import os, signal, sys
from lit_gpt.data import prepare as module
closed = []
original = module.ShardWriter.close
def close(self):
    original(self)
    closed.append(1)
    if len(closed) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer or `kill -9` would
module.ShardWriter.close = close
module.prepare(sys.argv[1], sys.argv[2], val_fraction=0.1, shard_documents=5, num_proc=int(sys.argv[4]))
"""


@pytest.mark.parametrize("num_proc", [1, 2])
def test_killed_preparation_continues_to_the_same_bytes(tmp_path, num_proc):
    import subprocess
    import sys

    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(json.dumps({"text": d}) for d in split_documents(SAMPLE, size=1500)))
    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_SHARDS)
    killed = subprocess.run([sys.executable, str(script), str(source), str(tmp_path / "out"), "3", str(num_proc)],
                            capture_output=True, text=True)
    assert killed.returncode == -9
    work = tmp_path / ".out.partial"
    assert prepare_module.finished_shards(work) == 3 and not (tmp_path / "out").exists()
    original = prepare_module.encode_documents
    encoded = []
    prepare_module.encode_documents = lambda texts, *a: encoded.append(len(texts)) or original(texts, *a)
    try:  # the same command, in this process: only the documents after the finished shards are tokenized
        prepare(str(source), tmp_path / "out", val_fraction=0.1, shard_documents=5, num_proc=1)
    finally:
        prepare_module.encode_documents = original
    n = json.loads((tmp_path / "out" / "meta.json").read_text())["documents"]
    assert sum(encoded) == n - 15 and not work.exists()  # 3 shards of 5 documents were reused, not tokenized again
    prepare(str(source), tmp_path / "fresh", val_fraction=0.1, shard_documents=5, num_proc=1)
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


MEMORY_LIMITED = """
import resource, sys
import datasets  # imported before the limit, so that what is limited is the work on the data alone
from lit_gpt.data.prepare import GPT2_TOKENIZER, prepare
from lit_gpt.tokenizer import Tokenizer
Tokenizer(GPT2_TOKENIZER).encode("warm up the tokenizer", bos=False)
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[3]) * 2**20, resource.RLIM_INFINITY))
prepare(sys.argv[1], sys.argv[2], val_fraction=0.01, num_proc=1)
"""


def test_preparation_runs_in_bounded_memory(tmp_path):
    """A 24 MB text prepared with 96 MiB of address space beyond what the imports took: the earlier in-memory
    preparation (whole file read, every document listed, np.bincount of the whole token file) needed several times
    the file's size and failed here with MemoryError."""
    import os
    import subprocess
    import sys

    source = tmp_path / "corpus.txt"
    with open(source, "w") as f:
        for _ in range(400):
            f.write(SAMPLE)
    assert source.stat().st_size > 23_000_000
    script = tmp_path / "limited.py"
    script.write_text(MEMORY_LIMITED)
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), str(source), str(tmp_path / "out"), "96"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] > 6_000_000


def test_a_corpus_of_white_space_is_refused(tmp_path):
    source = tmp_path / "blank.jsonl"
    source.write_text("\n".join(json.dumps({"text": " \n\t "}) for _ in range(5)))
    with pytest.raises(ValueError, match="holds no text: its 5 documents are all white space"):
        prepare(str(source), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl"]


def test_a_script_dataset_is_read_from_the_hubs_parquet_conversion(monkeypatch):
    """datasets >= 4 refuses script datasets such as openwebtext; the loader then streams the Parquet files the Hub
    converted it to. The Hub is not reachable here, so load_dataset is replaced by a stand-in that refuses scripts."""
    import datasets

    calls = []

    def load_dataset(name, split, streaming, revision=None):
        calls.append((name, split, streaming, revision))
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")
        return iter([{"text": "first document"}, {"text": ""}, {"text": "second document"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(prepare_module, "check_hub_reachable", lambda what: None)
    assert list(prepare_module.iter_documents("openwebtext")) == ["first document", "second document"]
    assert calls == [("Skylion007/openwebtext", "train", True, None),
                     ("Skylion007/openwebtext", "train", True, "refs/convert/parquet")]


def test_an_unreachable_hub_is_one_line_naming_the_local_alternatives(monkeypatch):
    def offline(what):
        raise ConnectionError(f"Cannot reach the Hugging Face Hub for {what}")

    monkeypatch.setattr(prepare_module, "check_hub_reachable", offline)
    with pytest.raises(ConnectionError, match="Could not load the dataset 'Skylion007/openwebtext'.*--source bundled"):
        list(prepare_module.iter_documents("openwebtext"))


SLOW_PREPARE = """
import sys, time
from lit_gpt.data import prepare as module
from lit_gpt.utils import run_cli
original = module.encode_documents


calls = []


def slow(texts, *args):  # each worker's first two shards take 0.2 s, later ones 2 s: a loaded machine that is slow to
    calls.append(1)      # send the signal after shard 3 still finds the preparation running
    time.sleep(0.2 if len(calls) <= 2 else 2.0)
    return original(texts, *args)


module.encode_documents = slow  # the workers are forked with it
run_cli(module.prepare, sys.argv[1:])
"""


@pytest.mark.parametrize("signum, status, word", [(2, 130, "Interrupted"), (15, 143, "Terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_with_workers_is_one_line_and_the_rerun_continues(tmp_path, signum, status, word):
    import subprocess
    import sys
    import time

    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(json.dumps({"text": d}) for d in split_documents(SAMPLE, size=500)))
    script = tmp_path / "slow.py"
    script.write_text(SLOW_PREPARE)
    args = ["--source", str(source), "--output_dir", str(tmp_path / "out"), "--num_proc", "2", "--shard_documents",
            "2", "--val_fraction", "0.1"]
    log = tmp_path / "stdout.txt"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(script), *args], stdout=out, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while "shard 3:" not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    assert process.returncode == status and err.strip().splitlines() == [
        f"{word}: the finished shards are kept in {tmp_path / '.out.partial'}; run the same command again to continue."]
    done = prepare_module.finished_shards(tmp_path / ".out.partial")
    assert 3 <= done < len(split_documents(SAMPLE, size=500)) // 2
    from lit_gpt.utils import run_cli

    run_cli(prepare, args)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == len(split_documents(SAMPLE, size=500)) and not (tmp_path / ".out.partial").exists()
