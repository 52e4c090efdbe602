"""Text -> token files for pretraining: `train.bin` and `val.bin` (uint16 where the vocabulary fits, else uint32),
the tokenizer files, and `meta.json`, which is written last and marks the folder complete.

Preparation streams, in bounded memory whatever the corpus size:
1. documents are read in pieces (text files in 1 MiB pieces, jsonl/parquet and Hub datasets row batch by row batch)
   and tokenized by worker processes straight into uint16/uint32 shards of `shard_documents` documents each, in a
   work folder beside the output (`.NAME.partial`); a finished shard is never redone, so a killed preparation loses
   at most the shard in progress and the same command continues it;
2. the split is `datasets`' own `train_test_split(test_size=val_fraction, seed=seed)` permutation of the documents,
   so the validation documents are those the earlier in-memory preparation chose, in the same order;
3. train.bin and val.bin are assembled from the shards in that order (resumable in pieces), the unigram statistics
   are counted in chunks, and the folder is renamed into place.
"""

import codecs
import errno
import json
import lzma
import math
import multiprocessing
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from lit_gpt.checkpoint import check_replaceable, copy_tokenizer_files, move_into_place, output_lock
from lit_gpt.tokenizer import Tokenizer, tokenizer_fingerprint
from lit_gpt.utils import check_apart, check_hub_reachable, check_seed, check_share, set_interrupt_note

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
BUNDLED_CORPUS = [REPO_DATA / "corpus" / f"{name}.txt.xz" for name in ("shakespeare", "austen", "brown")]
GPT2_TOKENIZER = REPO_DATA / "tokenizers" / "gpt2"
BUNDLED_WIKI = REPO_DATA / "corpus" / "wiki.utf8.xz"  # held-out English for perplexity and analysis
META_FILENAME = "meta.json"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".utf8", ".xz")
DOCUMENT_CHARS = 4096  # plain-text files are cut into documents of about this size, at line boundaries
READ_BYTES = 1 << 20  # text files are read in pieces of this size
LONGEST_LINE = 1 << 22  # characters: a longer line (a file without line breaks) is cut, so memory stays bounded
BATCH_DOCUMENTS = 256  # documents per tokenizing task
SHARD_DOCUMENTS = 65_536  # documents per shard (a multiple of BATCH_DOCUMENTS): what a kill can lose
ASSEMBLE_TOKENS = 1 << 24  # train.bin is assembled in pieces of this many tokens (what a kill in pass 2 can lose)
STATISTICS_TOKENS = 1 << 20  # and its statistics counted in chunks of this many (np.bincount makes an int64 copy)
OPENWEBTEXT = "Skylion007/openwebtext"  # "openwebtext" on the Hub



def read_text(path: Path) -> str:
    """A whole (small) text file; large corpora are read in pieces by `text_documents`."""
    return "".join(text_pieces(Path(path)))


