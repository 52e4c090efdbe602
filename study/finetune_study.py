"""Does SSA fine-tuning lower held-out perplexity, beyond what any added capacity buys? The registered study of
study/finetune_plan.md on SmolLM2-135M-Instruct (real weights), run through finetune/full.py.

    python study/finetune_study.py                        # every run without a record, then the report
    python study/finetune_study.py --arms "[vanilla, ssa]" # the primary comparison first
    python study/finetune_study.py --report_only true     # rewrite the report from the records

The Wikipedia sample is split by article (seed 0) into training, validation (in-run validation and the tuning sweeps'
score) and test articles (the scored text); validation and test lose every line that shares a 50-character string
with the training text. Each arm's rates come from sweeps on seed 0, never scored; then seeds 1-5. A finished run
writes one record (settings, the scores, the learned parameters, the wall time, the plan's and grid's hashes, the
code's commit) to study/runs/smollm2/, and a record already there is reused.
"""

import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lit_gpt.checkpoint import load_checkpoint, run_holder
from lit_gpt.config import FINETUNE_SSA_INIT, Config, read_yaml
from lit_gpt.data.prepare import BUNDLED_WIKI, read_text
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import run_cli, write_file
from study.data import decontaminate, prepare_folder, token_stream, training_windows
from study.report import brief, learned_kinds, wilcoxon_greater
from study.report import sign_rule_power as rule_power
from study.reproduce import code_commit, learned_parameters, registered, settings_name, window_loss

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "study" / "finetune_plan.md"
GRID = ROOT / "study" / "finetune_grid.yaml"
RATE_KEYS = ("learning_rate", "ssa_position_lr", "ssa_token_lr", "gate_lr")


# ---- data -----------------------------------------------------------------------------------------------------------

def articles(text: str) -> list[str]:
    """The Wikipedia sample's articles: the text between each `<doc ...>` line and its `</doc>`."""
    return [body.strip() + "\n" for body in re.findall(r"<doc [^>]*>\n(.*?)</doc>", text, flags=re.S)]


def split_articles(settings: dict) -> dict:
    """{"train", "val", "test"}: lists of articles; val and test decontaminated against train (50 characters), with
    the number of lines dropped from each."""
    docs = articles(read_text(BUNDLED_WIKI))
    random.Random(settings["split_seed"]).shuffle(docs)
    n_test, n_val = (round(len(docs) * settings[k]) for k in ("test_fraction", "val_fraction"))
    test, val, train = docs[:n_test], docs[n_test:n_test + n_val], docs[n_test + n_val:]
    seen = training_windows(train)
    val, val_dropped = decontaminate(val, seen)
    test, test_dropped = decontaminate(test, seen)
    return dict(train=train, val=val, test=test, dropped_lines=dict(val=val_dropped, test=test_dropped))


# ---- the study ------------------------------------------------------------------------------------------------------

