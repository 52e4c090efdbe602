"""Does SSA help? One command that measures it where the paper says it matters, with paired seeds.

    python study/reproduce.py                 # the grid of study/grid.yaml, about two hours on 2 CPU cores
    python study/reproduce.py --quick         # a reduced grid in a few minutes (the test suite runs it)

Four experiments (study/grid.yaml says what each runs):
1. slopes: how SSA's position slope learns under each parametrisation and learning rate (the learned slopes);
2. length: small NoPE models trained at block 128 on a retrieval mix, evaluated at 1x to 8x the training length:
   passkey exact match and answer log-likelihood per length and depth, and held-out loss by position band, for
   vanilla, SSA, Scalable-Softmax, and log-n scaling applied at inference to the vanilla checkpoints;
3. dilution: one head finds its targets among n keys, trained at n <= 64 and tested to 4,096 (two variants);
4. value: the value-selectivity toy, with a nonlinear key gate of the same size as control.

Arms share seeds: the same seed gives the same backbone initialisation and data order, so differences are paired.
Every training run goes through the real entry point (pretrain/openwebtext.py); finished runs and evaluations are
kept and reused when the command runs again. Writes results.md, results.json and plots to --out_dir.
"""

import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from lit_gpt.analysis import learned_slopes
from lit_gpt.config import Config, read_yaml
from lit_gpt.data.prepare import BUNDLED_CORPUS, prepare, read_text, split_documents
from lit_gpt.data.tokens import TokenData
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import run_cli
from study.report import learned_runs, mean_std, per_length, plot, report, verdict
from study.tasks import evaluation_cells, loss_by_position, score_answers, training_documents
from study.toys import DILUTION_ARMS, dilution_errors, oracle_errors, train_dilution, value_errors

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "pretrain" / "openwebtext.py"
SECTIONS = ("slopes", "length", "dilution", "toy")
TRAINED = ("data", "slopes", "length")  # the sections whose runs are kept and reused
EVALUATION_KEYS = ("lengths", "depths", "keys", "learned_at", "lm_windows", "bands", "inference_arms")


def load_grid(path: Path, quick: bool) -> dict:
    """The grid, with the `quick` section's values over it (a list of arms keeps only those arms)."""
    grid = read_yaml(path, "the grid (--grid)")
    missing = [key for key in ("seeds", "workers", "data", *SECTIONS) if key not in grid]
    if missing:
        raise ValueError(f"--grid {path} lacks the section(s) {missing}: start from study/grid.yaml.")
    for key, value in (grid.pop("quick") if quick else {}).items():
        if key in SECTIONS:
            for inner, inner_value in value.items():
                section = grid[key]
                if inner == "arms":
                    unknown = [arm for arm in inner_value if arm not in section["arms"]]
                    if unknown:
                        raise ValueError(f"--grid {path}: the quick section names the arm {unknown[0]!r}, which the"
                                         f" {key} section does not have (it has {', '.join(section['arms'])}).")
                    section["arms"] = {arm: section["arms"][arm] for arm in inner_value}
                elif isinstance(inner_value, dict):
                    section[inner] = {**section[inner], **inner_value}
                else:
                    section[inner] = inner_value
        else:
            grid[key] = value
    grid.pop("quick", None)
    return grid


def flags(prefix: str, values: dict) -> list[str]:
    return [item for key, value in values.items()
            for item in (f"--{prefix}{key}", "null" if value is None else json.dumps(value).strip('"'))]