def text_pieces(path: Path, size: int = READ_BYTES) -> Iterator[str]:
    """A UTF-8 text file (.xz compressed or not), decoded piece by piece; a byte that is not UTF-8 is one line naming
    the file and its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0
    with (lzma.open if path.suffix == ".xz" else open)(path, "rb") as f:
        while True:
            chunk = f.read(size)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                start, bad = consumed - pending + error.start, error.object[error.start:error.start + 4]
                raise ValueError(f"{str(path)!r} is not valid UTF-8 (byte {start}: {bad!r}); convert it to UTF-8"
                                 " first.") from None
            consumed += len(chunk)
            if text:
                yield text
            if not chunk:
                return


LINE_ENDS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines breaks at


def lines_of(pieces: Iterable[str]) -> Iterator[str]:
    """`"".join(pieces).splitlines(keepends=True)`, piece by piece (a line longer than LONGEST_LINE is cut)."""
    carry = ""
    for piece in pieces:
        lines = (carry + piece).splitlines(keepends=True)
        carry = lines.pop() if lines and (lines[-1][-1] not in LINE_ENDS or lines[-1][-1] == "\r") else ""
        yield from lines
        while len(carry) > LONGEST_LINE:
            yield carry[:LONGEST_LINE]
            carry = carry[LONGEST_LINE:]
    if carry:
        yield carry


def split_documents(text: str | Iterable[str], size: int = DOCUMENT_CHARS) -> list[str] | Iterator[str]:
    """Text cut into documents of about `size` characters at line boundaries (the last one kept unless blank): a list
    for a string, an iterator for an iterable of pieces."""
    if isinstance(text, str):
        return list(documents_of_lines(text.splitlines(keepends=True), size))
    return documents_of_lines(lines_of(text), size)


def documents_of_lines(lines: Iterable[str], size: int) -> Iterator[str]:
    current, length = [], 0
    for line in lines:
        current.append(line)
        length += len(line)
        if length >= size:
            yield "".join(current)
            current, length = [], 0
    if "".join(current).strip():
        yield "".join(current)


def local_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl", ".json",
                                                                                    ".parquet"))
    if not files:
        raise FileNotFoundError(f"No .txt, .jsonl or .parquet files in {str(source)!r}.")
    return files


def first_cause_line(error: BaseException, limit: int = 160) -> str:
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:limit]


def table_documents(path: Path, text_column: str) -> Iterator[str]:
    """The non-empty texts of a .jsonl/.json/.parquet file, read row batch by row batch (never whole, but for a .json
    file that is one JSON document); a malformed file, a missing column or a row that is not text is one line naming
    it."""
    rows = parquet_columns(path, text_column) if path.suffix == ".parquet" else json_rows(path, text_column)
    for row, text in enumerate(rows, 1):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{str(path)!r}: row {row} of column {text_column!r} holds {type(text).__name__}"
                             f" {text!r}, not text; fix the file.")
        if text:
            yield text


def parquet_columns(path: Path, column: str) -> Iterator:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except Exception as error:  # pyarrow raises its own types for a damaged or foreign file
        raise ValueError(f"{str(path)!r} is not a readable parquet file ({first_cause_line(error)}); fix or remove"
                         " it.") from None
    if column not in names:
        raise ValueError(f"{str(path)!r} has no column {column!r} (it has {names}).")
    for batch in table.iter_batches(batch_size=1024, columns=[column]):
        yield from batch.column(0).to_pylist()


def json_rows(path: Path, column: str) -> Iterator:
    """The `column` of a JSON-lines file, line by line; a .json file that is one document (a list of objects) is
    read whole."""
    def bad(where: str, error: BaseException) -> ValueError:
        reason = "nested too deeply" if isinstance(error, RecursionError) else first_cause_line(error)
        return ValueError(f"{str(path)!r} is not a readable json file ({where}: {reason}); fix or remove it.")

    def value(row, where: str):
        if not isinstance(row, dict):
            raise ValueError(f"{str(path)!r}: {where} holds {type(row).__name__}, not an object with a {column!r}"
                             " field; fix the file.")
        if column not in row:
            raise ValueError(f"{str(path)!r} has no column {column!r} (it has {list(row)}).")
        return row[column]

    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as error:
                if path.suffix == ".json":
                    break  # perhaps one JSON document over many lines
                raise bad(f"line {number}", error) from None
            yield value(row, f"line {number}")
        else:
            return
    try:
        with open(path, "rb") as f:
            document = json.load(f)
    except (ValueError, RecursionError) as error:
        raise bad("the document", error) from None
    if not isinstance(document, list):
        raise ValueError(f"{str(path)!r} holds a JSON {type(document).__name__}; expected JSON lines or a list of"
                         " objects.")
    for number, row in enumerate(document, 1):
        yield value(row, f"item {number}")


def looks_like_path(source: str) -> bool:
    """A --source that names a local file or folder rather than a Hub dataset (`org/name` has no file suffix)."""
    return source.startswith(("/", ".", "~")) or Path(source).suffix in (*TEXT_SUFFIXES, ".jsonl", ".json",
                                                                       ".parquet", ".csv")


def check_source(source: str) -> None:
    """A local source exists and holds readable files (before any work starts)."""
    if source == "bundled":
        return
    path = Path(source)
    if path.exists():
        local_files(path)
    elif looks_like_path(source):
        raise FileNotFoundError(f"--source {source}: expected a local file or folder there, found nothing.")


def iter_documents(source: str, text_column: str = "text") -> Iterator[str]:
    """The documents of a source, one string each, read in pieces: the bundled corpus, local text/jsonl/parquet files
    (text files cut into documents of about DOCUMENT_CHARS characters), or a Hugging Face dataset streamed."""
    if source == "bundled":
        for path in BUNDLED_CORPUS:
            yield from split_documents(text_pieces(path))
        return
    path = Path(source)
    if path.exists():
        for file in local_files(path):
            if file.suffix in TEXT_SUFFIXES:
                yield from split_documents(text_pieces(file))
            else:
                yield from table_documents(file, text_column)
        return
    check_source(source)
    for row in hub_rows(source):
        text = row.get(text_column)
        if text:
            yield text


def hub_rows(source: str):
    """A Hugging Face dataset's training split, streamed (nothing is cached whole). A dataset that `datasets` no
    longer runs as a script (openwebtext, with datasets >= 4) is read from the Parquet files the Hub converted it to
    (revision refs/convert/parquet)."""
    import datasets

    name = OPENWEBTEXT if source == "openwebtext" else source
    try:
        check_hub_reachable(f"the dataset {name!r}")
        try:
            return datasets.load_dataset(name, split="train", streaming=True)
        except Exception as error:
            if "script" not in str(error).lower():
                raise
            return datasets.load_dataset(name, split="train", streaming=True, revision="refs/convert/parquet")
    except Exception as error:  # the hub client raises many types; the user needs the one line below
        raise ConnectionError(
            f"Could not load the dataset {name!r} ({first_cause_line(error, 200)}). Without internet, prepare local"
            " text instead: --source a .txt/.jsonl/.parquet file or folder, or --source bundled."
        ) from None


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


# ---- pass 1: documents -> token shards, in worker processes ----------------------------------------------------------

_worker = {}


def _start_worker(tokenizer_dir: str, dtype: str, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: one line, not one per worker
    die_with_parent(parent)
    _worker.update(tokenizer=Tokenizer(tokenizer_dir), dtype=np.dtype(dtype))


def die_with_parent(parent: int) -> None:
    """A worker ends when the preparing process is killed (out of memory, kill -9), instead of waiting forever on a
    queue nobody writes to (Linux's PR_SET_PDEATHSIG; elsewhere the pool's own checks apply)."""
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def encode_documents(texts: list[str], tokenizer: Tokenizer | None = None,
                     dtype: np.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The documents' tokens, an end-of-text after each, in one array; and each document's token count."""
    tokenizer = tokenizer or _worker["tokenizer"]
    dtype = dtype or _worker["dtype"]
    eos = tokenizer.eos_id
    pieces = [np.append(tokenizer.encode(text, bos=False).numpy(), eos).astype(dtype) for text in texts]
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.uint32, count=len(pieces))
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype)), lengths


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def finished_shards(work: Path) -> int:
    """How many shards, from the first, are complete (each one's `.len` file is renamed into place last)."""
    count = 0
    while (work / f"{shard_name(count)}.len").is_file():
        count += 1
    return count