def file_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class FinetuneStudy:
    def __init__(self, grid: dict, checkpoint_dir: Path, out_dir: Path, records: Path, workers: int = 1) -> None:
        self.grid, self.checkpoint_dir, self.out_dir, self.records = grid, checkpoint_dir, out_dir, records
        self.workers = workers
        self.lock = threading.Lock()  # the data and the scored texts are made once, by the first run that needs them
        plan = PLAN.read_text()
        self.hashes = dict(plan_sha256=file_hash(registered(plan)), plan_full_sha256=file_hash(plan),
                           grid_sha256=file_hash(GRID.read_text()))
        self._texts = None
        self._scored = {}

    def texts(self) -> dict:
        with self.lock:
            if self._texts is None:
                self._texts = split_articles(self.grid["data"])
        return self._texts

    def data_dir(self) -> Path:
        t = self.texts()
        with self.lock:
            return prepare_folder(self.out_dir / "data", t["train"], t["val"], dict(finetune_study=self.grid["data"]),
                                  tokenizer_dir=self.checkpoint_dir)

    def scored_tokens(self, split: str) -> np.ndarray:
        texts = self.texts()
        with self.lock:
            if split not in self._scored:
                self._scored[split] = token_stream(Tokenizer(self.checkpoint_dir), texts[split])
        return self._scored[split]

    def score(self, folder: Path) -> dict:
        """Loss over every non-overlapping window of the validation and test texts, and the test perplexity."""
        model = load_checkpoint(folder).eval()
        window = self.grid["data"]["window"]
        losses = {split: window_loss(model, self.scored_tokens(split), window, 10**9) for split in ("val", "test")}
        return dict(val_loss=losses["val"], test_loss=losses["test"], test_ppl=math.exp(losses["test"]),
                    learned=learned_parameters(model))

    def base(self) -> dict:
        """The checkpoint's own scores, before any fine-tuning (one record)."""
        path = self.records / "base.json"
        if path.is_file():
            return json.loads(path.read_text())
        return write(path, dict(self.score(self.checkpoint_dir), **self.provenance()))

    def provenance(self) -> dict:
        return dict(self.hashes, code_commit=code_commit(), torch=torch.__version__, cpu=cpu_model(),
                    threads=self.grid["threads"], finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def check_hashes(self, path: Path, record: dict) -> None:
        """A reused record must come from this plan's registered part and from this grid or an earlier version of it
        that the plan's deviations keep valid (the grid's `earlier_grids`)."""
        grids = {self.hashes["grid_sha256"], *self.grid.get("earlier_grids", [])}
        if record.get("plan_sha256") != self.hashes["plan_sha256"] or record.get("grid_sha256") not in grids:
            raise ValueError(f"{path} was made under plan {str(record.get('plan_sha256'))[:12]} and grid"
                             f" {str(record.get('grid_sha256'))[:12]}; expected plan {self.hashes['plan_sha256'][:12]}"
                             f" and grid {self.hashes['grid_sha256'][:12]} or one of `earlier_grids`: restore the plan"
                             " and grid it was made under, list the change as a deviation, or pass another --records.")

    def run(self, part: str, arm: str, seed: int, rates: dict, steps: int, train: bool = True) -> dict | None:
        """The record of one run: read when there, else (with train) fine-tuned, scored and written."""
        name = settings_name(arm, rates, seed)
        path = self.records / part / f"{name}.json"
        spec = dict(arm=arm, seed=seed, rates=rates, max_steps=steps)
        if path.is_file():
            record = json.loads(path.read_text())
            if record["spec"] != spec:
                raise ValueError(f"{path} was made with other settings ({record['spec']}) than {spec}: a deviation to"
                                 " list in study/finetune_plan.md, or pass another --records folder.")
            self.check_hashes(path, record)
            return record
        if not train:
            return None
        folder = self.out_dir / part / name
        start = time.perf_counter()
        for attempt in (1, 2):  # the plan: a failed run is run again once from the start
            threads = str(self.grid["threads"])  # every run alike, however many run at a time (deviation D3)
            env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            done = subprocess.run(self.command(arm, seed, rates, steps, folder), env=env).returncode == 0
            if done:
                break
            holder = run_holder(folder)
            if holder is not None:  # never delete a folder a live run writes into (an earlier runner's, say)
                raise FileExistsError(f"{folder} is in use by another process ({holder}), perhaps a run an earlier"
                                      " runner left: let it finish or stop it, then run the study again; nothing"
                                      " was deleted.")
            print(f"  {part}/{name} failed (attempt {attempt})", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        if not done:
            return write(path, dict(spec=spec, failed=True, **self.provenance()))
        train_s = time.perf_counter() - start
        history = json.loads((folder / "history.json").read_text())
        record = dict(spec=spec, failed=False, **self.score(folder / "final"),
                      in_run_val_loss=[[h["step"], h["val_loss"]] for h in history if "val_loss" in h],
                      wall_s=dict(train=round(train_s, 1), score=round(time.perf_counter() - start - train_s, 1)),
                      **self.provenance())
        shutil.rmtree(folder)  # 2 GB a run (weights and optimizer state); the record keeps what the report needs
        print(f"  {part}/{name}: validation loss {record['val_loss']:.5f}, test perplexity {record['test_ppl']:.4f}"
              f" ({train_s:.0f} s)", flush=True)
        return write(path, record)

    def all_records(self, part: str) -> list[dict]:
        """Every record in one part's folder."""
        return [json.loads(f.read_text()) for f in sorted((self.records / part).glob("*.json"))]

    def in_parallel(self, jobs: list) -> list:
        """Run the jobs `workers` at a time (each training process with its share of the cores); results in order."""
        if self.workers == 1:
            return [job() for job in jobs]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda job: job(), jobs))

    def command(self, arm: str, seed: int, rates: dict, steps: int, folder: Path) -> list[str]:
        train = dict(self.grid["train"], max_steps=steps, **rates)
        train["min_lr"] = train["learning_rate"] * self.grid["min_lr_ratio"]
        flags = [f for k, v in train.items() for f in (f"--train.{k}", "null" if v is None else str(v))]
        flags += [f for k, v in self.grid["eval"].items() for f in (f"--eval.{k}", str(v).lower())]
        return [sys.executable, str(ROOT / "finetune" / "full.py"), "--checkpoint_dir", str(self.checkpoint_dir),
                "--data", str(self.data_dir()), "--out_dir", str(folder), "--seed", str(seed), "--resume", "auto",
                *flags, *self.grid["arms"][arm]]


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write(path: Path, record: dict) -> dict:
    write_file(path, json.dumps(record, indent=1) + "\n")
    return record


