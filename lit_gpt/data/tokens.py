"""Reading prepared token files: random training windows chosen by the step number alone (so a resumed run and a
run on any number of processes see the same global batches) and fixed validation windows."""

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


def document_starts(tokens: np.ndarray, eos_id: int, block_size: int) -> torch.Tensor:
    """The first token of every document (the file's start and each token after an end-of-text) whose window of
    block_size + 1 tokens fits in the file."""
    starts = np.concatenate(([0], np.flatnonzero(np.asarray(tokens) == eos_id) + 1))
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