def tokenize_to_shards(documents: Iterable[str], work: Path, dtype: np.dtype, num_proc: int,
                       shard_documents: int = SHARD_DOCUMENTS, progress: bool = True) -> dict:
    """Pass 1: the documents' tokens into `shard-NNNNNN.bin` (tokens) and `.len` (tokens per document) files of
    `shard_documents` documents each, skipping the shards an earlier run finished. At most 2 x num_proc batches are in
    flight, so memory stays bounded whatever the corpus. Returns (and records in `tokenized.json`) the number of
    shards and of documents that hold more than white space."""
    marker = work / "tokenized.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    done = finished_shards(work)
    batch_size = math.gcd(BATCH_DOCUMENTS, shard_documents)
    texts = TextCounter(documents)
    skipped = 0
    for _ in range(done * shard_documents):  # read again, not tokenized again
        if next(texts, None) is None:
            break
        skipped += 1
    shards = tokenize_rest(texts, work, dtype, num_proc, shard_documents, batch_size, progress, done) \
        if skipped == done * shard_documents else done
    result = dict(shards=shards, documents_with_text=texts.with_text)
    marker.write_text(json.dumps(result))
    return result


class TextCounter:
    """Passes documents through, counting those that hold more than white space."""

    def __init__(self, documents: Iterable[str]) -> None:
        self.documents, self.with_text = iter(documents), 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        text = next(self.documents)
        self.with_text += not text.isspace()
        return text