# ---- tuning ---------------------------------------------------------------------------------------------------------

def best(records: list[dict], tie: float) -> dict:
    """The rates of the lowest validation loss; within `tie` of it, the smallest rates (compared in RATE_KEYS
    order)."""
    done = [r for r in records if not r["failed"]]
    low = min(r["val_loss"] for r in done)
    close = [r for r in done if r["val_loss"] <= low + tie]
    return min(close, key=lambda r: [r["spec"]["rates"].get(k, 0.0) for k in RATE_KEYS])["spec"]["rates"]


def tune(study: FinetuneStudy, arm: str, train: bool) -> tuple[dict | None, list[dict]]:
    """The arm's rates from its sweeps on the tuning seed (None where a sweep is not complete), and its records.
    Vanilla sweeps the backbone rate; another arm sweeps its own rates stage by stage at vanilla's backbone rate, then
    the backbone rate at its best own rates."""
    settings = study.grid["tuning"]
    steps, seed = settings["max_steps"], settings["seed"]

    def sweep(grid: list[dict]) -> tuple[dict | None, list[dict]]:
        records = study.in_parallel([partial(study.run, "tuning", arm, seed, rates, steps, train) for rates in grid])
        done = [r for r in records if r is not None]
        return (best(done, settings["tie"]) if len(done) == len(grid) else None), done

    backbone = [{"learning_rate": lr} for lr in settings["backbone"]]
    if arm == "vanilla":
        return sweep(backbone)
    vanilla, _ = tune(study, "vanilla", train=False)
    if vanilla is None:
        return None, []
    chosen, records = dict(vanilla), []
    for i, stage in enumerate(settings["sweeps"][arm]):
        grid = stage_grid(chosen, stage, carried=i > 0)
        chosen, done = sweep(grid)
        records += [r for r in done if r not in records]  # a carried record competes again but is listed once
        if chosen is None:
            return None, records
    others = [dict(chosen, learning_rate=lr) for lr in settings["backbone"] if lr != chosen["learning_rate"]]
    final, done = sweep([chosen, *others])
    return final, records + [r for r in done if r not in records]


def stage_grid(chosen: dict, stage: dict, carried: bool) -> list[dict]:
    """One sweep stage's rates: `chosen` with every combination of the stage's values; with `carried` (every stage
    after the first), `chosen` itself too, so that the rate carried from the stage before competes (its record is
    reused) - deviation D1."""
    grid = [dict(chosen)]
    for key, values in stage.items():
        grid = [dict(g, **{key: v}) for g in grid for v in values]
    return [dict(chosen), *grid] if carried and chosen not in grid else grid


# ---- the rule -------------------------------------------------------------------------------------------------------

def relative_differences(a: dict[int, dict], b: dict[int, dict]) -> dict[int, float]:
    """Per paired seed: test perplexity of a over b's, minus 1."""
    return {s: a[s]["test_ppl"] / b[s]["test_ppl"] - 1 for s in sorted(a) if s in b}


