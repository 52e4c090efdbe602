"""Text -> token files for pretraining: `train.bin` and `val.bin` (uint16 where the vocabulary fits, else uint32),
the tokenizer files, and `meta.json`, which is written last and marks the folder complete."""

import json
import lzma
import os
from pathlib import Path

import numpy as np

from lit_gpt.checkpoint import atomic_output_dir, check_replaceable, copy_tokenizer_files
from lit_gpt.tokenizer import Tokenizer, tokenizer_fingerprint
from lit_gpt.utils import check_apart, check_hub_reachable

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
BUNDLED_CORPUS = [REPO_DATA / "corpus" / f"{name}.txt.xz" for name in ("shakespeare", "austen", "brown")]
GPT2_TOKENIZER = REPO_DATA / "tokenizers" / "gpt2"
BUNDLED_WIKI = REPO_DATA / "corpus" / "wiki.utf8.xz"  # held-out English for perplexity and analysis
META_FILENAME = "meta.json"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".utf8", ".xz")
DOCUMENT_CHARS = 4096  # plain-text files are cut into documents of about this size, at line boundaries


def read_text(path: Path) -> str:
    raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{str(path)!r} is not valid UTF-8 (byte {error.start}: {raw[error.start:error.start + 4]!r}); convert it"
            " to UTF-8 first."
        ) from None


def split_documents(text: str, size: int = DOCUMENT_CHARS) -> list[str]:
    documents, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            documents.append("".join(current))
            current, length = [], 0
    if "".join(current).strip():
        documents.append("".join(current))
    return documents


def local_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl", ".json",
                                                                                    ".parquet"))
    if not files:
        raise FileNotFoundError(f"No .txt, .jsonl or .parquet files in {str(source)!r}.")
    return files


def load_table(path: Path):
    """A .jsonl/.json/.parquet file as a `datasets.Dataset`; a malformed file is one line naming it."""
    import datasets

    kind = "parquet" if path.suffix == ".parquet" else "json"
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps the parser's error in several layers
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
        raise ValueError(f"{str(path)!r} is not a readable {kind} file ({first}); fix or remove it.") from None


def looks_like_path(source: str) -> bool:
    """A --source that names a local file or folder rather than a Hub dataset (`org/name` has no file suffix)."""
    return source.startswith(("/", ".", "~")) or Path(source).suffix in (*TEXT_SUFFIXES, ".jsonl", ".json",
                                                                       ".parquet", ".csv")


def load_documents(source: str, text_column: str = "text", num_proc: int | None = None):
    """A `datasets.Dataset` with one document per row in column "text"."""
    import datasets

    if source == "bundled":
        return datasets.Dataset.from_dict({"text": [d for p in BUNDLED_CORPUS for d in split_documents(read_text(p))]})
    path = Path(source)
    if path.exists():
        texts = []
        for file in local_files(path):
            if file.suffix in TEXT_SUFFIXES:
                texts += split_documents(read_text(file))
            else:
                rows = load_table(file)
                if text_column not in rows.column_names:
                    raise ValueError(f"{str(file)!r} has no column {text_column!r} (it has {rows.column_names}).")
                column = rows[text_column]
                wrong = next((i for i, t in enumerate(column) if t is not None and not isinstance(t, str)), None)
                if wrong is not None:
                    raise ValueError(f"{str(file)!r}: row {wrong + 1} of column {text_column!r} holds"
                                     f" {type(column[wrong]).__name__} {column[wrong]!r}, not text; fix the file.")
                texts += [t for t in column if t]
        return datasets.Dataset.from_dict({"text": texts})
    if looks_like_path(source):
        raise FileNotFoundError(f"--source {source}: expected a local file or folder there, found nothing.")
    try:  # a dataset on the Hugging Face Hub, such as "openwebtext"
        check_hub_reachable(f"the dataset {source!r}")
        rows = datasets.load_dataset(source, split="train", num_proc=num_proc)
    except Exception as error:  # the hub client raises many types; the user needs the one line below
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConnectionError(
            f"Could not load the dataset {source!r} ({first}). Without internet, prepare local text instead:"
            " --source a .txt/.jsonl/.parquet file or folder, or --source bundled."
        ) from None
    return rows.select_columns([text_column]).rename_column(text_column, "text") if text_column != "text" else rows