def run(command: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def pretrain(out_dir: Path, model: dict, data_dir: Path, seed: int, train: dict, eval_args: dict, threads: int,
             window_start: str = "random") -> None:
    """One run of the real entry point, skipped when it already finished (resumed when it was cut short)."""
    if (out_dir / "history.json").is_file():
        return
    command = [str(PRETRAIN), "--model_name", model["name"], *flags("model.", model["fields"]), "--data.dir",
               str(data_dir), "--data.window_start", window_start, "--out_dir", str(out_dir), "--seed", str(seed),
               *flags("train.", train), *flags("eval.", eval_args)]
    run(command + (["--resume", "auto"] if out_dir.exists() else []), threads)


def in_parallel(jobs: list, workers: int) -> None:
    """Run the jobs (callables taking a thread count) `workers` at a time, sharing the cores between them."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(job, threads) for job in jobs]):
            future.result()


def final_val_loss(folder: Path) -> float:
    history = json.loads((folder / "history.json").read_text())
    return [h["val_loss"] for h in history if "val_loss" in h][-1]


def slope_summary(folder: Path) -> dict:
    """min / median / max of the learned position slopes of each side, over layers and heads, and every slope
    ("per_layer": for each layer, {side: [one per head]})."""
    slopes = learned_slopes(GPT.from_checkpoint(folder / "final"))
    summary = {"per_layer": [{side: s.tolist() for side, s in layer.items()} for layer in slopes]}
    for side in ("query", "key", "value"):
        values = torch.cat([layer[side] for layer in slopes if layer.get(side) is not None] or [torch.empty(0)])
        if values.numel():
            summary[side] = dict(min=values.min().item(), median=values.median().item(), max=values.max().item())
    return summary


def slopes_experiment(grid: dict, out_dir: Path, data_dir: Path) -> dict:
    settings = grid["slopes"]
    runs = {(arm, seed): out_dir / "slopes" / arm / f"seed-{seed}" for arm in settings["arms"]
            for seed in settings["seeds"]}

    def job(arm, seed, folder):
        fields = {**settings["model"]["overrides"], **settings["arms"][arm]["model"]}
        train = {**settings["train"], **settings["arms"][arm]["train"]}
        model = {"name": settings["model"]["name"], "fields": fields}
        return lambda threads: pretrain(folder, model, data_dir, seed, train, settings["eval"], threads)

    in_parallel([job(arm, seed, folder) for (arm, seed), folder in runs.items()], grid["workers"])
    results = {}
    for (arm, seed), folder in runs.items():
        results.setdefault(arm, []).append(dict(val_loss=final_val_loss(folder), slopes=slope_summary(folder)))
        print(f"  slopes {arm}, seed {seed}: {results[arm][-1]}", flush=True)
    return results


def retrieval_mix(grid: dict, out_dir: Path, data_dir: Path) -> Path:
    """Retrieval documents mixed with corpus documents, prepared with the bundled tokenizer."""
    settings, mix_dir = grid["length"], out_dir / "data" / "retrieval-mix"
    if (mix_dir / "meta.json").is_file():
        return mix_dir
    tokenizer = Tokenizer(data_dir)
    block = settings["model"]["overrides"]["block_size"]
    documents = training_documents(tokenizer, settings["documents"], block, seed=0)
    corpus = [d for path in BUNDLED_CORPUS for d in split_documents(read_text(path), size=1000)]
    count = round(len(documents) * settings["corpus_share"] / (1 - settings["corpus_share"]))
    documents += [corpus[i] for i in torch.randperm(len(corpus), generator=torch.Generator().manual_seed(0))[:count]]
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(1)).tolist()
    source = out_dir / "data" / "retrieval-mix.jsonl"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("\n".join(json.dumps({"text": documents[i]}) for i in order))
    prepare(str(source), mix_dir, tokenizer_dir=data_dir, val_fraction=0.02, overwrite=True)
    return mix_dir


def evaluate_length(folder: Path, settings: dict, data_dir: Path, fields: dict | None = None) -> dict:
    """Passkey cells and the loss by position band of one checkpoint (with `fields` over its config: an inference
    arm), computed once and kept in the run folder."""
    what = {k: settings[k] for k in EVALUATION_KEYS if k != "inference_arms"} | {"fields": fields}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    record = folder / f"evaluation-{digest}.json"  # a change of evaluation settings evaluates again
    if record.is_file():
        return json.loads(record.read_text())
    checkpoint = folder / "final"
    config = Config.from_file(checkpoint, **(fields or {}))
    model = GPT.from_checkpoint(checkpoint, config=config).eval()
    tokenizer = Tokenizer(checkpoint)
    cells = []
    for cell in evaluation_cells(tokenizer, settings["lengths"], settings["depths"], settings["keys"], seed=0):
        scores = score_answers(model, cell["examples"])
        cells.append(dict(length=cell["length"], depth=cell["depth"],
                          exact=sum(s["exact"] for s in scores) / len(scores),
                          log_likelihood=sum(s["log_likelihood"] for s in scores) / len(scores)))
    held_out = TokenData(data_dir).val
    bands = loss_by_position(model, held_out, settings["bands"][-1], settings["lm_windows"], settings["bands"])
    result = dict(cells=cells, bands=bands)
    record.write_text(json.dumps(result, indent=2))
    return result


def length_experiment(grid: dict, out_dir: Path, data_dir: Path) -> dict:
    settings = grid["length"]
    mix_dir = retrieval_mix(grid, out_dir, data_dir)
    runs = {(arm, seed): out_dir / "length" / arm / f"seed-{seed}" for arm in settings["arms"]
            for seed in grid["seeds"]}

    def job(arm, seed, folder):
        fields = {**settings["model"]["overrides"], **settings["arms"][arm]}
        model = {"name": settings["model"]["name"], "fields": fields}

        def train_and_evaluate(threads):
            pretrain(folder, model, mix_dir, seed, settings["train"], settings["eval"], threads, "document")
            torch.set_num_threads(threads)
            evaluate_length(folder, settings, data_dir)

        return train_and_evaluate

    in_parallel([job(arm, seed, folder) for (arm, seed), folder in runs.items()], grid["workers"])
    results = {arm: [] for arm in [*settings["arms"], *settings.get("inference_arms", {})]}
    for (arm, seed), folder in runs.items():
        results[arm].append(dict(seed=seed, **evaluate_length(folder, settings, data_dir),
                                 slopes=slope_summary(folder) if arm == "ssa" else None))
    for arm, spec in settings.get("inference_arms", {}).items():
        for seed in grid["seeds"]:
            folder = runs[spec["of"], seed]
            results[arm].append(dict(seed=seed, **evaluate_length(folder, settings, data_dir, spec["fields"])))
    for arm, rows in results.items():
        print(f"  length {arm}: " + "; ".join(f"seed {r['seed']} {per_length(r, 'exact')}" for r in rows), flush=True)
    return results


def cached(out_dir: Path, name: str, settings: dict, compute) -> dict:
    """compute() once per settings: kept as out_dir/toys/<name>-<digest>.json and reused when run again."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    record = out_dir / "toys" / f"{name}-{digest}.json"
    if record.is_file():
        return json.loads(record.read_text())
    result = compute()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2))
    return json.loads(record.read_text())  # as it reads back: the numbers n of the dilution toy become strings


