"""Reading prepared token files: random training windows chosen by the step number alone (so a resumed run and a
run on any number of processes see the same global batches) and fixed validation windows."""

import glob
from pathlib import Path

import numpy as np
import torch

from lit_gpt.data.prepare import META_FILENAME
from lit_gpt.tokenizer import tokenizer_fingerprint
from lit_gpt.utils import read_json

TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")


def check_meta(meta: dict, path: Path) -> None:
    """meta.json's fields have the types prepare writes: a token dtype, whole numbers of tokens."""
    if meta["dtype"] not in TOKEN_DTYPES:
        raise ValueError(f"{str(path)!r}: dtype should be one of {', '.join(TOKEN_DTYPES)}, got {meta['dtype']!r};"
                         " prepare the data again.")
    for key in ("train_tokens", "val_tokens", "max_token_id"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise ValueError(f"{str(path)!r}: {key} should be a whole number, got {meta[key]!r}; prepare the data"
                             " again.")
    if meta["eos_id"] is not None and (isinstance(meta["eos_id"], bool) or not isinstance(meta["eos_id"], int)):
        raise ValueError(f"{str(path)!r}: eos_id should be a token id or null, got {meta['eos_id']!r}; prepare the"
                         " data again.")


class TokenData:
    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        meta_file = folder / META_FILENAME
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"No prepared data in {str(folder)!r} (expected {META_FILENAME}, train.bin, val.bin). Prepare it with"
                f" `python scripts/prepare_openwebtext.py --output_dir {folder}`."
            )
        self.folder = folder
        self.meta = read_json(meta_file, required=("dtype", "train_tokens", "val_tokens", "max_token_id", "eos_id"))
        check_meta(self.meta, meta_file)
        self.train, self.val = (self._open(name) for name in ("train", "val"))

    def _open(self, name: str) -> np.memmap:
        path = self.folder / f"{name}.bin"
        expected = self.meta[f"{name}_tokens"]
        size = path.stat().st_size if path.is_file() else -1
        if size != expected * np.dtype(self.meta["dtype"]).itemsize:
            raise ValueError(f"{str(path)!r} should hold {expected:,} tokens but has {max(size, 0):,} bytes:"
                             " the folder is incomplete; prepare it again with --overwrite.")
        return np.memmap(path, dtype=self.meta["dtype"], mode="r")

    def check_tokenizer(self, checkpoint_dir: Path) -> None:
        if self.meta.get("tokenizer") != tokenizer_fingerprint(checkpoint_dir):
            raise ValueError(
                f"{str(self.folder)!r} was tokenized with another tokenizer than {str(checkpoint_dir)!r}'s: prepare"
                f" it again with --tokenizer_dir {checkpoint_dir}."
            )

    def check_own_tokenizer(self) -> None:
        """The tokenizer files in the folder are those it was prepared with (they go into every checkpoint)."""
        found = tokenizer_fingerprint(self.folder)
        if self.meta.get("tokenizer") != found:
            raise ValueError(
                f"The tokenizer files in {str(self.folder)!r} (fingerprint {found}) are not those its tokens were made"
                f" with ({self.meta.get('tokenizer')}, in {META_FILENAME}): prepare the folder again with --overwrite."
            )

    def check(self, vocab_size: int, block_size: int) -> None:
        """Refuse data the model cannot read: token ids beyond its vocabulary, or sets shorter than a window."""
        if self.meta["max_token_id"] >= vocab_size:
            raise ValueError(
                f"{str(self.folder)!r} holds token ids up to {self.meta['max_token_id']} but the model's vocabulary"
                f" has {vocab_size} entries: prepare the data with the model's tokenizer or pick a matching model."
            )
        shortest = min(len(self.train), len(self.val))
        if shortest <= block_size:
            raise ValueError(
                f"Training windows of {block_size + 1} tokens do not fit the data ({len(self.train)} training,"
                f" {len(self.val)} validation tokens): lower --train.max_seq_length or prepare more text."
            )


# ---- llm.c / modded-nanogpt `.bin` shards ----------------------------------------------------------------------------

# magic -> (version, token dtype, the tokenizer's vocabulary): GPT-2 (FineWeb-10B, llm.c's GPT-2 runs) and Llama 3
BIN_FORMATS = {20240520: (1, np.dtype("<u2"), 50257), 20240801: (7, np.dtype("<u4"), 128256)}
BIN_HEADER_INTS = 256  # a header of 256 little-endian int32: magic, version, token count, then zeros