def tokenize_rest(texts: Iterator[str], work: Path, dtype: np.dtype, num_proc: int, shard_documents: int,
                  batch_size: int, progress: bool, done: int) -> int:
    batches = batched(texts, batch_size)
    with ExitStack() as stack:
        if num_proc > 1:
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            pool = stack.enter_context(ProcessPoolExecutor(num_proc, mp_context=context, initializer=_start_worker,
                                                           initargs=(str(work), dtype.name, os.getpid())))
            results = in_order(pool, batches, 2 * num_proc)
        else:
            _start_worker_here(work, dtype)
            results = (encode_documents(batch) for batch in batches)
        shard, writer, count, total = done, None, 0, 0
        for tokens, lengths in results:
            if writer is None:
                writer = ShardWriter(work, shard)
            writer.add(tokens, lengths)
            count += len(lengths)
            total += len(tokens)
            if count == shard_documents:
                writer.close()
                shard, writer, count = shard + 1, None, 0
                if progress:
                    print(f"  shard {shard}: {total:,} tokens tokenized in this run", flush=True)
        if writer is not None:
            writer.close()
            shard += 1
    return shard


def _start_worker_here(work: Path, dtype: np.dtype) -> None:
    _worker.update(tokenizer=Tokenizer(work), dtype=dtype)


def in_order(pool: ProcessPoolExecutor, batches: Iterator[list], window: int) -> Iterator:
    """pool.map with at most `window` tasks in flight (map itself would read every batch at once)."""
    pending = deque()
    for batch in batches:
        pending.append(pool.submit(encode_documents, batch))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class ShardWriter:
    """One shard's two files, written under temporary names and renamed when complete (`.len` last)."""

    def __init__(self, work: Path, index: int) -> None:
        self.paths = [work / f"{shard_name(index)}{suffix}" for suffix in (".bin", ".len")]
        self.files = [open(path.with_name(path.name + ".tmp"), "wb") for path in self.paths]

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.files[0].write(tokens.tobytes())
        self.files[1].write(lengths.tobytes())

    def close(self) -> None:
        for file, path in zip(self.files, self.paths):
            file.flush()
            os.fsync(file.fileno())
            file.close()
            os.replace(path.with_name(path.name + ".tmp"), path)


def write_tokens(rows, tokenizer: Tokenizer, path: Path, dtype: np.dtype, num_proc: int | None) -> int:
    """Tokenize documents (EOS after each) and write them to `path`, in memory-bounded pieces; returns the count."""
    count = 0
    with open(path, "wb") as f:
        for batch in batched(texts_of(rows), BATCH_DOCUMENTS):
            tokens, _ = encode_documents(batch, tokenizer, dtype)
            f.write(tokens.tobytes())
            count += tokens.size
    return count


def texts_of(rows) -> Iterator[str]:
    """The texts of a `datasets.Dataset` with a "text" column, or of any iterable of strings."""
    if hasattr(rows, "column_names"):
        for batch in rows.iter(batch_size=1024):
            yield from batch["text"]
    else:
        yield from rows


# ---- the split, and pass 2: shards -> train.bin / val.bin ------------------------------------------------------------

def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) document indices exactly as `datasets.Dataset.train_test_split(test_size=val_fraction,
    seed=seed)` chooses and orders them (numpy's PCG64 permutation)."""
    n_val = math.ceil(val_fraction * n)
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"--val_fraction {val_fraction} of {n} documents leaves {n - n_val} for training and {n_val}"
                         " for validation; both need at least one: change --val_fraction or add text.")
    permutation = np.random.default_rng(seed).permutation(n)
    return permutation[n_val:], permutation[:n_val]