def dilution_experiment(grid: dict) -> dict:
    settings = grid["dilution"]
    results = {}
    for variant in settings["variants"]:
        rows = {arm: [] for arm in (*DILUTION_ARMS, "logn at inference", "oracle (best fixed sharpness)")}
        for seed in settings["seeds"]:
            heads = {arm: train_dilution(arm, variant, settings, seed) for arm in DILUTION_ARMS}
            for arm, head in heads.items():
                rows[arm].append(dilution_errors(head, variant, settings, seed))
            logn = lambda n: max(1.0, math.log(n) / math.log(settings["logn_length"]))  # noqa: E731
            rows["logn at inference"].append(dilution_errors(heads["vanilla"], variant, settings, seed, tau=logn))
            rows["oracle (best fixed sharpness)"].append(oracle_errors(heads["vanilla"], variant, settings, seed))
        results[variant] = rows
        for arm, errors in rows.items():
            print(f"  dilution {variant}, {arm}: " + ", ".join(
                f"n={n}: {statistics.mean(e[n] for e in errors):.3f}" for n in settings["test_n"]), flush=True)
    return {variant: {arm: [{str(n): e for n, e in errors.items()} for errors in rows] for arm, rows in by.items()}
            for variant, by in results.items()}


def value_experiment(grid: dict) -> dict:
    per_seed = [value_errors(grid["toy"], seed) for seed in grid["seeds"]]
    results = {name: [errors[name] for errors in per_seed] for name in per_seed[0]}
    for name, errors in results.items():
        print(f"  value toy, {name}: normalised error {mean_std(errors)}", flush=True)
    return results


def check_same_grid(out_dir: Path, grid: dict) -> None:
    """Finished training runs are reused, so an output folder may only ever hold one grid's runs: every setting that
    decides a trained run's result must match (more seeds or arms, other workers, evaluation settings or toy
    settings are fine: those are computed again)."""
    def settings(g: dict) -> dict:
        g = {key: json.loads(json.dumps(g[key])) for key in TRAINED if key in g}
        for section in g.values():
            for key in ("arms", "seeds", *EVALUATION_KEYS):
                section.pop(key, None)
        return g

    def arms(g: dict) -> dict:
        return {section: g[section].get("arms", {}) for section in TRAINED if isinstance(g.get(section), dict)}

    record = out_dir / "grid.json"
    if record.is_file():
        old = json.loads(record.read_text())
        old_arms, new_arms = arms(old), arms(json.loads(json.dumps(grid)))
        changed = [(s, a) for s in new_arms for a in set(old_arms.get(s, {})) & set(new_arms[s])
                   if old_arms[s][a] != new_arms[s][a]]
        if settings(old) != settings(grid) or changed:
            raise ValueError(f"{out_dir} holds the runs of a different grid (see {record}); pass another --out_dir "
                             f"or delete that folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(grid, indent=2))


def main(grid: Path = ROOT / "study" / "grid.yaml", out_dir: Path | None = None, quick: bool = False,
         data_dir: Path | None = None) -> str:
    """Run the grid and write the report.

    Args:
        grid: the YAML of the grid (study/grid.yaml).
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
    print("Length generalisation:", flush=True)
    length = length_experiment(grid, out_dir, data_dir)
    print("Position slopes:", flush=True)
    slopes = slopes_experiment(grid, out_dir, data_dir)
    torch.set_num_threads(os.cpu_count() or 1)
    print("Dilution toy:", flush=True)
    dilution = cached(out_dir, "dilution", grid["dilution"], lambda: dilution_experiment(grid))
    print("Value toy:", flush=True)
    value = cached(out_dir, "value", {**grid["toy"], "seeds": grid["seeds"]}, lambda: value_experiment(grid))
    decisions = verdict(length, grid["length"], len(grid["seeds"]))
    text = report(grid, slopes, length, dilution, value, decisions, quick)
    (out_dir / "results.md").write_text(text)
    summary = dict(slopes=slopes, length=length, learned=learned_runs(length, grid["length"]), decisions=decisions,
                   dilution=dilution, value=value)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    plot(grid, length, dilution, out_dir)
    print("\n" + text)
    print(f"Wrote {out_dir}/results.md, results.json, length.png, dilution.png and slopes.png")
    return text


if __name__ == "__main__":
    run_cli(main)
