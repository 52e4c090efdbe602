"""One tokenizer interface over Hugging Face `tokenizer.json`, SentencePiece and Llama-3's tiktoken files."""

from pathlib import Path

import torch

from lit_gpt.utils import check_readable, read_json

# files that travel with every checkpoint folder
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "vocab.json", "merges.txt",
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]


class Tokenizer:
    def __init__(self, checkpoint_dir: str | Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"Expected a checkpoint folder at {str(checkpoint_dir)!r}, found nothing there.")
        settings = read_json_if_present(checkpoint_dir / "tokenizer_config.json")
        if (checkpoint_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            path = checkpoint_dir / "tokenizer.json"
            check_readable(path, "the tokenizer")
            try:
                self.backend, self.processor = "huggingface", HFTokenizer.from_file(str(path))
            except Exception as error:  # the tokenizers library raises a bare Exception for a damaged file
                first = (str(error).strip().splitlines() or ["unreadable"])[0][:200]
                raise ValueError(f"{str(path)!r} is not a tokenizer file the tokenizers library can read ({first});"
                                 " copy the model's own tokenizer.json again.") from None
            self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
            token_to_id = self.processor.token_to_id
        elif (checkpoint_dir / "tokenizer.model").is_file():
            check_readable(checkpoint_dir / "tokenizer.model", "the tokenizer")
            self.backend, self.processor = load_model_file(checkpoint_dir / "tokenizer.model")
            if self.backend == "sentencepiece":
                self.vocab_size = self.processor.vocab_size()
                token_to_id = self.processor.piece_to_id
            else:
                self.vocab_size = self.processor.n_vocab
                token_to_id = lambda token: self.processor._special_tokens.get(token)  # noqa: E731
                settings = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
                            **settings}
        else:
            raise FileNotFoundError(
                f"No tokenizer in {str(checkpoint_dir)!r}: expected tokenizer.json or tokenizer.model there."
            )
        lookup = lambda token: token_to_id(token) if token else None  # noqa: E731
        for key in ("bos_token", "eos_token"):
            if not isinstance(token_name(settings.get(key)), str | None):
                raise ValueError(f"{str(checkpoint_dir / 'tokenizer_config.json')!r}: {key} should be a token (text),"
                                 f" found {settings[key]!r}; fix the file or copy the model's own again.")
        self.bos_id = lookup(token_name(settings.get("bos_token")))
        # without a tokenizer_config.json (GPT-2's original files), the end-of-text token is the usual one
        self.eos_id = lookup(token_name(settings.get("eos_token"))) or lookup("<|endoftext|>")
        if self.backend == "sentencepiece":
            self.bos_id, self.eos_id = self.processor.bos_id(), self.processor.eos_id()
        self.use_bos = bool(settings.get("add_bos_token", self.backend == "sentencepiece")) and self.bos_id is not None

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> torch.Tensor:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # lone surrogates: bytes that were not UTF-8 where the text came from
            raise ValueError(f"The text holds bytes that are not valid UTF-8 (at character {error.start}): pass UTF-8"
                             " text.") from None
        if self.backend == "huggingface":
            ids = self.processor.encode(text, add_special_tokens=False).ids
        elif self.backend == "sentencepiece":
            ids = self.processor.encode(text)
        else:
            ids = self.processor.encode(text, allowed_special=set())
        if (self.use_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.backend == "huggingface":
            return self.processor.decode(ids, skip_special_tokens=False)
        return self.processor.decode(ids)


def tokenizer_fingerprint(folder: Path) -> str:
    """A hash of the vocabulary file, to tell whether two folders tokenize alike."""
    import hashlib

    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(folder) / name).is_file():
            return hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()[:16]
    raise FileNotFoundError(f"No tokenizer in {str(folder)!r}: expected tokenizer.json or tokenizer.model there.")


def read_json_if_present(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def token_name(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's text format (a base64 token and its rank per line), read from the file's own bytes: tiktoken's own
    loader caches files by their path in a folder shared by every user of the machine, so a file replaced in place
    would be read as the old one."""
    import base64
    import binascii

    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{str(path)!r} is neither a SentencePiece model nor tiktoken's vocabulary (line {number}"
                             " is not a token and its rank): copy the model's own tokenizer.model again.") from None
    if not ranks:
        raise ValueError(f"{str(path)!r} holds no vocabulary (an empty file?): copy the model's own tokenizer.model"
                         " again.")
    return ranks


def load_model_file(path: Path):
    """A `tokenizer.model` is either SentencePiece (Llama 2, Mistral) or tiktoken's text format (Llama 3)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
        return "sentencepiece", processor
    except (RuntimeError, OSError):
        pass
    import tiktoken

    ranks = read_tiktoken_ranks(path)
    names = LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - len(LLAMA3_SPECIAL) + 5)]
    special = {name: len(ranks) + i for i, name in enumerate(names)}
    encoding = tiktoken.Encoding(path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    return "tiktoken", encoding
