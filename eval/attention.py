"""Look inside the attention: per-layer and per-head entropy and spikiness, the query and value temperatures against
position, selective attention's mask F, and attention maps; for one checkpoint or two side by side (vanilla vs SSA).

    python eval/attention.py --checkpoint_dir out/demo-ssa/final --compare_dir out/demo/final --max_tokens 256

Writes attention.json, attention_stats.png, temperatures.png, selective_mask.png and attention_maps.png (the
temperatures and the mask where the model has them) to the output folder.
"""

import json
from pathlib import Path

import torch

from lit_gpt.analysis import learned_slopes, recording_attention
from lit_gpt.config import Config
from lit_gpt.data.prepare import BUNDLED_WIKI, read_text
from lit_gpt.generation import load_for_inference
from lit_gpt.plots import save_figure
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import check_output_files, check_writable, eval_output, resolve_device, run_cli, write_file

TEMPERATURES = ("query_temperature", "value_temperature")


def check_same_tokens(folders: list[Path], text: str, max_tokens: int) -> None:
    """The two checkpoints read the text as the same tokens, or their maps would set unrelated tokens side by side
    (two tokenizers of one vocabulary size once passed silently)."""
    if len(folders) < 2:
        return
    first, second = (Tokenizer(folder).encode(text)[:max_tokens] for folder in folders)
    if not torch.equal(first, second):
        n = min(len(first), len(second))
        at = next((i for i in range(n) if first[i] != second[i]), n)
        raise ValueError(f"--compare_dir {folders[1]} reads the text as other tokens than --checkpoint_dir"
                         f" {folders[0]} (from token {at} on): its maps would show unrelated tokens beside the"
                         " first's; compare checkpoints that share a tokenizer.")


@torch.inference_mode()
def analyze(checkpoint_dir: Path, text: str, max_tokens: int, device: str) -> dict:
    """Attention statistics of one checkpoint on one text, and the raw maps and temperatures for plotting."""
    model, tokenizer = load_for_inference(checkpoint_dir, device)
    ids = tokenizer.encode(text)[: min(max_tokens, model.max_seq_length)].unsqueeze(0).to(device)
    if ids.size(1) < 2:
        raise ValueError(f"The text gives {ids.size(1)} token(s); entropy over the keys a query sees needs at least"
                         " 2: give a longer --text_file.")
    with recording_attention(model) as details:
        model(ids)
    slopes = learned_slopes(model)
    T = ids.size(1)
    keys_seen = torch.arange(1, T + 1, device=device, dtype=torch.float32)  # query i sees i + 1 keys
    layers = []
    for layer in details:
        probs = layer["attention"][0].float()  # (nh, T, T)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (nh, T)
        normalized = entropy[:, 1:] / keys_seen[1:].log()  # 0 = one key, 1 = uniform over the visible keys
        stats = dict(entropy=entropy.mean(-1).tolist(), normalized_entropy=normalized.mean(-1).tolist(),
                     spikiness=probs.max(-1).values.mean(-1).tolist())
        for name in TEMPERATURES:
            tau = layer[name]
            stats[name] = None if tau is None else tau[0].float().mean(0).tolist()  # mean over heads, per position
        stats.update(what_temperatures_learned(layer, slopes[len(layers)], keys_seen))
        if layer["selective_mask"] is not None:
            stats["selective_mask"] = selective_summary(layer["selective_mask"][0].float())
        layers.append(stats)
    masks = [d["selective_mask"][0].float().cpu() for d in details if d["selective_mask"] is not None]
    return dict(checkpoint=str(checkpoint_dir), attention_temperature=model.config.attention_temperature,
                attention_gate=model.config.attention_gate, selective_mask=model.config.selective_mask,
                tokens=T, layers=layers, maps=[d["attention"][0].float().cpu() for d in details], masks=masks)


def selective_summary(f: torch.Tensor) -> dict:
    """What selective attention's F (T, T) subtracts from the logits, over the (query, key) pairs a query sees:
    its mean and largest value, and the share of pairs it lowers by more than 1 (a factor e in probability)."""
    visible = torch.ones_like(f, dtype=torch.bool).tril()
    values = f[visible]
    return dict(mean=values.mean().item(), max=values.max().item(), share_above_1=(values > 1).float().mean().item())


