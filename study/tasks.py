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


def retrieval_prompt(key: int, before: int, after: int, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) with `before` filler sentences ahead of the needle and `after` behind it."""
    filler = lambda n: [rng.choice(PASSKEY_FILLER_SENTENCES) for _ in range(n)]  # noqa: E731
    prompt = passkey_text(passkey_needle(key, repeated=False), filler(before), filler(after), intro=False)
    return prompt, f" {key}."


def filler_tokens(tokenizer) -> tuple[int, float]:
    """Tokens of a document without filler, and the mean tokens of one filler sentence."""
    prompt, answer = retrieval_prompt(12345, 0, 0, random.Random(0))
    fixed = tokenizer.encode(prompt + answer, bos=False).numel()
    sentences = PASSKEY_FILLER_SENTENCES
    per = sum(tokenizer.encode(" " + s, bos=False).numel() for s in sentences) / len(sentences)
    return fixed, per


def training_documents(tokenizer, count: int, block_size: int, seed: int) -> list[str]:
    """Documents that fit a training window, with a filler count drawn uniformly from everything that fits and the
    needle at a uniform depth, so that training sees every distance the window allows."""
    rng = random.Random(seed)
    fixed, per = filler_tokens(tokenizer)
    most = max(0, math.floor((block_size - fixed - 2) / per))
    documents = []
    for _ in range(count):
        total = rng.randint(0, most)
        before = rng.randint(0, total)
        prompt, answer = retrieval_prompt(rng.randint(10000, 99999), before, total - before, rng)
        documents.append(prompt + answer)
    return documents


def evaluation_cells(tokenizer, lengths: list[int], depths: list[float], keys: int, seed: int) -> list[dict]:
    """For each (length, depth): `keys` prompts of about `length` tokens (answer included) with the needle at `depth`
    of the filler, tokenized as (prompt ids, answer ids)."""
    fixed, per = filler_tokens(tokenizer)
    cells = []
    for i, (length, depth) in enumerate((n, d) for n in lengths for d in depths):
        rng = random.Random(seed * 7919 + i)
        total = max(0, round((length - fixed) / per))
        before = round(total * depth)
        examples = []
        for _ in range(keys):
            prompt, answer = retrieval_prompt(rng.randint(10000, 99999), before, total - before, rng)
            examples.append((tokenizer.encode(prompt, bos=False), tokenizer.encode(prompt + answer, bos=False)))
        cells.append(dict(length=length, depth=depth, examples=[(p, full[p.numel():]) for p, full in examples]))
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
