"""Sampling and KV-cache decoding, shared by generate/, eval/ and the tests."""

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lit_gpt.checkpoint import load_checkpoint
from lit_gpt.kernels import use_onednn_linear
from lit_gpt.model import GPT, TEMPERATURES
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import at_least, parse_dtype, resolve_device


def inference_dtype(name: str | None, device: str) -> torch.dtype | None:
    """--dtype: as given (None: the checkpoint's own); `auto` picks bfloat16 on a GPU that has it and on a CPU whose
    bf16 matrix products are clearly faster than float32 (the probe of --precision auto), float32 elsewhere, and
    says what it chose and why."""
    if name != "auto":
        return parse_dtype(name)
    from lit_gpt.fabric import FAST_BF16, bf16_speedup

    if str(device).startswith("cuda"):
        chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        print(f"--dtype auto: {chosen} (GPU)", file=sys.stderr)
        return chosen
    speedup = bf16_speedup()
    chosen = torch.bfloat16 if speedup >= FAST_BF16 else torch.float32
    print(f"--dtype auto: {str(chosen).removeprefix('torch.')} (bf16 matrix products run {speedup:.1f}x as fast as"
          f" float32 on this CPU; bf16 needs at least {FAST_BF16}x)", file=sys.stderr)
    return chosen


def keep_temperatures_float32(model: GPT) -> GPT:
    """The temperature modules' parameters back in float32 in a model cast to 16 bits: SSA's slopes and token weights
    are small numbers that bf16 would round (its 8-bit mantissa), and they are computed in float32 anyway."""
    for module in model.modules():
        if isinstance(module, TEMPERATURES):
            module.float()
    return model


