"""What the analysis tools read out of a model: the attention maps and temperatures of every layer (through the
explicit attention path, which equals the fused one) and SSA's learned position slopes."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lit_gpt.model import GPT, SSATemperature, slope_and_derivative


@contextmanager
def recording_attention(model: GPT) -> Iterator[list[dict]]:
    """Within the block every attention layer runs the explicit path and appends a dict with its attention
    probabilities (B, nh, T, S) and temperatures (B or 1, heads, T) to the yielded list, one per layer and pass."""
    records: list[dict] = []
    layers = [block.attn for block in model.transformer.h]
    for attn in layers:
        attn.records = records
    try:
        yield records
    finally:
        for attn in layers:
            attn.records = None


@torch.no_grad()
def learned_slopes(model: GPT) -> list[dict[str, torch.Tensor]]:
    """SSA's position slope per head, for each layer: {side: (heads,)} for the sides that have a position term."""
    layers = []
    for block in model.transformer.h:
        sides = {}
        for side in ("query", "key", "value"):
            temperature = getattr(block.attn, f"{side}_temperature")
            if isinstance(temperature, SSATemperature) and temperature.position_param is not None:
                param = temperature.position_param.float()
                sides[side] = slope_and_derivative(param, temperature.config.ssa_slope_form)[0].cpu()
        layers.append(sides)
    return layers
