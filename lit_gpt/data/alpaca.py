"""Instruction data in the Alpaca format: a JSON list (or JSON lines) of {"instruction", "input", "output"}.
The loss is taken on the response only."""

import json
import warnings
from pathlib import Path

import torch

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def load_records(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected instruction data at {str(path)!r}, found nothing there.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x},"
                         " as in Latin-1): save it as UTF-8.") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{str(path)!r} is not valid JSON at line {number} ({error.msg}, column"
                                     f" {error.colno}).") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} is not valid JSON ({error}).") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{str(path)!r} should hold a non-empty list of records.")
    for i, record in enumerate(records):
        for field in ("instruction", "output"):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"Record {i} of {str(path)!r} lacks the text field {field!r}: {str(record)[:80]}")
    return records


def prompt_of(record: dict) -> str:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def encode_records(records: list[dict], tokenizer, max_length: int, truncate: bool, source: str):
    """(input ids, targets) per record; targets are -100 over the prompt. Too long: cut (warn) or refuse."""
    examples, cut = [], 0
    for i, record in enumerate(records):
        prompt = tokenizer.encode(prompt_of(record))
        full = torch.cat((prompt, tokenizer.encode(record["output"], bos=False, eos=True)))
        if full.numel() - 1 > max_length:
            if not truncate:
                raise ValueError(
                    f"Record {i} of {source} is {full.numel()} tokens, more than the {max_length + 1} a sequence may"
                    " have: pass --truncate to cut such records, or drop them from the data."
                )
            full, cut = full[: max_length + 1], cut + 1
        targets = full.clone()
        targets[: prompt.numel()] = -100
        if not (targets[1:] != -100).any():
            raise ValueError(
                f"Record {i} of {source} keeps no response token after --truncate: its prompt alone is"
                f" {prompt.numel()} tokens of the {max_length + 1} a sequence may have. Raise --train.max_seq_length"
                " or drop such records: a record without response tokens trains nothing."
            )
        examples.append((full[:-1], targets[1:]))
    if cut:
        warnings.warn(f"Cut {cut} of {len(records)} records of {source} to {max_length + 1} tokens.", stacklevel=2)
    return examples


def pad(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(x.numel() for x, _ in examples)
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        inputs[row, : x.numel()], targets[row, : y.numel()] = x, y
    return inputs, targets


class InstructionBatches:
    """Global batch `step` samples records with a generator seeded by (seed, step), like the token batches."""

    def __init__(self, train, val, seed: int, global_batch: int, micro_batch: int, eval_iters: int, pad_id: int):
        self.train_examples, self.val_examples = train, val
        self.seed, self.global_batch, self.micro_batch, self.eval_iters = seed, global_batch, micro_batch, eval_iters
        self.pad_id = pad_id

    def train(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        chosen = torch.randint(len(self.train_examples), (self.global_batch,), generator=generator)
        per_rank = self.global_batch // world_size
        return pad([self.train_examples[i] for i in chosen[rank * per_rank : (rank + 1) * per_rank]], self.pad_id)

    def val(self, rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.val_examples[: self.eval_iters * self.micro_batch][rank::world_size]
        return [pad(mine[i : i + self.micro_batch], self.pad_id) for i in range(0, len(mine), self.micro_batch)]
