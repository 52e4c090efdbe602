"""Does SSA help? One command that measures it at small scale, with at least three seeds per arm.

    python scripts/reproduce.py                 # the grid of configs/reproduce.yaml, about an hour on 2 CPU cores
    python scripts/reproduce.py --quick         # a reduced grid in a few minutes (the test suite runs it)

Three experiments, each against its baselines:
1. pretraining the same small model on the bundled corpus with an equal token budget per arm: vanilla, SSA and its
   ablations, and the log-n, Scalable-Softmax and learned-constant baselines (validation perplexity);
2. passkey retrieval by small models trained on a mix of the corpus and synthetic passkey documents, vanilla vs SSA
   (accuracy per context length);
3. the value-selectivity toy: average the relevant tokens of a sequence and ignore the noisy ones (error of the naive
   average, vanilla attention and attention with a value temperature).

Every run goes through the real entry point (pretrain/openwebtext.py). Finished runs are kept and skipped when the
command runs again. Writes results.md, results.json, loss_curves.png and passkey.png to --out_dir.
"""

import json
import math
import os
import random
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lit_gpt.config import Config
from lit_gpt.data.prepare import BUNDLED_CORPUS, prepare, read_text, split_documents
from lit_gpt.evaluation import passkey_prompt
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import num_parameters, run_cli

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "pretrain" / "openwebtext.py"
PASSKEY = ROOT / "eval" / "passkey.py"


def load_grid(path: Path, quick: bool) -> dict:
    grid = yaml.safe_load(Path(path).read_text())
    if quick:
        overrides = grid["quick"]
        for key, value in overrides.items():
            if key == "arms":
                grid["arms"] = {arm: grid["arms"][arm] for arm in value}
            elif isinstance(value, dict):
                grid[key] = {**grid[key], **value}
            else:
                grid[key] = value
    return grid


def flags(prefix: str, values: dict) -> list[str]:
    return [item for key, value in values.items()
            for item in (f"--{prefix}{key}", "null" if value is None else json.dumps(value).strip('"'))]


def run(command: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def pretrain(out_dir: Path, model: dict, data_dir: Path, seed: int, train: dict, eval_args: dict,
             threads: int) -> None:
    """One run of the real entry point, skipped when it already finished (resumed when it was cut short)."""
    if (out_dir / "history.json").is_file():
        return
    command = [str(PRETRAIN), "--model_name", model["name"], *flags("model.", model["fields"]), "--data.dir",
               str(data_dir), "--out_dir", str(out_dir), "--seed", str(seed), *flags("train.", train),
               *flags("eval.", eval_args)]
    run(command + (["--resume", "auto"] if out_dir.exists() else []), threads)


def outcome(out_dir: Path) -> dict:
    history = json.loads((out_dir / "history.json").read_text())
    with torch.device("meta"):
        params = num_parameters(GPT(Config.from_file(out_dir / "final")))
    return {"history": history, "parameters": params}


def in_parallel(jobs: list, workers: int) -> None:
    """Run the jobs (callables taking a thread count) `workers` at a time, sharing the cores between them."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(job, threads) for job in jobs]):
            future.result()


def language_modelling(grid: dict, out_dir: Path, data_dir: Path, workers: int) -> dict:
    """Validation loss of every arm and seed, the same token budget for all."""
    runs = {(arm, seed): out_dir / "pretrain" / arm / f"seed-{seed}" for arm in grid["arms"] for seed in grid["seeds"]}

    def job(arm, seed, folder):
        model = {"name": grid["model"]["name"], "fields": {**grid["model"]["overrides"], **grid["arms"][arm]}}
        return lambda threads: pretrain(folder, model, data_dir, seed, grid["train"], grid["eval"], threads)

    in_parallel([job(arm, seed, folder) for (arm, seed), folder in runs.items()], workers)
    results = {}
    for (arm, seed), folder in runs.items():
        results.setdefault(arm, []).append(outcome(folder))
        print(f"  {arm}, seed {seed}: validation loss {final_val_loss(results[arm][-1]):.4f}", flush=True)
    return results


def passkey_documents(tokenizer: Tokenizer, count: int, block_size: int, corpus_share: float, seed: int) -> list:
    """Synthetic passkey documents (the standard prompt followed by its answer) mixed with corpus documents."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        key = rng.randint(10000, 99999)
        length = rng.randint(48, block_size - 16)
        documents.append(f"{passkey_prompt(tokenizer, length, rng.random(), key)} {key}.")
    corpus = [d for path in BUNDLED_CORPUS for d in split_documents(read_text(path), size=1000)]
    documents += rng.sample(corpus, min(len(corpus), round(count * corpus_share / (1 - corpus_share))))
    rng.shuffle(documents)
    return documents


def passkey(grid: dict, out_dir: Path, data_dir: Path, workers: int) -> dict:
    settings = grid["passkey"]
    mix_dir = out_dir / "data" / "passkey-mix"
    if not (mix_dir / "meta.json").is_file():
        documents = passkey_documents(Tokenizer(data_dir), settings["documents"], settings["block_size"],
                                      settings["corpus_share"], seed=0)
        source = out_dir / "data" / "passkey-mix.jsonl"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("\n".join(json.dumps({"text": d}) for d in documents))
        prepare(str(source), mix_dir, tokenizer_dir=data_dir, val_fraction=0.02, overwrite=True)
    train = {**grid["train"], "max_steps": settings["max_steps"]}
    runs = {(arm, seed): out_dir / "passkey" / arm / f"seed-{seed}"
            for arm in settings["arms"] for seed in grid["seeds"]}

    def job(arm, seed, folder):
        fields = {**grid["model"]["overrides"], **grid["arms"][arm], "block_size": settings["block_size"]}

        def train_and_evaluate(threads):
            pretrain(folder, {"name": grid["model"]["name"], "fields": fields}, mix_dir, seed, train, grid["eval"],
                     threads)
            if not (folder / "passkey" / "passkey.json").is_file():
                run([str(PASSKEY), "--checkpoint_dir", str(folder / "final"), "--output_dir", str(folder / "passkey"),
                     "--lengths", json.dumps(settings["lengths"]), "--depths", json.dumps(settings["depths"]),
                     "--trials", str(settings["trials"]), "--seed", str(1000 * seed)], threads)

        return train_and_evaluate

    in_parallel([job(arm, seed, folder) for (arm, seed), folder in runs.items()], workers)
    results = {}
    for (arm, seed), folder in runs.items():
        results.setdefault(arm, []).append(json.loads((folder / "passkey" / "passkey.json").read_text()))
        print(f"  passkey {arm}, seed {seed}: {results[arm][-1]['per_length']}", flush=True)
    return results


class ToyAttention(torch.nn.Module):
    """One attention head reading a sequence with a learned query; optionally a value temperature
    tau_j = 1 + tanh(u . gelu(v_j)) that scales each value token (SSA's value temperature, token term)."""

    def __init__(self, dim: int, value_temperature: bool) -> None:
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(dim) * 0.1)
        self.key, self.value = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.u = torch.nn.Parameter(torch.zeros(dim)) if value_temperature else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = (self.key(x) @ self.query / math.sqrt(x.size(-1))).softmax(-1)  # (B, T)
        v = self.value(x)
        if self.u is not None:
            v = v * (1 + torch.tanh(F.gelu(v) @ self.u)).unsqueeze(-1)
        return (probs.unsqueeze(-1) * v).sum(1)