def load_for_inference(checkpoint_dir: Path, device: str | None = None, dtype: str | None = None
                       ) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode, on --device, in --dtype) and tokenizer of a checkpoint folder, checked to belong
    together: a tokenizer with more tokens than the model's vocabulary would index past its embedding."""
    device = resolve_device(device)
    chosen = inference_dtype(dtype, device)
    model = load_checkpoint(checkpoint_dir, device=device).eval()  # as stored, then cast: temperatures kept
    if chosen is not None and chosen != model.lm_head.weight.dtype:
        model = keep_temperatures_float32(model.to(chosen))
    model = use_onednn_linear(model)
    tokenizer = Tokenizer(checkpoint_dir)
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise ValueError(
            f"The tokenizer in {str(checkpoint_dir)!r} has {tokenizer.vocab_size:,} tokens but the model's vocabulary"
            f" {model.config.padded_vocab_size:,}: the tokenizer files belong to another model; copy the model's own."
        )
    return model, tokenizer


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float) -> None:
    """Refuse sampling settings that mean nothing, naming the flag."""
    at_least(1, max_new_tokens=max_new_tokens)
    if not temperature >= 0:
        raise ValueError(f"--temperature must be 0 (greedy) or above, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k must be at least 1 (or null for no limit), got {top_k}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p must lie in (0, 1], got {top_p}.")


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0):
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def check_finite_logits(logits: torch.Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise ValueError("The model's logits are NaN or infinite (its weights, or an overflow in a low-precision"
                         " --dtype): nothing can be generated from them; check the checkpoint or use --dtype float32.")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token from the last position's logits (B, vocab); temperature 0 is greedy."""
    check_finite_logits(logits)
    if temperature == 0.0:
        return logits.argmax(-1, keepdim=True)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def check_length(prompt_length: int, max_new_tokens: int, max_seq_length: int) -> None:
    if prompt_length == 0:
        raise ValueError("The prompt is empty: give at least one token.")
    if prompt_length + max_new_tokens > max_seq_length:
        raise ValueError(
            f"The prompt ({prompt_length} tokens) plus {max_new_tokens} new tokens exceeds the model's context of"
            f" {max_seq_length} tokens. Shorten the prompt, ask for fewer tokens, or pass --truncate to drop the"
            " beginning of the prompt."
        )


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yields new tokens one at a time (as (B, 1) tensors) for a (B, T) prompt, decoding with the KV cache."""
    B, T = prompt.shape
    check_length(T, max_new_tokens, model.max_seq_length)
    if max_new_tokens <= 0:
        return
    model.set_kv_cache(batch_size=B, max_seq_length=T + max_new_tokens)
    try:
        logits = model(prompt, input_pos=torch.arange(T, device=prompt.device), only_last=True)[:, -1]
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            yield token
            if eos_id is not None and bool((token == eos_id).all()) or step == max_new_tokens - 1:
                return
            logits = model(token, input_pos=torch.tensor([T + step], device=prompt.device))[:, -1]
    finally:
        model.clear_kv_cache()


def prepare_prompt(tokenizer, prompt: str, max_new_tokens: int, max_seq_length: int, truncate: bool = False):
    """Token ids (1, T) of a prompt, checked (or, with `truncate`, cut from the left) to leave room for the reply."""
    if not prompt:
        raise ValueError("The prompt is empty: give at least one character of text.")
    ids = tokenizer.encode(prompt)
    room = max_seq_length - max_new_tokens
    if truncate and room <= 0:
        raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of"
                         f" {max_seq_length} tokens: ask for fewer new tokens.")
    if truncate and ids.numel() > room > 0:
        warnings.warn(f"Keeping the last {room} of the prompt's {ids.numel()} tokens to fit the context.", stacklevel=2)
        ids = ids[-room:]
    check_length(ids.numel(), max_new_tokens, max_seq_length)
    return ids.unsqueeze(0)


def first_stop(text: str, stop: list[str]) -> int | None:
    """Where the earliest of the stop strings starts in `text`, or None where none occurs."""
    hits = [text.index(s) for s in stop if s in text]
    return min(hits) if hits else None


def stream_text(model: GPT, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int, stop: list[str] | None = None,
                counts: dict | None = None, **kwargs) -> Iterator[str]:
    """Pieces of the completion as they are decoded, ending at EOS or before the first stop string. A piece is held
    back while it could still be the start of a stop string or of a multi-byte character. `counts["tokens"]` is set
    to the number of tokens the model generated (an EOS included)."""
    stop = [s for s in (stop or []) if s]
    new: list[int] = []
    emitted = 0
    counts = {} if counts is None else counts
    counts["tokens"] = 0
    for token in generate(model, prompt_ids, max_new_tokens, eos_id=tokenizer.eos_id, **kwargs):
        counts["tokens"] += 1
        if int(token[0]) == tokenizer.eos_id:
            break
        new.append(int(token[0]))
        text = tokenizer.decode(new)
        end = first_stop(text, stop)
        if end is not None:
            yield text[emitted:end]
            return
        safe = len(text) - max([len(s) - 1 for s in stop] + [0])
        safe = min(safe, len(text.rstrip("\ufffd")))
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(new)
    if len(text) > emitted:
        yield text[emitted:]


def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, stop: list[str] | None = None,
                  truncate: bool = False, **kwargs) -> str:
    """The completion of a text prompt, stopped at EOS or at the first stop string (excluded)."""
    ids = prepare_prompt(tokenizer, prompt, max_new_tokens, model.max_seq_length, truncate)
    return "".join(stream_text(model, tokenizer, ids.to(model.lm_head.weight.device), max_new_tokens, stop, **kwargs))


@torch.inference_mode()
def generate_texts(model: GPT, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int,
                   stop: list[str] | None = None, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float = 1.0, generator: torch.Generator | None = None) -> list[str]:
    """The completions of several prompts (token ids (T,) each, checked to fit with their new tokens) decoded as one
    left-padded batch: each row's real tokens are numbered from 0 and never see the padding, so a row's greedy
    completion is the one it has alone (`stream_text`'s: ended at EOS or before the first stop string). Decoding ends
    when every row has ended."""
    stop = [s for s in (stop or []) if s]
    for ids in prompts:
        check_length(ids.numel(), max_new_tokens, model.max_seq_length)
    device = model.lm_head.weight.device
    B, T = len(prompts), max(ids.numel() for ids in prompts)
    lengths = torch.tensor([ids.numel() for ids in prompts], device=device)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    idx = torch.full((B, T), pad, dtype=torch.long, device=device)
    real = torch.ones((B, T + max_new_tokens), dtype=torch.bool, device=device)  # keys a row may attend to
    for row, ids in enumerate(prompts):
        idx[row, T - ids.numel() :] = ids.to(device)
        real[row, : T - ids.numel()] = False
    slots = torch.arange(T, device=device)
    positions = (slots - (T - lengths)[:, None]).clamp(min=0)  # (B, T): each row's real tokens from 0
    mask = real[:, None, None, :T] | torch.eye(T, dtype=torch.bool, device=device)  # (B, 1, T, T); padding sees itself
    new: list[list[int]] = [[] for _ in range(B)]
    texts: list[str | None] = [None] * B
    model.set_kv_cache(batch_size=B, max_seq_length=T + max_new_tokens)
    try:
        logits = model(idx, input_pos=slots, mask=mask, position_ids=positions, only_last=True)[:, -1]
        for step in range(max_new_tokens):
            tokens = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            for row in range(B):
                if texts[row] is not None:
                    continue
                token = int(tokens[row])
                if token == tokenizer.eos_id:
                    texts[row] = tokenizer.decode(new[row])
                    continue
                new[row].append(token)
                text = tokenizer.decode(new[row])
                end = first_stop(text, stop)
                if end is not None:
                    texts[row] = text[:end]
            if all(t is not None for t in texts) or step == max_new_tokens - 1:
                break
            slot = T + step
            logits = model(tokens, input_pos=torch.tensor([slot], device=device),
                           mask=real[:, None, None, : slot + 1], position_ids=lengths[:, None] + step)[:, -1]
    finally:
        model.clear_kv_cache()
    return [tokenizer.decode(n) if t is None else t for t, n in zip(texts, new)]
