"""Parameters each attention addition adds to the presets, counted on the meta device (exact on every machine).

    python benchmarks/parameters.py
"""

import torch
from common import header, table

from lit_gpt import GPT, Config

MODELS = ("gpt2", "pythia-160m", "SmolLM2-135M", "Llama-3-8B")
ADDITIONS = {
    "SSA, shared (default)": dict(attention_temperature="ssa"),
    "SSA, separate": dict(attention_temperature="ssa", ssa_token_weights="separate"),
    "ssa_position": dict(attention_temperature="ssa_position"),
    "gate, headwise": dict(attention_gate="headwise"),
    "gate, elementwise": dict(attention_gate="elementwise"),
    "selective attention": dict(selective_mask="leviathan"),
}


def added(name: str, fields: dict) -> tuple[int, int]:
    with torch.device("meta"):
        model = GPT(Config.from_name(name, **fields))
    extra = sum(p.numel() for p in model.added_parameters())
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return total - extra, extra


def main() -> None:
    print(header("Parameters added to the attention"))
    rows = []
    for name in MODELS:
        base = added(name, {})[0]
        cells = [f"{n:,} ({n / base:.3%})" if n else "0" for n in (added(name, f)[1] for f in ADDITIONS.values())]
        rows.append([name, f"{base:,}", *cells])
    print(table(["model", "parameters", *ADDITIONS], rows))


if __name__ == "__main__":
    main()