def toy_batch(n: int, settings: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevant tokens are one signal plus small noise; the others are pure noise of a larger scale. The target is
    the mean of the relevant tokens."""
    T, d = settings["tokens"], settings["dim"]
    signal = torch.randn(n, 1, d, generator=generator)
    relevant = torch.rand(n, T, generator=generator) >= settings["noise_share"]
    relevant[:, 0] = True
    clean = signal + 0.1 * torch.randn(n, T, d, generator=generator)
    noise = settings["noise_scale"] * torch.randn(n, T, d, generator=generator)
    x = torch.where(relevant.unsqueeze(-1), clean, noise)
    target = (x * relevant.unsqueeze(-1)).sum(1) / relevant.sum(1, keepdim=True)
    return x, target


def value_selectivity(grid: dict) -> dict:
    settings, results = grid["toy"], {"naive average": [], "vanilla attention": [], "value temperature": []}
    for seed in grid["seeds"]:
        test_x, test_y = toy_batch(settings["test_sequences"], settings, torch.Generator().manual_seed(10_000 + seed))
        scale = test_y.var().item()
        results["naive average"].append(F.mse_loss(test_x.mean(1), test_y).item() / scale)
        for name, value_temperature in (("vanilla attention", False), ("value temperature", True)):
            torch.manual_seed(seed)
            model = ToyAttention(settings["dim"], value_temperature)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            generator = torch.Generator().manual_seed(seed)
            for _ in range(settings["steps"]):
                x, y = toy_batch(256, settings, generator)
                loss = F.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                results[name].append(F.mse_loss(model(test_x), test_y).item() / scale)
    for name, errors in results.items():
        print(f"  toy, {name}: normalised error {mean_std(errors)}", flush=True)
    return results


def mean_std(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def final_val_loss(run: dict) -> float:
    return [h["val_loss"] for h in run["history"] if "val_loss" in h][-1]


def report(grid: dict, lm: dict, keys: dict, toy: dict, out_dir: Path, quick: bool) -> str:
    base = lm["vanilla"][0]["parameters"] if "vanilla" in lm else None
    tokens = lm[next(iter(lm))][0]["history"][-1]["tokens"]
    lines = [f"Grid: configs/reproduce.yaml{' (--quick)' if quick else ''}; seeds {grid['seeds']}; model"
             f" `{grid['model']['name']}` with {grid['model']['overrides']}; {tokens:,} training tokens per run.", "",
             "**Pretraining on the bundled corpus (validation, mean ± std over seeds)**", "",
             "| arm | validation loss | validation perplexity | parameters added |", "| --- | ---: | ---: | ---: |"]
    for arm, runs in lm.items():
        losses = [final_val_loss(r) for r in runs]
        added = runs[0]["parameters"] - base if base is not None else float("nan")
        lines.append(f"| {arm} | {mean_std(losses, 4)} | {mean_std([math.exp(v) for v in losses], 2)} | {added:,} |")
    lengths = grid["passkey"]["lengths"]
    lines += ["", "**Passkey retrieval after training on the passkey mix (accuracy, mean ± std over seeds)**", "",
              "| arm | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
              "| --- |" + " ---: |" * len(lengths)]
    for arm, runs in keys.items():
        cells = [mean_std([r["per_length"][str(n)] for r in runs], 2) for n in lengths]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "**Value selectivity toy (test error / target variance, mean ± std over seeds)**", "",
              "| method | normalised error |", "| --- | ---: |"]
    lines += [f"| {name} | {mean_std(errors)} |" for name, errors in toy.items()]
    return "\n".join(lines) + "\n"


def plot(lm: dict, keys: dict, grid: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, runs in lm.items():
        points = [[(h["tokens"], h["val_loss"]) for h in r["history"] if "val_loss" in h] for r in runs]
        tokens = [t for t, _ in points[0]]
        mean = [statistics.mean(p[i][1] for p in points) for i in range(len(tokens))]
        ax.plot(tokens, mean, "o-", markersize=3, label=arm)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title("pretraining on the bundled corpus")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = grid["passkey"]["lengths"]
    for arm, runs in keys.items():
        means = [statistics.mean(r["per_length"][str(n)] for r in runs) for n in lengths]
        ax.plot(lengths, means, "o-", label=arm)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy (mean over seeds)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "passkey.png", dpi=120)
    plt.close(fig)


def check_same_grid(out_dir: Path, grid: dict) -> None:
    """Finished runs are reused, so an output folder may only ever hold one grid's runs."""
    def settings(g: dict) -> dict:  # what decides a run's result: more seeds or arms, or other workers, are fine
        return {key: value for key, value in g.items() if key not in ("seeds", "workers", "arms")}

    record, grid = out_dir / "grid.json", json.loads(json.dumps(grid))
    if record.is_file():
        old = json.loads(record.read_text())
        changed = [a for a in set(old["arms"]) & set(grid["arms"]) if old["arms"][a] != grid["arms"][a]]
        if settings(old) != settings(grid) or changed:
            raise ValueError(f"{out_dir} holds the runs of a different grid (see {record}); pass another --out_dir "
                             f"or delete that folder")
        grid["arms"] = {**old["arms"], **grid["arms"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(grid, indent=2))


def main(grid: Path = ROOT / "configs" / "reproduce.yaml", out_dir: Path | None = None, quick: bool = False,
         data_dir: Path | None = None) -> str:
    """Run the grid and write the report.

    Args:
        grid: the YAML of the grid (configs/reproduce.yaml).
        out_dir: runs, results.md, results.json and the plots go here; finished runs are reused. Default
            out/reproduce, or out/reproduce-quick with --quick.
        quick: the reduced grid of the config's `quick` section.
        data_dir: the prepared bundled corpus; default the grid's data.dir (prepared when missing).
    """
    grid = load_grid(grid, quick)
    out_dir = Path(out_dir or ("out/reproduce-quick" if quick else "out/reproduce"))
    check_same_grid(out_dir, grid)
    data_dir = Path(data_dir or grid["data"]["dir"])
    if not (data_dir / "meta.json").is_file():
        settings = grid["data"]
        prepare(settings["source"], data_dir, train_tokenizer=settings["train_tokenizer"],
                val_fraction=settings["val_fraction"])
    print("Language modelling:", flush=True)
    lm = language_modelling(grid, out_dir, data_dir, grid["workers"])
    print("Passkey retrieval:", flush=True)
    keys = passkey(grid, out_dir, data_dir, grid["workers"])
    print("Value selectivity:", flush=True)
    toy = value_selectivity(grid)
    text = report(grid, lm, keys, toy, out_dir, quick)
    (out_dir / "results.md").write_text(text)
    summary = {"language_modelling": {arm: [final_val_loss(r) for r in runs] for arm, runs in lm.items()},
               "parameters": {arm: runs[0]["parameters"] for arm, runs in lm.items()},
               "passkey": {arm: [r["per_length"] for r in runs] for arm, runs in keys.items()}, "toy": toy}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    plot(lm, keys, grid, out_dir)
    print("\n" + text)
    print(f"Wrote {out_dir}/results.md, results.json, loss_curves.png and passkey.png")
    return text


if __name__ == "__main__":
    run_cli(main)