def read_bin_header(path: Path) -> tuple[int, np.dtype, int]:
    """(token count, token dtype, vocabulary) of one llm.c `.bin` shard, its header checked against the file: a file
    of another kind, version or size is one line naming what was expected and what was found."""
    path = Path(path)
    size = path.stat().st_size
    header = np.fromfile(path, dtype="<i4", count=BIN_HEADER_INTS)
    if len(header) < BIN_HEADER_INTS:
        raise ValueError(f"{str(path)!r} has {size} bytes, fewer than the {4 * BIN_HEADER_INTS}-byte header of an llm.c"
                         " .bin shard: a truncated or foreign file; download it again.")
    magic, version, count = (int(x) for x in header[:3])
    if magic not in BIN_FORMATS:
        raise ValueError(f"{str(path)!r} is not an llm.c .bin shard: its header starts with {magic}, expected one of"
                         f" {sorted(BIN_FORMATS)} (GPT-2 or Llama 3 tokens); pass shards written by llm.c's or"
                         " modded-nanogpt's data scripts.")
    expected_version, dtype, vocab = BIN_FORMATS[magic]
    if version != expected_version:
        raise ValueError(f"{str(path)!r}: header version {version}, expected {expected_version} for magic {magic}:"
                         " a shard format this reader does not know.")
    expected = 4 * BIN_HEADER_INTS + count * dtype.itemsize
    if count < 0 or size != expected:
        raise ValueError(f"{str(path)!r}: its header counts {count:,} tokens ({expected:,} bytes with the header) but"
                         f" the file has {size:,} bytes: truncated or damaged; download it again.")
    return count, dtype, vocab


class ConcatenatedTokens:
    """Memory-mapped shards read as one token sequence (slices may cross a shard boundary, as they cross documents
    within a shard); `len` and `[start:stop]` are all the batches need."""

    def __init__(self, paths: list[Path]) -> None:
        self.parts, self.dtype = [], None
        for path in paths:
            count, dtype, _ = read_bin_header(path)
            if self.dtype is not None and dtype != self.dtype:
                raise ValueError(f"{str(path)!r} holds {dtype.name} tokens, {str(paths[0])!r} {self.dtype.name}: mixed"
                                 " shard formats; pass shards of one tokenizer.")
            self.dtype = dtype
            self.parts.append(np.memmap(path, dtype=dtype, mode="r", offset=4 * BIN_HEADER_INTS, shape=(count,)))
        self.ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self))
        pieces = []
        while start < stop:
            shard = int(np.searchsorted(self.ends, start, side="right"))
            first = int(self.ends[shard - 1]) if shard else 0
            end = min(stop, int(self.ends[shard]))
            pieces.append(self.parts[shard][start - first:end - first])
            start = end
        return np.concatenate(pieces) if len(pieces) != 1 else np.asarray(pieces[0])

    def chunks(self, size: int = 1 << 24):
        """(first token's position, tokens) over the whole sequence, a chunk at a time."""
        for first, part in zip([0, *self.ends[:-1].tolist()], self.parts):
            for i in range(0, len(part), size):
                yield first + i, np.asarray(part[i:i + size])


def shard_paths(pattern: str, flag: str) -> list[Path]:
    """The files a glob pattern names, sorted (llm.c's shard names sort in order)."""
    paths = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser())))
    if not paths:
        raise FileNotFoundError(f"{flag} {pattern}: no file matches; expected llm.c .bin shards, e.g."
                                " fineweb10B/fineweb_train_*.bin (data/fineweb.py in llm.c, or modded-nanogpt's"
                                " cached_fineweb10B.py, writes them).")
    return paths