def sign_test_p(d: list[float]) -> float:
    """Exact one-sided sign test of 'below zero': P(at least this many negatives | each sign a fair coin); zero
    differences dropped."""
    d = [x for x in d if x != 0]
    k = sum(x < 0 for x in d)
    return sum(math.comb(len(d), i) for i in range(k, len(d) + 1)) / 2 ** len(d)


def wilcoxon_p(d: list[float]) -> float:
    """Exact one-sided Wilcoxon signed-rank test of 'below zero': the study's exact test, on the mirrored values."""
    return wilcoxon_greater([-x for x in d])


def interval(d: list[float], t: float) -> tuple[float, float, float]:
    """Mean and its 95% t-interval."""
    mean = statistics.mean(d)
    half = t * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return mean, mean - half, mean + half


def verdict(d: list[float], rule: dict, n_seeds: int, power: bool) -> str:
    """The registered rule on relative differences d (X over Y minus 1), one per seed."""
    if not power:
        return "no power (vanilla fine-tuning did not lower the test perplexity in every seed)"
    if len(d) < n_seeds:
        return f"pending ({len(d)} of {n_seeds} seeds)"
    if all(x < 0 for x in d) and statistics.mean(d) < -rule["margin"]:
        return "lower"
    if all(x > 0 for x in d) and statistics.mean(d) > rule["margin"]:
        return "higher"
    return "no difference shown"


def power_table(pilot: Path = ROOT / "study" / "runs" / "finetune", n: int = 5, margin: float = 0.001,
                effects: tuple = (0.001, 0.0015, 0.002, 0.0064)) -> str:
    """The rule's power from the 30-step pilot's seed spread (study/runs/finetune: full and full_ssa, seeds 1-3): the
    paired spread (SD of SSA over full minus 1, per seed) and the unpaired one (SD of full's perplexity over its mean),
    and 3x the unpaired one for a longer run drifting further apart."""
    def ppl(arm):
        records = [json.loads(f.read_text()) for f in sorted(pilot.glob(f"{arm}-seed*.json"))]
        return {r["seed"]: r["ppl_after"] for r in records}

    full, ssa = ppl("full"), ppl("full_ssa")
    paired = statistics.stdev([ssa[s] / full[s] - 1 for s in full if s in ssa])
    unpaired = spread(full)
    rows = [("paired, measured", paired), ("unpaired, measured", unpaired), ("3x unpaired", 3 * unpaired)]
    return "\n".join([f"Pilot: {len(full)} seeds; paired SD {paired:.4%}, unpaired SD {unpaired:.4%}.", "",
                      *power_lines(rows, n, margin, effects)]) + "\n"


def spread(ppl: dict) -> float:
    """One arm's seed spread: the SD of its perplexities over their mean, minus 1."""
    return statistics.stdev([v / statistics.mean(ppl.values()) - 1 for v in ppl.values()])


def power_lines(rows: list[tuple[str, float]], n: int, margin: float,
                effects: tuple = (0.001, 0.0015, 0.002, 0.0064)) -> list[str]:
    """The rule's power table: a row per (label, SD of the paired relative differences)."""
    lines = ["| SD of the paired relative differences | " + " | ".join(f"power at {e:.2%}" for e in effects)
             + " | false 'lower' at 0 | smallest effect at 80% power |", "|---" * (len(effects) + 3) + "|"]
    for label, sd in rows:
        cells = [f"{rule_power(e, sd, n, margin):.2f}" for e in effects]
        lines.append(f"| {label} {sd:.3%} | " + " | ".join(cells) + f" | {rule_power(0.0, sd, n, margin):.4f} |"
                     f" {smallest_detectable(sd, n, margin):.3%} |")
    return lines


def smallest_detectable(sd: float, n: int, margin: float, power: float = 0.8) -> float:
    """The smallest effect the rule calls "lower" with this power (bisection on rule_power, to 1e-6)."""
    low, high = 0.0, margin + 10 * sd
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (low, mid) if rule_power(mid, sd, n, margin, draws=50_000) >= power else (mid, high)
    return high


# ---- the report -----------------------------------------------------------------------------------------------------

