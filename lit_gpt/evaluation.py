"""Evaluation pieces shared by eval/: sliding-window perplexity and passkey retrieval."""

import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_gpt.generation import generate_text
from lit_gpt.model import GPT
from lit_gpt.utils import progress_bar


@torch.inference_mode()
def sliding_window_nll(model: GPT, ids: torch.Tensor, window: int, stride: int, progress: bool = True):
    """Summed negative log-likelihood (nats) of every token of `ids` but the first, and how many were scored.

    The model reads windows of `window` tokens that advance by `stride`; each token is scored once, in the first
    window that predicts it, after at least `window - stride` tokens of context (the usual Hugging Face recipe)."""
    if not 0 < stride <= window:
        raise ValueError(f"The stride must lie in (0, window={window}], got {stride}.")
    total, count, scored_until = 0.0, 0, 1  # token 0 has no context and is never scored
    starts = list(range(0, max(1, ids.numel() - 1), stride))
    last = next((i for i, begin in enumerate(starts) if begin + window + 1 >= ids.numel()), len(starts) - 1)
    for begin in progress_bar(starts[: last + 1], desc="perplexity", unit="window", disable=not progress):
        end = min(begin + window + 1, ids.numel())
        chunk = ids[begin:end].unsqueeze(0).to(model.lm_head.weight.device)
        logits = model(chunk[:, :-1]).float()
        targets = chunk[0, 1:].clone()
        first_new = scored_until - begin - 1  # targets before this index were scored by an earlier window
        targets[: max(first_new, 0)] = -100
        nll = F.cross_entropy(logits[0], targets, ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((targets != -100).sum())
        scored_until = end
    return total, count


@dataclass
class PerplexityResult:
    nll: float
    tokens: int
    words: int
    bytes: int

    def as_dict(self) -> dict:
        return dict(nll=self.nll, tokens=self.tokens, words=self.words, bytes=self.bytes,
                    token_perplexity=math.exp(self.nll / self.tokens), word_perplexity=math.exp(self.nll / self.words),
                    bits_per_byte=self.nll / self.bytes / math.log(2))


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity: runs of non-whitespace."""
    return len(re.findall(r"\S+", text))


# The standard passkey prompt (Mohtashami & Jaggi 2023), built here for every tool and the study
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                            "There and back again.")
PASSKEY_FILLER = " ".join(PASSKEY_FILLER_SENTENCES)
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_needle(key: int, repeated: bool = True) -> str:
    """The sentence that hides the key; the standard one says it twice."""
    return f"The pass key is {key}. Remember it." + (f" {key} is the pass key." if repeated else "")


def passkey_text(needle: str, before: list[str], after: list[str], intro: bool = True) -> str:
    """[intro] <filler before> needle <filler after> question, joined by spaces."""
    return " ".join([*([PASSKEY_INTRO] if intro else []), *before, needle, *after, PASSKEY_QUESTION])


def passkey_min_length(tokenizer) -> int:
    """The fewest tokens a passkey prompt can have: the fixed text with the longest key, and one filler."""
    fixed = tokenizer.encode(passkey_text(passkey_needle(99999), [], [])).numel()
    return fixed + tokenizer.encode(" " + PASSKEY_FILLER, bos=False).numel()


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> str:
    """A prompt of about `length` tokens with the needle at relative `depth` (0 = start, 1 = end of the filler)."""
    fixed = tokenizer.encode(passkey_text(passkey_needle(key), [], [])).numel()
    per_filler = tokenizer.encode(" " + PASSKEY_FILLER, bos=False).numel()
    n_fillers = max(0, (length - fixed) // per_filler)
    before = round(n_fillers * depth)
    return passkey_text(passkey_needle(key), [PASSKEY_FILLER] * before, [PASSKEY_FILLER] * (n_fillers - before))


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def passkey_keys(trials: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(trials)]


def run_passkey_grid(model: GPT, tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int,
                     max_new_tokens: int) -> list[dict]:
    """One row per (length, depth) cell, with its accuracy and the raw answers."""
    rows = []
    cells = [(length, depth) for length in lengths for depth in depths]
    for i, (length, depth) in enumerate(progress_bar(cells, desc="passkey", unit="cell")):
        answers, correct = [], 0
        for key in passkey_keys(trials, seed + i):
            prompt = passkey_prompt(tokenizer, length, depth, key)
            answer = generate_text(model, tokenizer, prompt, max_new_tokens, temperature=0.0)
            answers.append(answer)
            correct += first_integer(answer) == key
        rows.append(dict(length=length, depth=depth, accuracy=correct / trials, trials=trials, answers=answers))
    return rows


def summarize_passkey(rows: list[dict]) -> dict:
    lengths = sorted({r["length"] for r in rows})
    per_length = {str(n): sum(r["accuracy"] for r in rows if r["length"] == n) / sum(r["length"] == n for r in rows)
                  for n in lengths}
    return dict(accuracy=sum(r["accuracy"] for r in rows) / len(rows), per_length=per_length, cells=rows)