def what_temperatures_learned(layer: dict, slopes: dict, keys_seen: torch.Tensor) -> dict:
    """SSA's learned position slope per head (min, median, max) and how much its token term varies over tokens (the
    standard deviation over the text's tokens, min / median / max over heads), per side."""
    out = {}
    for side in ("query", "key", "value"):
        tau = layer.get(f"{side}_temperature")
        if side in slopes:
            s = slopes[side]
            out[f"{side}_slopes"] = dict(per_head=s.tolist(), min=s.min().item(), median=s.median().item(),
                                         max=s.max().item())
        if tau is not None:
            position = 1 + slopes[side][:, None] * keys_seen.log().cpu() if side in slopes else 1.0  # (heads, T)
            spread = (tau[0].float().cpu() - position).std(-1)  # (heads,): the token term's spread over tokens
            out[f"{side}_token_term_std"] = dict(min=spread.min().item(), median=spread.median().item(),
                                                 max=spread.max().item())
    return out


def print_learned(result: dict) -> None:
    """One row per layer and side: the learned slopes and the token term's spread."""
    print(f"{result['checkpoint']}: what the temperatures learned")
    print(f"{'layer':>5} {'side':>6} {'slope min / median / max':>28} {'token term std over tokens (median head)':>42}")
    for i, layer in enumerate(result["layers"]):
        for side in ("query", "key", "value"):
            slopes, spread = layer.get(f"{side}_slopes"), layer.get(f"{side}_token_term_std")
            if slopes is None and spread is None:
                continue
            slope_text = "-" if slopes is None else " / ".join(f"{slopes[k]:.4f}" for k in ("min", "median", "max"))
            spread_text = "-" if spread is None else f"{spread['median']:.4f}"
            print(f"{i:>5} {side:>6} {slope_text:>28} {spread_text:>42}")