class BinShardData:
    """Pre-tokenized llm.c `.bin` shards (a 256-int32 header, then the tokens) as training and validation data: the
    same interface as TokenData, the tokenizer taken from `tokenizer_dir` (the shards carry none)."""

    def __init__(self, train_pattern: str, val_pattern: str, tokenizer_dir: Path) -> None:
        from lit_gpt.tokenizer import Tokenizer

        self.folder = Path(tokenizer_dir)  # what checkpoints copy their tokenizer files from
        self.train = ConcatenatedTokens(shard_paths(train_pattern, "--data.train_bin"))
        self.val = ConcatenatedTokens(shard_paths(val_pattern, "--data.val_bin"))
        if self.train.dtype != self.val.dtype:
            raise ValueError(f"--data.train_bin holds {self.train.dtype.name} tokens, --data.val_bin"
                             f" {self.val.dtype.name}: pass shards of one tokenizer.")
        vocab = next(v for _, d, v in BIN_FORMATS.values() if d == self.train.dtype)
        tokenizer = Tokenizer(tokenizer_dir)
        if tokenizer.vocab_size != vocab:
            raise ValueError(f"The .bin shards hold tokens of a {vocab:,}-token vocabulary but --data.tokenizer_dir"
                             f" {tokenizer_dir} has {tokenizer.vocab_size:,}: pass the tokenizer the shards were made"
                             " with (data/tokenizers/gpt2 for GPT-2 shards).")
        self.meta = dict(dtype=self.train.dtype.name, vocab_size=vocab, eos_id=tokenizer.eos_id,
                         max_token_id=vocab - 1, train_tokens=len(self.train), val_tokens=len(self.val),
                         train_shards=len(self.train.parts), val_shards=len(self.val.parts))

    def check_own_tokenizer(self) -> None:
        pass  # the tokenizer is the one named, checked against the shards' vocabulary above

    def check(self, vocab_size: int, block_size: int) -> None:
        TokenData.check(self, vocab_size, block_size)


def windows(data: np.ndarray, offsets: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (len(offsets), block_size) each."""
    rows = np.stack([data[o : o + block_size + 1].astype(np.int64) for o in offsets.tolist()])
    tokens = torch.from_numpy(rows)
    return tokens[:, :-1], tokens[:, 1:]


def train_offsets(n_tokens: int, block_size: int, count: int, seed: int, step: int,
                  starts: torch.Tensor | None = None) -> torch.Tensor:
    """The window starts of global batch `step`, a function of (seed, step) alone: anywhere, or drawn from `starts`."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if starts is not None:
        return starts[torch.randint(len(starts), (count,), generator=generator)]
    return torch.randint(n_tokens - block_size, (count,), generator=generator)


def document_starts(tokens, eos_id: int, block_size: int) -> torch.Tensor:
    """The first token of every document (the file's start and each token after an end-of-text) whose window of
    block_size + 1 tokens fits in the file (read a chunk at a time for shards)."""
    chunks = tokens.chunks() if hasattr(tokens, "chunks") else [(0, np.asarray(tokens))]
    starts = np.concatenate([[0], *(np.flatnonzero(chunk == eos_id) + 1 + first for first, chunk in chunks)])
    return torch.from_numpy(starts[starts + block_size + 1 <= len(tokens)].astype(np.int64))


def val_offsets(n_tokens: int, block_size: int, count: int) -> torch.Tensor:
    """`count` windows spread evenly over the validation tokens: the same set at every evaluation."""
    return torch.linspace(0, n_tokens - block_size - 1, count).long()


class TokenBatches:
    """Global batch `step` is a function of (seed, step): resumed and multi-process runs see the same batches."""

    def __init__(self, data: TokenData, block_size: int, seed: int, global_batch: int, micro_batch: int,
                 eval_iters: int, window_start: str = "random") -> None:
        self.data, self.block_size, self.seed = data, block_size, seed
        self.global_batch, self.micro_batch, self.eval_iters = global_batch, micro_batch, eval_iters
        windows = eval_iters * micro_batch
        if windows > len(data.val):
            raise ValueError(f"--eval.max_iters {eval_iters} asks for {windows:,} validation windows but the validation"
                             f" text has {len(data.val):,} tokens: lower --eval.max_iters (every window is scored at"
                             " each validation).")
        self.starts = None  # "random": a training window may start anywhere
        if window_start == "document":
            self.starts = document_starts(data.train, data.meta["eos_id"], block_size)
            if len(self.starts) == 0:
                raise ValueError(f"{str(data.folder)!r} has no document with room for a window of {block_size + 1}"
                                 " tokens after it: use --data.window_start random.")

    def train(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = train_offsets(len(self.data.train), self.block_size, self.global_batch, self.seed, step,
                                self.starts)
        per_rank = self.global_batch // world_size
        return windows(self.data.train, offsets[rank * per_rank : (rank + 1) * per_rank], self.block_size)

    def val(self, rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        offsets = val_offsets(len(self.data.val), self.block_size, self.eval_iters * self.micro_batch)
        mine = offsets[rank::world_size].split(self.micro_batch)
        return [windows(self.data.val, chunk, self.block_size) for chunk in mine if len(chunk)]