COMPARISONS = [("ssa", "vanilla", "primary"), ("constant", "vanilla", "capacity control"),
               ("gate", "vanilla", "gate"), ("ssa", "constant", "SSA beyond a constant temperature"),
               ("ssa", "gate", "SSA beyond a gate")]


def report(study: FinetuneStudy, tuned: dict, scored: dict[str, dict[int, dict]]) -> str:
    grid, base = study.grid, study.base()
    rule, seeds = grid["rule"], grid["seeds"]
    t = study.texts()
    lines = ["# The fine-tuning study: results", "",
             f"Written by `python study/finetune_study.py` under the registered plan {study.hashes['plan_sha256'][:12]}"
             f" (grid {study.hashes['grid_sha256'][:12]}). Test text: {len(t['test'])} articles,"
             f" {len(study.scored_tokens('test')):,} tokens ({t['dropped_lines']['test']} lines dropped as shared"
             f" with training); validation {len(t['val'])} articles ({t['dropped_lines']['val']} lines dropped).",
             f"The checkpoint before fine-tuning: test perplexity {base['test_ppl']:.4f}.", "",
             "What the controls control: under full fine-tuning the constant arm's per-head temperature (270"
             " parameters) is a per-head query scale the query weights could absorb, trained at its own faster rate;"
             " it controls for a fast per-head scale, not for added capacity. SSA adds 23,400 parameters, the gate"
             " 155,520.", "",
             "## Tuning (seed 0)", "",
             "| arm | rates | validation loss | machine | learned |", "|---|---|---|---|---|"]
    used = []
    for arm, (rates, records) in tuned.items():
        for r in sorted(records, key=lambda r: sorted(r["spec"]["rates"].items())):
            used.append(r)
            mark = " **chosen**" if rates is not None and r["spec"]["rates"] == rates else ""
            lines.append(f"| {arm} | {fmt_rates(r['spec']['rates'])}{mark} |"
                         f" {'failed' if r['failed'] else format(r['val_loss'], '.5f')} | {machine(r)} |"
                         f" {learned_brief(r)} |")
    lines += ["", "## Every scored run", "", "| arm | seed | test perplexity | validation loss | train s | machine |",
              "|---|---|---|---|---|---|"]
    for arm, runs in scored.items():
        for s, r in sorted(runs.items()):
            used.append(r)
            lines.append(f"| {arm} | {s} | {'failed' if r['failed'] else format(r['test_ppl'], '.4f')} |"
                         f" {r.get('val_loss', float('nan')):.5f} | {r.get('wall_s', {}).get('train', 0):.0f} |"
                         f" {machine(r)} |")
    unused = [(part, r) for part in ("tuning", "scored") for r in study.all_records(part) if r not in used]
    if unused:
        lines += ["", "Records not used by the verdicts as the sweeps stand (a sweep still pending, a record superseded"
                  " by a deviation, or one made ahead of a sweep that did not choose its rates): " + "; ".join(
                      f"{part} {r['spec']['arm']} {fmt_rates(r['spec']['rates'])} seed {r['spec']['seed']}"
                      f" ({'failed' if r['failed'] else format(r['test_ppl'], '.4f')} test perplexity)"
                      for part, r in unused) + "."]
    vanilla = scored.get("vanilla", {})
    power = len(vanilla) == len(seeds) and all(r["test_ppl"] < base["test_ppl"] for r in vanilla.values())
    lines += ["", "## Verdicts (the registered rule)", "",
              "| comparison | what | relative differences, each seed | mean [95% interval] | sign p | Wilcoxon p |"
              " verdict |", "|---|---|---|---|---|---|---|"]
    for x, y, what in COMPARISONS:
        d = relative_differences(scored.get(x, {}), scored.get(y, {}))
        values = list(d.values())
        if not values:
            lines.append(f"| {x} - {y} | {what} | - | - | - | - | not run |")
            continue
        mean, low, high = interval(values, rule["t_975_4"])
        lines.append(f"| {x} - {y} | {what} | {', '.join(f'{v:+.4%}' for v in values)} | {mean:+.4%}"
                     f" [{low:+.4%}, {high:+.4%}] | {sign_test_p(values):.4f} | {wilcoxon_p(values):.4f} |"
                     f" {verdict(values, rule, len(seeds), power)} |")
    lines += ["", *measured_power(scored, grid)]
    lines += ["", "## What the added parameters learned (every scored run)", ""]
    for arm, runs in scored.items():
        for s, r in sorted(runs.items()):
            if not r["failed"] and arm != "vanilla":
                lines.append(f"- {arm} seed {s}: {brief(r, '.3g')}")
    lines += ["", *movement(scored), *measured_section(study, scored)]
    return "\n".join(lines) + "\n"