class Shards:
    """Random access to the documents of the shards: document i's tokens, read with pread (no memory map, so the
    resident memory stays small however large the shards)."""

    def __init__(self, work: Path, count: int, dtype: np.dtype) -> None:
        lengths = [np.fromfile(work / f"{shard_name(i)}.len", dtype=np.uint32) for i in range(count)]
        self.shard_of = np.concatenate([np.full(len(x), i, dtype=np.int32) for i, x in enumerate(lengths)])
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        starts = [np.concatenate(([0], np.cumsum(x, dtype=np.int64)[:-1])) for x in lengths]
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.work, self.dtype, self.files = work, dtype, {}

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, document: int) -> bytes:
        shard = int(self.shard_of[document])
        if shard not in self.files:
            self.files[shard] = os.open(self.work / f"{shard_name(shard)}.bin", os.O_RDONLY)
        size = self.dtype.itemsize
        return os.pread(self.files[shard], int(self.lengths[document]) * size, int(self.starts[document]) * size)

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)


def assemble(shards: Shards, order: np.ndarray, path: Path, piece_tokens: int = ASSEMBLE_TOKENS) -> int:
    """Pass 2: the documents in `order` into `path` (resumable: `path.progress` records the documents and bytes
    written at the end of each piece of about `piece_tokens` tokens); returns the token count."""
    progress, partial = path.with_name(path.name + ".progress"), path.with_name(path.name + ".partial")
    done, size = json.loads(progress.read_text()) if progress.is_file() else (0, 0)
    with open(partial, "ab") as f:
        f.truncate(size)
        f.seek(size)
        written = 0
        for i in range(done, len(order)):
            data = shards.read(int(order[i]))
            f.write(data)
            written += len(data)
            if written >= piece_tokens * shards.dtype.itemsize:
                f.flush()
                os.fsync(f.fileno())
                size, written = size + written, 0
                progress.write_text(json.dumps([i + 1, size]))
        f.flush()
        os.fsync(f.fileno())
        size += written
    os.replace(partial, path)
    progress.unlink(missing_ok=True)
    return size // shards.dtype.itemsize


def chunks(path: Path, dtype: np.dtype, tokens: int = STATISTICS_TOKENS) -> Iterator[np.ndarray]:
    with open(path, "rb") as f:
        while data := f.read(tokens * dtype.itemsize):
            yield np.frombuffer(data, dtype=dtype)


def unigram_loss(train, val, vocab_size: int) -> float:
    """Cross-entropy (nats) of the validation tokens under the training set's add-one unigram distribution: the loss a
    model that ignores context would reach. `train` and `val`: token arrays, or iterables of token chunks (counted
    chunk by chunk, so a file of any size fits in memory)."""
    train = [train] if isinstance(train, np.ndarray) else train
    val = [val] if isinstance(val, np.ndarray) else val
    counts = np.zeros(vocab_size, dtype=np.int64)
    for chunk in train:
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    log_probs = np.log((counts + 1.0) / (counts.sum() + float(vocab_size)))
    total, n = 0.0, 0
    for chunk in val:
        total += float(log_probs[chunk].sum())
        n += len(chunk)
    return -total / n


def max_token(path: Path, dtype: np.dtype) -> int:
    return max((int(chunk.max()) for chunk in chunks(path, dtype) if len(chunk)), default=0)


