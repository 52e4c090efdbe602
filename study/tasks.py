"""Retrieval at lengths beyond training, for the study (study/reproduce.py): passkey documents with a short fixed
part and single-sentence filler, scored teacher-forced (exact match and log-likelihood of the answer), and the loss
of held-out text by position band.

A document reads: <filler> The pass key is 12345. Remember it. <filler> What is the pass key? The pass key is 12345.
Its answer is " 12345." (the key and the full stop); greedy decoding writes the answer exactly when every answer token
is the model's top choice given the tokens before it, so exact match needs one forward pass instead of a decode.
"""

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from lit_gpt.evaluation import PASSKEY_FILLER_SENTENCES, passkey_needle, passkey_text

TRAINING_FILLER = PASSKEY_FILLER_SENTENCES  # the sentences of training documents (as eval/passkey.py's)
HELD_OUT_FILLER = ("The snow is white.", "The night is dark.", "The sea is deep.", "Off we go now.",
                   "Up and down the hill.")  # only in validation and evaluation prompts


def held_out_key(key: int) -> bool:
    """The keys (a tenth of 10000-99999, spread evenly) that no training document contains."""
    return key * 2654435761 % 1000 < 100


def draw_key(rng: random.Random, held_out: bool) -> int:
    while True:
        key = rng.randint(10000, 99999)
        if held_out_key(key) == held_out:
            return key


def retrieval_prompt(key: int, before: int, after: int, rng: random.Random,
                     filler: tuple[str, ...] = TRAINING_FILLER) -> tuple[str, str]:
    """(prompt, answer) with `before` filler sentences ahead of the needle and `after` behind it."""
    sentences = lambda n: [rng.choice(filler) for _ in range(n)]  # noqa: E731
    prompt = passkey_text(passkey_needle(key, repeated=False), sentences(before), sentences(after), intro=False)
    return prompt, f" {key}."


def filler_tokens(tokenizer, filler: tuple[str, ...] = TRAINING_FILLER) -> tuple[int, float]:
    """Tokens of a document without filler, and the mean tokens of one filler sentence."""
    prompt, answer = retrieval_prompt(12345, 0, 0, random.Random(0))
    fixed = tokenizer.encode(prompt + answer, bos=False).numel()
    per = sum(tokenizer.encode(" " + s, bos=False).numel() for s in filler) / len(filler)
    return fixed, per


def training_documents(tokenizer, count: int, block_size: int, seed: int, held_out: bool = False) -> list[str]:
    """Documents that fit a training window, with a filler count drawn uniformly from everything that fits and the
    needle at a uniform depth, so that training sees every distance the window allows. `held_out`: the same with
    the held-out keys and filler (validation documents), and at least one sentence after the needle: "Remember it.
    What is the pass key? The pass key is" is 50 characters of template that training documents without filler after
    their needle also hold."""
    rng = random.Random(seed)
    filler = HELD_OUT_FILLER if held_out else TRAINING_FILLER
    fixed, per = filler_tokens(tokenizer, filler)
    most = max(0, math.floor((block_size - fixed - 2) / per))
    documents = []
    for _ in range(count):
        total = rng.randint(0, most)
        before = rng.randint(0, total)
        if held_out:  # a held-out sentence between needle and question: no 50-character run of fixed template
            total = max(1, total)
            before = min(before, total - 1)
        prompt, answer = retrieval_prompt(draw_key(rng, held_out), before, total - before, rng, filler)
        documents.append(prompt + answer)
    return documents


def tokenized(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt ids, answer ids) of each (prompt, answer), the answer's ids as they tokenize after the prompt."""
    out = []
    for prompt, answer in pairs:
        p, full = tokenizer.encode(prompt, bos=False), tokenizer.encode(prompt + answer, bos=False)
        out.append((p, full[p.numel():]))
    return out


def split_answer(document: str) -> tuple[str, str]:
    """(prompt, answer) of a retrieval document: the prompt ends with its last " The pass key is"."""
    cut = document.rindex(" The pass key is") + len(" The pass key is")
    return document[:cut], document[cut:]


def training_length_prompts(tokenizer, count: int, block_size: int, seed: int) -> list[tuple]:
    """Held-out prompts (keys and filler) at the training length, lengths and depths drawn as in training."""
    documents = training_documents(tokenizer, count, block_size, seed, held_out=True)
    return tokenized(tokenizer, [split_answer(document) for document in documents])


def evaluation_cells(tokenizer, lengths: list[int], depths: list[float], keys: int, seed: int) -> list[dict]:
    """For each (length, depth): `keys` held-out prompts of about `length` tokens (answer included) with the needle
    at `depth` of the filler, tokenized as (prompt ids, answer ids)."""
    fixed, per = filler_tokens(tokenizer, HELD_OUT_FILLER)
    cells = []
    for i, (length, depth) in enumerate((n, d) for n in lengths for d in depths):
        rng = random.Random(seed * 7919 + i)
        total = max(1, round((length - fixed) / per))
        before = min(round(total * depth), total - 1)  # at least one sentence between needle and question
        pairs = [retrieval_prompt(draw_key(rng, True), before, total - before, rng, HELD_OUT_FILLER)
                 for _ in range(keys)]
        cells.append(dict(length=length, depth=depth, examples=tokenized(tokenizer, pairs)))
    return cells


@torch.inference_mode()
def score_answers(model, examples: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int = 8) -> list[dict]:
    """Teacher-forced scores of each (prompt ids, answer ids): exact match (every answer token is the argmax) and
    the answer's log-likelihood in nats. Rows are right-padded; causal attention never sees the padding."""
    device = model.lm_head.weight.device
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [torch.cat((p, a)) for p, a in chunk]
        width = max(r.numel() for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : r.numel()] = r
        model.max_seq_length = max(model.max_seq_length, width)
        logits = model(ids[:, :-1].to(device)).float()
        for i, (p, a) in enumerate(chunk):
            span = logits[i, p.numel() - 1 : p.numel() - 1 + a.numel()]  # the predictions of the answer tokens
            log_probs = span.log_softmax(-1).gather(1, a.to(device)[:, None]).squeeze(1)
            scores.append(dict(exact=bool((span.argmax(-1).cpu() == a).all()), log_likelihood=log_probs.sum().item()))
    return scores


@torch.inference_mode()
def loss_by_position(model, tokens: np.ndarray, window: int, count: int, bands: list[int]) -> dict[str, float]:
    """Mean next-token loss of `count` evenly spaced windows of held-out text, by position band [bands[i],
    bands[i + 1])."""
    device = model.lm_head.weight.device
    model.max_seq_length = max(model.max_seq_length, window)
    starts = np.linspace(0, len(tokens) - window - 2, count).astype(np.int64)
    rows = torch.from_numpy(np.stack([tokens[s : s + window + 1].astype(np.int64) for s in starts]))
    losses = []
    for batch in rows.split(4):
        logits = model(batch[:, :-1].to(device)).float()
        losses.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:].to(device), reduction="none").cpu())
    per_position = torch.cat(losses).mean(0)  # (window,)
    return {f"[{lo},{hi})": per_position[lo:hi].mean().item() for lo, hi in zip(bands, bands[1:])}