# where each added parameter starts when it is added to the checkpoint (the start that gives the checkpoint's outputs)
STARTS = {"slope": FINETUNE_SSA_INIT, "u norm": 0.0, "gate norm": 0.0, "scale": Config.constant_init}


def movement(scored: dict[str, dict[int, dict]]) -> list[str]:
    """How far each kind of added parameter moved from its start, over every layer, head and scored seed: whether an
    arm learned anything, which its loss alone cannot say."""
    rows = []
    for arm, runs in scored.items():
        kinds: dict[str, list[float]] = {}
        for r in runs.values():
            if not r["failed"]:
                for kind, values in learned_kinds(r).items():
                    kinds.setdefault(kind, []).extend(values)
        for kind, values in kinds.items():
            start = next(v for k, v in STARTS.items() if kind.endswith(k))
            change = (f"{max(abs(v / start - 1) for v in values):.1%} of the start" if start else
                      f"{max(values):.3g} (from 0)")
            rows.append(f"| {arm} | {kind} | {start:g} | {min(values):.3g} to {max(values):.3g} | {change} |")
    if not rows:
        return []
    return ["## How far the added parameters moved from their start", "",
            "Over every layer, head and scored seed. A slope is SSA's position slope (tau = 1 + slope log(n) + the"
            " token term); a u norm is the norm of a head's token weights (the token term is tanh(u . gelu(f)));"
            " a gate norm is the norm of a head's gate weights (the gate is 2 sigmoid(x W), 1 at W = 0); a scale is the"
            " constant arm's temperature. The records keep slopes to 5 decimals (1.7% of SSA's start), the others to 5"
            " significant figures.", "",
            "| arm | parameter | start | after fine-tuning | largest change |", "|---|---|---|---|---|", *rows, ""]


def measured_section(study: "FinetuneStudy", scored: dict[str, dict[int, dict]]) -> list[str]:
    """The measured temperatures and gates of reruns that kept their weights (study/measure_additions.py's records in
    <records>/measured), each beside the committed run it repeats (and the rerun's own record from the study's
    runner in <records>/reruns, where there is one)."""
    from study.measure_additions import table

    lines = []
    for path in sorted((study.records / "measured").glob("*-seed*.json")):
        record = json.loads(path.read_text())
        arm, seed = record["arm"], record["seed"]
        committed = scored.get(arm, {}).get(seed)
        rerun_path = study.records / "reruns" / path.name
        rerun = json.loads(rerun_path.read_text()) if rerun_path.is_file() else None
        trained = ("" if rerun is None else f" It was trained and scored by the study's runner at code"
                   f" {rerun['code_commit'][:7]} ({rerun['cpu']}, {rerun['threads']} thread(s)); its record:"
                   f" {rerun_path.relative_to(study.records)}.")
        compared = ("no committed record to compare" if committed is None else
                    f"the committed run's {committed['test_ppl']:.6f}" + (
                        " (the same to every digit recorded)" if committed["test_ppl"] == record["ppl"]["learned"]
                        else ""))
        lines += [f"### {arm}, seed {seed}", "",
                  f"A rerun of the scored run with its command, kept with its weights.{trained} Measured by code"
                  f" {record['code_commit'][:7]} on {record['cpu']}: test perplexity {record['ppl']['learned']:.6f},"
                  f" {compared}.", "", *table(record), ""]
    if not lines:
        return []
    return ["## What the learned temperatures and gates are on the test text", "",
            "`python study/measure_additions.py`: for SSA, the size of each term over every (layer, head, token) of the"
            " test text, then the test loss with the learned temperatures and with a term switched off (slopes 0,"
            " token weights 0; both off is the vanilla model with the same weights). For the gate, |g - 1| over every"
            " (layer, head, token) with g = 2 sigmoid(x W) the factor on the head's output, g's range, and the test"
            " loss with W = 0 (g = 1, the vanilla model with the same weights).", "", *lines]