def plot_stats(results: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        label = f"{Path(result['checkpoint']).parent.name or result['checkpoint']} ({result['attention_temperature']})"
        for ax, key in zip(axes, ("normalized_entropy", "spikiness")):
            per_layer = [sum(layer[key]) / len(layer[key]) for layer in result["layers"]]
            ax.plot(range(len(per_layer)), per_layer, "o-", label=label)
            ax.set_xlabel("layer")
            ax.set_ylabel(key.replace("_", " ") + " (mean over heads)")
    axes[0].set_title("attention entropy / log(keys seen)")
    axes[1].set_title("spikiness: mean peak probability")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_temperatures(results: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = [(r, name) for r in results for name in TEMPERATURES if r["layers"][0][name] is not None]
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 4), squeeze=False)
    for ax, (result, name) in zip(axes[0], rows):
        for i, layer in enumerate(result["layers"]):
            ax.plot(range(1, len(layer[name]) + 1), layer[name], label=f"layer {i}")
        ax.set_xscale("log")
        ax.set_xlabel("position n (log scale)")
        ax.set_ylabel(name.replace("_", " ") + " (mean over heads)")
        ax.set_title(f"{Path(result['checkpoint']).parent.name}: {name.split('_')[0]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def plot_maps(results: list[dict], path: Path, head: int) -> None:
    import matplotlib.pyplot as plt

    n_layers = len(results[0]["maps"])
    chosen = sorted({0, n_layers // 2, n_layers - 1})
    fig, axes = plt.subplots(len(results), len(chosen), figsize=(3.6 * len(chosen), 3.4 * len(results)), squeeze=False)
    for row, result in enumerate(results):
        for col, layer in enumerate(chosen):
            probs = result["maps"][layer][head]
            axes[row][col].imshow(probs.clamp_min(1e-4).log10(), cmap="viridis", vmin=-4, vmax=0)
            axes[row][col].set_title(f"{Path(result['checkpoint']).parent.name}: layer {layer}, head {head}",
                                     fontsize=8)
            axes[row][col].set_xlabel("key")
            axes[row][col].set_ylabel("query")
    fig.suptitle("attention probabilities (log10)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_selective(results: list[dict], path: Path) -> bool:
    """F of selective attention for the first, middle and last layer of each checkpoint that has it."""
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["masks"]]
    if not rows:
        return False
    chosen = sorted({0, len(rows[0]["masks"]) // 2, len(rows[0]["masks"]) - 1})
    fig, axes = plt.subplots(len(rows), len(chosen), figsize=(3.6 * len(chosen), 3.4 * len(rows)), squeeze=False)
    for row, result in enumerate(rows):
        for col, layer in enumerate(chosen):
            image = axes[row][col].imshow(result["masks"][layer], cmap="magma")
            fig.colorbar(image, ax=axes[row][col], fraction=0.046)
            axes[row][col].set_title(f"{Path(result['checkpoint']).parent.name}: F, layer {layer}", fontsize=8)
            axes[row][col].set_xlabel("key")
            axes[row][col].set_ylabel("query")
    fig.suptitle("selective attention: what F subtracts from every head's logits")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def main(
    checkpoint_dir: Path,
    compare_dir: Path | None = None,
    text_file: Path | None = None,
    max_tokens: int = 256,
    head: int = 0,
    output_dir: Path | None = None,
    device: str | None = None,
) -> list[dict]:
    """Attention entropy, spikiness, temperatures and maps.

    Args:
        checkpoint_dir: a checkpoint folder.
        compare_dir: a second checkpoint to show beside the first, usually its vanilla baseline (they should share a
            tokenizer).
        text_file: the text to read; default the start of the bundled Wikipedia sample.
        max_tokens: how many tokens of it.
        head: the head whose maps are drawn.
        output_dir: default out/eval/<checkpoint>/attention (a run's final/ as <run>-final), never inside the
            checkpoint.
        device: cpu or cuda; default cuda when available.
    """
    import matplotlib

    matplotlib.use("Agg")
    if max_tokens < 2:
        raise ValueError(f"--max_tokens must be at least 2 (entropy over one key is undefined), got {max_tokens}.")
    folders = [Path(d) for d in [checkpoint_dir, compare_dir] if d is not None]
    for folder in folders:
        n_head = Config.from_file(folder).n_head
        if not 0 <= head < n_head:
            raise ValueError(f"--head {head} does not exist in {str(folder)!r}, whose layers have {n_head} heads"
                             f" (0 to {n_head - 1}).")
    output_dir = Path(output_dir) if output_dir is not None else eval_output(checkpoint_dir, "attention")
    check_writable(output_dir, "--output_dir", is_dir=True)
    outputs = ("attention.json", "attention_stats.png", "attention_maps.png", "temperatures.png", "selective_mask.png")
    inputs = [checkpoint_dir, compare_dir, text_file]
    check_output_files([output_dir / name for name in outputs], "--output_dir", inputs)
    if text_file is not None and not Path(text_file).is_file():
        raise FileNotFoundError(f"--text_file {text_file}: expected a text file there, found nothing.")
    device = resolve_device(device)
    text = read_text(Path(text_file)) if text_file is not None else read_text(BUNDLED_WIKI)[20000:]
    check_same_tokens(folders, text, max_tokens)
    results = [analyze(folder, text, max_tokens, device) for folder in folders]
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_stats(results, output_dir / "attention_stats.png")
    plot_maps(results, output_dir / "attention_maps.png", head)
    written = ["attention.json", "attention_stats.png", "attention_maps.png"]
    if plot_temperatures(results, output_dir / "temperatures.png"):
        written.append("temperatures.png")
    if plot_selective(results, output_dir / "selective_mask.png"):
        written.append("selective_mask.png")
    summary = [{k: v for k, v in r.items() if k not in ("maps", "masks")} for r in results]
    write_file(output_dir / "attention.json", json.dumps(summary, indent=1))
    for r in summary:
        entropy = [sum(layer["normalized_entropy"]) / len(layer["normalized_entropy"]) for layer in r["layers"]]
        print(f"{r['checkpoint']} ({r['attention_temperature']}): normalized entropy per layer"
              f" {', '.join(f'{e:.3f}' for e in entropy)}")
        if any(k.endswith(("_slopes", "_token_term_std")) for layer in r["layers"] for k in layer):
            print_learned(r)
        for i, layer in enumerate(r["layers"]):
            if "selective_mask" in layer:
                f = layer["selective_mask"]
                print(f"layer {i}: selective mask F mean {f['mean']:.3f}, max {f['max']:.3f},"
                      f" {f['share_above_1']:.1%} of visible pairs lowered by more than 1")
    print(f"Wrote {', '.join(written)} to {output_dir}")
    return summary


if __name__ == "__main__":
    run_cli(main)