# ---- the whole preparation -------------------------------------------------------------------------------------------

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
    shard_documents: int = SHARD_DOCUMENTS,
) -> Path:
    """Tokenize a corpus into train.bin / val.bin, streaming: bounded memory whatever its size, and resumable (the
    same command continues a killed preparation; at most the shard in progress is lost).

    Args:
        source: "openwebtext" or another dataset name on the Hugging Face Hub (needs internet; streamed), "bundled"
            (the corpus in data/corpus), or a local .txt/.jsonl/.parquet file or a folder of them.
        output_dir: where the token files go (a work folder .NAME.partial beside it holds the shards until done).
        tokenizer_dir: a folder with tokenizer.json or tokenizer.model (default: the bundled GPT-2 tokenizer).
        train_tokenizer: train a byte-level BPE of this vocabulary size on the training split instead.
        val_fraction: the share of documents held out for validation (split with `seed`).
        seed: the seed of the split.
        text_column: the column that holds the text in jsonl/parquet files and datasets.
        num_proc: tokenizing processes (default: the number of CPU cores, at most 8).
        overwrite: replace a prepared folder.
        shard_documents: documents per shard of the work folder (what a kill can lose).
    """
    output_dir = Path(output_dir)
    check_share(val_fraction, "--val_fraction", "the documents held out for validation")
    if (output_dir / META_FILENAME).is_file() and not overwrite:
        raise FileExistsError(f"{str(output_dir)!r} already holds prepared data; pass --overwrite to prepare it again.")
    check_seed(seed)
    if isinstance(shard_documents, bool) or not isinstance(shard_documents, int) or shard_documents < 1:
        raise ValueError(f"--shard_documents must be a positive whole number, got {shard_documents!r}.")
    check_source(source)
    if Path(source).exists():
        check_apart(output_dir, "--output_dir", Path(source), "--source")
    if train_tokenizer is None:
        check_apart(output_dir, "--output_dir", Path(tokenizer_dir), "--tokenizer_dir")
        if not any((Path(tokenizer_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            raise FileNotFoundError(f"No tokenizer files in {str(tokenizer_dir)!r} (expected tokenizer.json or"
                                    " tokenizer.model).")
    check_replaceable(output_dir, overwrite)
    about = dict(source=source, seed=seed, val_fraction=val_fraction, text_column=text_column)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        return split_indices(count, val_fraction, seed)

    return build(output_dir, lambda: iter_documents(source, text_column), split, tokenizer_dir, train_tokenizer,
                 num_proc, overwrite, about, shard_documents)


def prepare_before_launch(source: str, output_dir: Path, world_size: int, tokenizer_dir: Path = GPT2_TOKENIZER,
                          train_tokenizer: int | None = None, val_fraction: float = 0.0005) -> None:
    """What a training script does with missing data before its processes start: one process prepares it; a run of
    several is refused with the command to run first (rank 0 would prepare while the other ranks waited past the
    process group's timeout)."""
    if world_size > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        tokenizer = (f"--train_tokenizer {train_tokenizer}" if train_tokenizer is not None
                     else f"--tokenizer_dir {tokenizer_dir}")
        raise FileNotFoundError(
            f"No prepared data in {str(output_dir)!r}, and a run of {world_size} processes does not prepare it (the"
            f" others would time out waiting): run `python scripts/prepare_openwebtext.py --source {source}"
            f" --output_dir {output_dir} {tokenizer} --val_fraction {val_fraction}` first, then this command.")
    try:
        prepare(source, output_dir, tokenizer_dir=tokenizer_dir, train_tokenizer=train_tokenizer,
                val_fraction=val_fraction)
    except FileExistsError:
        if not (Path(output_dir) / META_FILENAME).is_file():
            raise
        # another run prepared the same folder since this one looked (a race of two launches): use what it wrote
        print(f"{output_dir} was prepared meanwhile by another run; using it.")


def write_prepared(train_rows, val_rows, output_dir: Path, tokenizer_dir: Path | None, train_tokenizer: int | None,
                   num_proc: int | None, overwrite: bool, about: dict) -> Path:
    """Tokenize a split already made (two `datasets.Dataset`s with a "text" column, or lists of texts) into train.bin /
    val.bin, with the tokenizer of `tokenizer_dir` or a BPE of `train_tokenizer` tokens trained on the training rows
    only; `about` goes into meta.json (where the split came from)."""
    train, val = list(texts_of(train_rows)), list(texts_of(val_rows))

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(len(train)), np.arange(len(train), count)

    return build(Path(output_dir), lambda: iter(train + val), split, tokenizer_dir, train_tokenizer, num_proc,
                 overwrite, about, SHARD_DOCUMENTS, count_about=False)


def build(output_dir: Path, documents, split, tokenizer_dir: Path | None, train_tokenizer: int | None,
          num_proc: int | None, overwrite: bool, about: dict, shard_documents: int, count_about: bool = True) -> Path:
    """The streaming preparation: `documents()` opens a fresh pass over the documents, `split(n)` gives the (training,
    validation) document indices in the order they are written."""
    output_dir = Path(os.path.abspath(output_dir))
    if output_dir.is_symlink():
        raise FileExistsError(f"{str(output_dir)!r} is a symbolic link: outputs are written as new folders, never"
                              " through links; choose a real path.")
    num_proc = num_proc or min(8, os.cpu_count() or 1)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = output_dir.with_name(f".{output_dir.name}.partial")
    with output_lock(output_dir):
        check_replaceable(output_dir, overwrite)  # again: an earlier writer may have finished meanwhile
        settings = dict(about, tokenizer_dir=None if train_tokenizer else str(Path(tokenizer_dir).resolve()),
                        train_tokenizer=train_tokenizer, shard_documents=shard_documents, format=1)
        start_work(work, settings)
        set_interrupt_note(f"the finished shards are kept in {work}; run the same command again to continue.")
        try:
            meta = prepare_in(work, documents, split, tokenizer_dir, train_tokenizer, num_proc, about,
                              shard_documents, count_about)
        except Exception as error:  # bad input: the shards are worth nothing; a kill or a full disk keeps them
            set_interrupt_note("nothing was saved.")
            if not (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)):
                shutil.rmtree(work, ignore_errors=True)
            raise
        set_interrupt_note("nothing was saved.")
        for name in list(work.iterdir()):
            if name.name.startswith("shard-") or name.name in ("settings.json", "tokenized.json"):
                name.unlink()
        move_into_place(work, output_dir)
    print(f"Prepared {output_dir}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens"
          f" ({meta['dtype']}, vocabulary {meta['vocab_size']:,}, unigram loss {meta['unigram_loss']:.3f})")
    return output_dir


def check_document_count(n: int, with_text: int, about: dict) -> None:
    where = about.get("source", "the text")
    if n < 2:
        raise ValueError(f"Found {n} document(s) in {where!r}; need at least two to split off validation.")
    if with_text == 0:
        raise ValueError(f"{where!r} holds no text: its {n} documents are all white space; check the source.")


def start_work(work: Path, settings: dict) -> None:
    """The work folder, kept from an earlier run of the same settings (its shards are reused), else made anew."""
    record = work / "settings.json"
    if work.is_dir():
        try:
            same = json.loads(record.read_text()) == settings
        except (OSError, ValueError):
            same = False
        if same:
            print(f"Continuing the preparation in {work} ({finished_shards(work)} shard(s) done)", flush=True)
            return
        shutil.rmtree(work)
    work.mkdir()
    record.write_text(json.dumps(settings, indent=1))


def prepare_in(work: Path, documents, split, tokenizer_dir: Path | None, train_tokenizer: int | None, num_proc: int,
               about: dict, shard_documents: int, count_about: bool) -> dict:
    if not (work / "tokenizer.json").is_file() and not (work / "tokenizer.model").is_file():
        if train_tokenizer:  # on the training documents only, read in the source's order (BPE ignores order)
            counter = TextCounter(documents())
            n = sum(1 for _ in counter)
            check_document_count(n, counter.with_text, about)
            is_train = np.zeros(n, dtype=bool)
            is_train[split(n)[0]] = True
            train_bpe((d for i, d in enumerate(documents()) if is_train[i]), train_tokenizer, work)
        elif not copy_tokenizer_files(Path(tokenizer_dir), work):
            raise FileNotFoundError(f"No tokenizer files in {str(tokenizer_dir)!r}.")
    tokenizer = Tokenizer(work)
    if tokenizer.eos_id is None:
        raise ValueError(f"The tokenizer in {str(tokenizer_dir)!r} has no end-of-text token to separate documents.")
    dtype = token_dtype(tokenizer.vocab_size)
    tokenized = tokenize_to_shards(documents(), work, dtype, num_proc, shard_documents)
    shards = Shards(work, tokenized["shards"], dtype)
    try:
        check_document_count(len(shards), tokenized["documents_with_text"], about)
        train_order, val_order = split(len(shards))
        counts = {name: assemble(shards, order, work / f"{name}.bin")
                  for name, order in (("val", val_order), ("train", train_order))}
    finally:
        shards.close()
    train_path, val_path = work / "train.bin", work / "val.bin"
    meta = dict(about, tokenizer=tokenizer_fingerprint(work), vocab_size=tokenizer.vocab_size,
                dtype=dtype.name, eos_id=tokenizer.eos_id,
                max_token_id=max(max_token(train_path, dtype), max_token(val_path, dtype)),
                train_tokens=counts["train"], val_tokens=counts["val"],
                unigram_loss=unigram_loss(chunks(train_path, dtype), chunks(val_path, dtype), tokenizer.vocab_size))
    if count_about:
        meta = dict(meta, documents=len(shards))
    (work / META_FILENAME).write_text(json.dumps(meta, indent=2))
    return meta