def measured_power(scored: dict[str, dict[int, dict]], grid: dict) -> list[str]:
    """The rule's power recomputed from the scored runs' own spread (the plan's table came from a 30-step pilot on
    other text): vanilla's seed spread, as the plan's "unpaired" row and times sqrt(2) for two arms whose seeds did not
    move together, and each arm's measured paired spread against vanilla."""
    vanilla = {s: r["test_ppl"] for s, r in scored.get("vanilla", {}).items()}
    if len(vanilla) < 2:
        return []
    n, margin = len(grid["seeds"]), grid["rule"]["margin"]
    single = spread(vanilla)
    rows = [("vanilla's seed spread", single), ("independent arms, sqrt(2) x vanilla's", math.sqrt(2) * single)]
    for arm, runs in scored.items():
        d = list(relative_differences(runs, scored["vanilla"]).values()) if arm != "vanilla" else []
        if len(d) >= 2:
            rows.append((f"{arm} - vanilla, measured paired", statistics.stdev(d)))
    return ["## Power from the measured spread", "",
            f"The rule's power (Monte Carlo as in the plan) from the 200-step runs' own spread ({len(vanilla)} vanilla"
            " seeds). The smallest effect this design detects is the last column of the measured paired row; before"
            " an arm is scored, the vanilla rows bound it.", "", *power_lines(rows, n, margin)]


def machine(record: dict) -> str:
    """The CPU and thread count a record ran on (deviation D3: not recorded before it)."""
    return f"{record['cpu']}, {record['threads']} thread(s)" if "cpu" in record else "not recorded"


def learned_brief(record: dict) -> str:
    return "-" if record["failed"] or record["spec"]["arm"] == "vanilla" else brief(record, ".3g")


def fmt_rates(rates: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(rates.items()))


def main(checkpoint_dir: Path | None = None, arms: list[str] | None = None,
         records: Path = ROOT / "study" / "runs" / "smollm2", out_dir: Path = Path("out/finetune-study"),
         workers: int = 2, report_only: bool = False, power: bool = False) -> str:
    """Tune and run every arm without records (in the grid's order), then write the report.

    Args:
        checkpoint_dir: the converted SmolLM2-135M-Instruct (default: the grid's; docs/finetuning.md says how).
        arms: which arms to tune and run now (default all, in the grid's order); the report covers every record.
        records: one JSON per finished run, and results.md.
        out_dir: the runs' folders and the prepared data (each run's weights are removed once it is scored).
        workers: runs at a time, each with its share of the CPU cores.
        report_only: train nothing; rewrite the report from the records.
        power: train nothing; print the rule's power computed from the 30-step pilot (the plan's table).
    """
    if power:
        text = power_table()
        print(text)
        return text
    grid = read_yaml(GRID, "the fine-tuning study's grid")
    order = grid["order"]
    arms = order if arms is None else arms
    unknown = [a for a in arms if a not in order]
    if unknown:
        raise ValueError(f"--arms: {unknown} unknown; expected some of {order}.")
    checkpoint_dir = Path(checkpoint_dir or grid["checkpoint_dir"])
    if not (checkpoint_dir / "model_config.yaml").is_file():
        raise FileNotFoundError(f"--checkpoint_dir {checkpoint_dir}: no converted checkpoint there; make it as"
                                " docs/finetuning.md shows (gguf_to_hf.py, then scripts/convert_hf_checkpoint.py).")
    study = FinetuneStudy(grid, checkpoint_dir, out_dir, records, workers)
    study.base()
    tuned, scored = {}, {}
    for arm in order:
        train = arm in arms and not report_only
        rates, tuning_records = tune(study, arm, train)
        tuned[arm] = rates, tuning_records
        if rates is not None:
            runs = study.in_parallel([partial(study.run, "scored", arm, s, rates, grid["train"]["max_steps"], train)
                                      for s in grid["seeds"]])
            scored[arm] = {r["spec"]["seed"]: r for r in runs if r is not None and not r["failed"]}
    text = report(study, tuned, scored)
    (records / "results.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
