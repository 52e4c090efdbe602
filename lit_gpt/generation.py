"""Sampling and KV-cache decoding, shared by generate/, eval/ and the tests."""

from collections.abc import Iterator

import torch

from lit_gpt.model import GPT


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


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token from the last position's logits (B, vocab); temperature 0 is greedy."""
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
        logits = model(prompt, input_pos=torch.arange(T, device=prompt.device))[:, -1]
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            yield token
            if eos_id is not None and bool((token == eos_id).all()) or step == max_new_tokens - 1:
                return
            logits = model(token, input_pos=torch.tensor([T + step], device=prompt.device))[:, -1]
    finally:
        model.clear_kv_cache()


def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, stop: list[str] | None = None,
                  **kwargs) -> str:
    """The completion of a text prompt, stopped at EOS or at the first stop string (excluded)."""
    ids = tokenizer.encode(prompt).unsqueeze(0).to(model.lm_head.weight.device)
    new: list[int] = []
    text = ""
    for token in generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_id, **kwargs):
        if int(token) == tokenizer.eos_id:
            break
        new.append(int(token))
        text = tokenizer.decode(new)
        if stop and any(s in text for s in stop):
            return text[: min(text.index(s) for s in stop if s in text)]
    return text