def train_bpe(texts, vocab_size: int, folder: Path) -> None:
    """A byte-level BPE with one special token, <|endoftext|>, trained on `texts`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(special))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_tokens(rows, tokenizer: Tokenizer, path: Path, dtype: np.dtype, num_proc: int | None) -> int:
    """Tokenize documents (EOS after each) in parallel and append them to `path`; returns the token count."""
    eos = tokenizer.eos_id

    def encode(batch):
        return {"ids": [tokenizer.encode(text, bos=False).tolist() + [eos] for text in batch["text"]]}

    tokenized = rows.map(encode, batched=True, remove_columns=rows.column_names, num_proc=num_proc,
                         desc=f"tokenizing {path.stem}")
    count = 0
    with open(path, "wb") as f:
        for batch in tokenized.iter(batch_size=1024):
            ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in batch["ids"]])
            f.write(ids.astype(dtype).tobytes())
            count += ids.size
    return count


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) of the validation tokens under the training set's add-one unigram distribution:
    the loss a model that ignores context would reach."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[val].mean())


def prepare(
    source: str = "openwebtext",
    output_dir: Path = Path("data/prepared/openwebtext"),
    tokenizer_dir: Path = GPT2_TOKENIZER,
    train_tokenizer: int | None = None,
    val_fraction: float = 0.0005,
    seed: int = 2357,
    text_column: str = "text",
    num_proc: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Tokenize a corpus into train.bin / val.bin.

    Args:
        source: "openwebtext" or another dataset name on the Hugging Face Hub (needs internet), "bundled" (the
            corpus in data/corpus), or a local .txt/.jsonl/.parquet file or a folder of them.
        output_dir: where the token files go.
        tokenizer_dir: a folder with tokenizer.json or tokenizer.model (default: the bundled GPT-2 tokenizer).
        train_tokenizer: train a byte-level BPE of this vocabulary size on the training split instead.
        val_fraction: the share of documents held out for validation (split with `seed`).
        seed: the seed of the split.
        text_column: the column that holds the text in jsonl/parquet files and datasets.
        num_proc: tokenizing processes (default: the number of CPU cores, at most 8).
        overwrite: replace a prepared folder.
    """
    output_dir = Path(output_dir)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
    if (output_dir / META_FILENAME).is_file() and not overwrite:
        raise FileExistsError(f"{str(output_dir)!r} already holds prepared data; pass --overwrite to prepare it again.")
    if Path(source).exists():
        check_apart(output_dir, "--output_dir", Path(source), "--source")
    if train_tokenizer is None:
        check_apart(output_dir, "--output_dir", Path(tokenizer_dir), "--tokenizer_dir")
    check_replaceable(output_dir, overwrite)
    num_proc = num_proc or min(8, os.cpu_count() or 1)
    documents = load_documents(source, text_column, num_proc)
    if len(documents) < 2:
        raise ValueError(
            f"Found {len(documents)} document(s) in {source!r}; need at least two to split off validation."
        )
    split = documents.train_test_split(test_size=val_fraction, seed=seed)
    return write_prepared(split["train"], split["test"], output_dir, tokenizer_dir, train_tokenizer, num_proc,
                          overwrite, dict(source=source, documents=len(documents), seed=seed))


def write_prepared(train_rows, val_rows, output_dir: Path, tokenizer_dir: Path | None, train_tokenizer: int | None,
                   num_proc: int | None, overwrite: bool, about: dict) -> Path:
    """Tokenize a split already made (two `datasets.Dataset`s with a "text" column) into train.bin / val.bin, with
    the tokenizer of `tokenizer_dir` or a BPE of `train_tokenizer` tokens trained on the training rows only;
    `about` goes into meta.json (where the split came from)."""
    output_dir = Path(output_dir)
    num_proc = num_proc or min(8, os.cpu_count() or 1)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        if train_tokenizer:
            train_bpe(iter(train_rows["text"]), train_tokenizer, tmp)
        elif not copy_tokenizer_files(Path(tokenizer_dir), tmp):
            raise FileNotFoundError(f"No tokenizer files in {str(tokenizer_dir)!r}.")
        tokenizer = Tokenizer(tmp)
        if tokenizer.eos_id is None:
            raise ValueError(f"The tokenizer in {str(tokenizer_dir)!r} has no end-of-text token to separate documents.")
        dtype = token_dtype(tokenizer.vocab_size)
        workers = num_proc if len(train_rows) + len(val_rows) >= 1000 else None  # processes cost more than they save
        counts = {name: write_tokens(rows, tokenizer, tmp / f"{name}.bin", dtype, workers)
                  for name, rows in (("train", train_rows), ("val", val_rows))}
        train, val = (np.memmap(tmp / f"{name}.bin", dtype=dtype, mode="r") for name in ("train", "val"))
        meta = dict(about, tokenizer=tokenizer_fingerprint(tmp), vocab_size=tokenizer.vocab_size,
                    dtype=dtype.name, eos_id=tokenizer.eos_id,
                    max_token_id=int(max(train.max(), val.max())), train_tokens=counts["train"],
                    val_tokens=counts["val"], unigram_loss=unigram_loss(train, val, tokenizer.vocab_size))
        del train, val
        (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2))
    print(f"Prepared {output_dir}: {counts['train']:,} training and {counts['val']:,} validation tokens"
          f" ({dtype.name}, vocabulary {tokenizer.vocab_size:,}, unigram loss {meta['unigram_loss']:.3f})")
    return output_dir
