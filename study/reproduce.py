"""Does SSA help? The registered study (study/plan.md): tuning, then five experiments, every seed counted.

    python study/reproduce.py                  # the grid of study/grid.yaml, about 3 hours on 2 CPU cores
    python study/reproduce.py --only "[tuning, speed]"   # some parts (the plan's order when the budget is short)
    python study/reproduce.py --quick          # a reduced grid in a few minutes (the test suite runs it)

Every training run goes through the real entry point (pretrain/openwebtext.py). A finished run writes one record,
study/runs/<part>/<arm>-<settings>-seed<k>.json (settings, the metrics at every evaluation, the learned temperature and
gate parameters, wall time, the plan's hash); a record already there is reused, so a machine recomputes nothing that
is committed. The report (study/results.md and plots beside it) is written only under the plan its runs were made
under, or with a deviation in the plan that names the plan's new hash.
"""

import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from lit_gpt.checkpoint import load_checkpoint
from lit_gpt.config import Config, read_yaml
from lit_gpt.data.tokens import TokenData
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import run_cli
from study.data import mix_texts, prepare_folder, study_texts, token_stream
from study.report import report, tuned_rates
from study.tasks import evaluation_cells, score_answers, training_length_prompts
from study.toys import DILUTION_ARMS, FIXED_SLOPE, dilution_errors, oracle_errors, train_dilution, value_errors

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "pretrain" / "openwebtext.py"
PLAN = ROOT / "study" / "plan.md"
PARTS = ("tuning", "speed", "lm", "length", "toys")  # the plan's order
DEVIATIONS = "\n## Deviations"


# ---- the plan -------------------------------------------------------------------------------------------------------

def registered(text: str) -> str:
    """The registered part of the plan: everything above its Deviations section."""
    return text.split(DEVIATIONS, 1)[0]


def plan_hash(text: str) -> str:
    return hashlib.sha256(registered(text).encode()).hexdigest()


def plan_commit() -> str | None:
    """The last commit that changed study/plan.md, where the plan is committed as it reads now (else None)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    if git("diff", "--quiet", "HEAD", "--", str(PLAN)).returncode != 0:
        return None
    out = git("log", "-1", "--format=%H", "--", str(PLAN)).stdout.strip()
    return out or None


def code_commit() -> str:
    """The commit the code ran from, with "+dirty" where tracked files differ from it ("unknown" outside git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    head = git("rev-parse", "HEAD").stdout.strip()
    if not head:
        return "unknown"
    return head + ("+dirty" if git("diff", "--quiet", "HEAD").returncode != 0 else "")


def check_plan(records: list[dict], plan_text: str) -> list[str]:
    """The hashes the records were made under; refuses a report whose plan changed after its runs unless a deviation
    names the plan's current hash (its first 12 characters)."""
    now = plan_hash(plan_text)
    made_under = sorted({r["plan_sha256"] for r in records})
    deviations = plan_text.split(DEVIATIONS, 1)[1] if DEVIATIONS in plan_text else ""
    if any(h != now for h in made_under) and now[:12] not in deviations:
        raise ValueError(f"study/plan.md changed after runs were made under it (registered part {made_under[0][:12]},"
                         f" now {now[:12]}): list the change under '## Deviations' with the new hash {now[:12]} and"
                         " its reason, or restore the plan.")
    return made_under


# ---- the grid -------------------------------------------------------------------------------------------------------

def load_grid(path: Path, quick: bool) -> dict:
    grid = read_yaml(path, "the grid (--grid)")
    missing = [key for key in ("workers", "data", "models", "arms", "train", "eval", *PARTS) if key not in grid]
    if missing:
        raise ValueError(f"--grid {path} lacks the section(s) {missing}: start from study/grid.yaml.")
    override = grid.pop("quick", {}) if quick else {}
    grid.pop("quick", None)
    grid = merge(grid, override)
    if "sweeps" in override.get("tuning", {}):  # a quick grid's sweeps replace the full grid's, not extend them
        grid["tuning"]["sweeps"] = override["tuning"]["sweeps"]
    named = [(part, arm) for part in ("speed", "lm", "length") for arm in grid[part]["arms"]]
    named += [("tuning", arm) for arm in grid["tuning"]["sweeps"]] + [("tuned_from", a) for pair in
                                                                      grid.get("tuned_from", {}).items() for a in pair]
    for part, arm in named:
        if arm not in grid["arms"]:
            raise ValueError(f"--grid {path}: the {part} section names the arm {arm!r}, which the arms section does"
                             f" not have (it has {', '.join(grid['arms'])}).")
    for part in ("speed", "lm", "length", "tuning"):
        if grid[part].get("model", "retrieval") not in grid["models"]:
            raise ValueError(f"--grid {path}: the {part} section's model {grid[part]['model']!r} is not in the models"
                             f" section (it has {', '.join(grid['models'])}).")
    return grid


def merge(base: dict, over: dict) -> dict:
    """`over` on `base`, dictionaries merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def flags(prefix: str, values: dict) -> list[str]:
    return [item for key, value in values.items()
            for item in (f"--{prefix}{key}", "null" if value is None else json.dumps(value).strip('"'))]


def settings_name(arm: str, rates: dict, seed: int) -> str:
    rate_part = "".join(f"-{k.removesuffix('_lr')}={v:g}" for k, v in sorted(rates.items()))
    return f"{arm}{rate_part}-seed{seed}"


# ---- one run --------------------------------------------------------------------------------------------------------

class Study:
    def __init__(self, grid: dict, out_dir: Path, records: Path, quick: bool) -> None:
        self.grid, self.out_dir, self.records, self.quick = grid, out_dir, records, quick
        self.plan_text = PLAN.read_text()
        self.plan_sha = plan_hash(self.plan_text)
        self.commit = plan_commit()
        if not quick and self.commit is None:
            raise ValueError("study/plan.md has changes that are not committed: the plan is registered by its commit;"
                             " commit it (or list a deviation) before running the grid.")
        self._data = None

    # data, prepared once per invocation
    def data(self) -> dict:
        if self._data is None:
            settings = self.grid["data"]
            texts = study_texts(settings)
            folder = self.out_dir / "data"
            about = dict(settings, part="corpus")
            corpus = prepare_folder(folder / "corpus", *texts["corpus"], about, train_tokenizer=settings["vocab"])
            tokenizer = Tokenizer(corpus)
            mix = mix_texts(tokenizer, settings, texts["corpus"])
            mix_dir = prepare_folder(folder / "mix", *mix, dict(settings, part="mix"), tokenizer_dir=corpus)
            self._data = dict(corpus=corpus, mix=mix_dir, wiki=texts["wiki"], dropped=texts["dropped_lines"],
                              tokenizer=tokenizer)
        return self._data

    @functools.cache  # noqa: B019 (one Study per invocation)
    def wiki_tokens(self) -> np.ndarray:
        """The Wikipedia sample in the study's tokens, documents separated by EOS: tokenized once, by the first run
        of experiment 3 that needs it."""
        return token_stream(self.data()["tokenizer"], self.data()["wiki"])

    def record_path(self, part: str, name: str) -> Path:
        return self.records / part / f"{name}.json"

    def run(self, part: str, arm: str, seed: int, rates: dict, settings: dict, evaluate) -> dict | None:
        """The record of one (arm, rates, seed) of `part`: read when there, else trained, evaluated and written
        (with evaluate None: not trained, None returned)."""
        name = settings_name(arm, rates, seed)
        path = self.record_path(part, name)
        model_fields = {**self.grid["models"][settings["model"]], **self.grid["arms"][arm]}
        train = {**self.grid["train"], **settings.get("train", {}), **rates}
        eval_args = {**self.grid["eval"], **settings.get("eval", {})}
        spec = dict(part=part, arm=arm, seed=seed, rates=rates, model=model_fields, train=train, eval=eval_args,
                    data=settings.get("data", "mix"), evaluation={k: settings[k] for k in ("curve", "lengths",
                    "depths", "keys", "windows", "inference_arms") if k in settings})
        if path.is_file():
            record = json.loads(path.read_text())
            if record["spec"] != json.loads(json.dumps(spec)):
                raise ValueError(f"{path} was made with other settings than the grid's: the grid changed after the"
                                 " run (a deviation to list in study/plan.md), or pass another --records folder.")
            return record
        if evaluate is None:
            return None
        folder = self.out_dir / part / name
        start = time.perf_counter()
        for attempt in (1, 2):  # the plan: a failed run is run again once from the start
            try:
                self.train(folder, spec)
                break
            except RuntimeError as error:
                print(f"  {part}/{name} failed (attempt {attempt}): {str(error)[-500:]}", flush=True)
                shutil.rmtree(folder, ignore_errors=True)
                if attempt == 2:
                    return self.write(path, dict(spec=spec, failed=True, error=str(error)[-2000:]))
        train_s = time.perf_counter() - start
        metrics = evaluate(folder, spec)
        history = json.loads((folder / "history.json").read_text())
        record = dict(spec=spec, failed=False, metrics=metrics,
                      val_loss=[[h["step"], h["val_loss"]] for h in history if "val_loss" in h],
                      learned=learned_parameters(load_checkpoint(folder / "final")),
                      wall_s=dict(train=round(train_s, 1), evaluate=round(time.perf_counter() - start - train_s, 1)),
                      plan_sha256=self.plan_sha, plan_full_sha256=hashlib.sha256(self.plan_text.encode()).hexdigest(),
                      plan_commit=self.commit, code_commit=code_commit(), torch=torch.__version__,
                      finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        for step_dir in folder.glob("step-*"):  # what this run wrote, kept only until it is evaluated
            shutil.rmtree(step_dir)
        print(f"  {part}/{name}: {summary(record)} ({record['wall_s']['train']:.0f} s)", flush=True)
        return self.write(path, record)

    def write(self, path: Path, record: dict) -> dict:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(path)
        return json.loads(path.read_text())

    def train(self, folder: Path, spec: dict) -> None:
        """Train the run; one with `part_steps` in its curve settings trains in parts of that many steps, scores each
        part's checkpoints and stops at the first evaluation that reaches the bar (or at max_steps). Its schedule is
        lr_decay_steps', not the stop's, so nothing before the stop depends on where it is (the scores are kept in
        curve.json)."""
        settings = spec["evaluation"].get("curve", {})
        if "part_steps" not in settings:
            return self.pretrain(folder, spec)
        scored = folder / "curve.json"  # the parts scored so far (a run stopped on this machine goes on from them)
        curve = json.loads(scored.read_text()) if scored.is_file() else []
        end = curve[-1][0] if curve else 0
        while end < spec["train"]["max_steps"] and first_reach(curve, settings["reach"]) is None:
            end = min(end + settings["part_steps"], spec["train"]["max_steps"])
            self.pretrain(folder, merge(spec, {"train": {"max_steps": end}}))
            curve += self.score_checkpoints(folder, spec, end)
            for step_dir in folder.glob("step-*"):  # scored; final/ (step `end`) is what the next part resumes
                shutil.rmtree(step_dir)
            scored.write_text(json.dumps(curve))

    def pretrain(self, folder: Path, spec: dict) -> None:
        data_dir = self.data()["corpus" if spec["data"] == "corpus" else "mix"]
        window = "document" if spec["data"] == "mix" else "random"
        command = [str(PRETRAIN), "--model_name", "demo", *flags("model.", spec["model"]), "--data.dir",
                   str(data_dir), "--data.window_start", window, "--out_dir", str(folder), "--seed", str(spec["seed"]),
                   *flags("train.", spec["train"]), *flags("eval.", spec["eval"])]
        if folder.exists():
            command += ["--resume", "auto"]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")

    threads = 1

    def in_parallel(self, jobs: list) -> list:
        workers = self.grid["workers"]
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(self.threads)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(job) for job in jobs]
            for future in as_completed(futures):
                future.result()
        return [f.result() for f in futures]

    # ---- evaluations ------------------------------------------------------------------------------------------------

    def score_checkpoints(self, folder: Path, spec: dict, last_step: int) -> list[list]:
        """[step, exact match on held-out prompts at the training length] for every step checkpoint in `folder` and
        final/ (step `last_step`)."""
        settings = spec["evaluation"]["curve"]
        prompts = training_length_prompts(self.data()["tokenizer"], settings["prompts"],
                                          spec["model"]["block_size"], seed=5)
        checkpoints = {int(p.name.split("-")[1]): p for p in folder.glob("step-*")}
        checkpoints.setdefault(last_step, folder / "final")  # the last step is saved as final/
        curve = []
        for step in sorted(checkpoints):
            model = load_checkpoint(checkpoints[step]).eval()
            scores = score_answers(model, prompts)
            curve.append([step, sum(s["exact"] for s in scores) / len(scores)])
        return curve

    def curve(self, folder: Path, spec: dict) -> dict:
        """Exact match on held-out prompts at the training length at every saved step (scored as the parts trained,
        for a run trained in parts); T = the first step at or over `reach` (the cap, max_steps + every, when
        never)."""
        settings = spec["evaluation"]["curve"]
        scored = folder / "curve.json"
        curve = (json.loads(scored.read_text()) if scored.is_file()
                 else self.score_checkpoints(folder, spec, spec["train"]["max_steps"]))
        cap = spec["train"]["max_steps"] + settings["every"]
        T = first_reach(curve, settings["reach"])
        return dict(curve=curve, T=cap if T is None else T, cap=cap,
                    auc=sum(e for _, e in curve) / max(1, len(curve)))

    def length(self, folder: Path, spec: dict, fields: dict | None = None) -> dict:
        settings = spec["evaluation"]
        config = Config.from_file(folder / "final", **(fields or {}))
        model = load_checkpoint(folder / "final", config=config).eval()
        cells = []
        for cell in evaluation_cells(self.data()["tokenizer"], settings["lengths"], settings["depths"],
                                     settings["keys"], seed=0):
            scores = score_answers(model, cell["examples"])
            cells.append(dict(length=cell["length"], depth=cell["depth"],
                              exact=sum(s["exact"] for s in scores) / len(scores),
                              log_likelihood=sum(s["log_likelihood"] for s in scores) / len(scores)))
        return dict(cells=cells)

    def length_with_controls(self, folder: Path, spec: dict) -> dict:
        out = self.length(folder, spec)
        for name, control in spec["evaluation"].get("inference_arms", {}).items():
            if control["of"] == spec["arm"]:
                out[f"inference:{name}"] = self.length(folder, spec, control["fields"])
        return out

    def lm(self, folder: Path, spec: dict) -> dict:
        """Mean next-token loss over every non-overlapping window of the model's length (at most `windows`) of the
        corpus validation text and of the Wikipedia sample."""
        model = load_checkpoint(folder / "final").eval()
        window, most = model.config.block_size, spec["evaluation"]["windows"]
        val = np.asarray(TokenData(self.data()["corpus"]).val, dtype=np.int64)
        wiki = self.wiki_tokens()
        return dict(val_loss=window_loss(model, val, window, most), wiki_loss=window_loss(model, wiki, window, most))


def first_reach(curve: list[list], reach: float) -> int | None:
    """The first evaluated step whose exact match is at or over `reach`, or None."""
    return next((step for step, exact in curve if exact >= reach), None)


@torch.inference_mode()
def window_loss(model: GPT, tokens: np.ndarray, window: int, most: int) -> float:
    count = min(most, (len(tokens) - 1) // window)
    rows = torch.from_numpy(np.stack([tokens[i * window : i * window + window + 1] for i in range(count)]))
    total = 0.0
    for batch in rows.split(16):
        logits = model(batch[:, :-1]).float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
    return (total / (count * window)).item()


def learned_parameters(model: GPT) -> dict:
    """What the added parameters learned, per layer: SSA's slopes per head and its token weights' norms, a baseline's
    scale, the gate's weight norm per head."""
    from lit_gpt.analysis import learned_slopes

    out = {"slopes": [{side: [round(v, 5) for v in s.tolist()] for side, s in layer.items()}
                      for layer in learned_slopes(model)]}
    for name, p in model.named_parameters():
        if name.startswith("transformer.h.") and any(k in name for k in ("temperature", "gate", "scale")) \
                and "position_param" not in name:
            values = p.detach().float()
            out[name] = [round(v, 5) for v in (values.norm(dim=-1) if values.dim() > 1 else values).flatten().tolist()]
    return out


def summary(record: dict) -> str:
    m = record["metrics"]
    if "T" in m:
        return f"T = {m['T']}, exact match {m['curve'][-1][1]:.2f} at the end"
    if "val_loss" in m:
        return f"validation loss {m['val_loss']:.4f}, Wikipedia {m['wiki_loss']:.4f}"
    return "far log-likelihood computed"


# ---- the parts ------------------------------------------------------------------------------------------------------

def tuning(study: Study, run: bool = True) -> dict:
    """Each method's sweeps on the tuning seed, stage by stage; returns the records by method (without run: only
    those already made)."""
    settings = study.grid["tuning"]
    out = {}
    for method, stages in settings["sweeps"].items():
        best, records = {}, []
        for stage in stages or [{}]:
            grid = [dict(best)]
            for key, values in stage.items():
                grid = [dict(g, **{key: v}) for g in grid for v in values]
            jobs = [(lambda rates=rates, method=method: study.run("tuning", method, settings["seed"], rates, settings,
                                                                  study.curve if run else None)) for rates in grid]
            stage_records = [r for r in study.in_parallel(jobs) if r]
            if len(stage_records) < len(grid):  # a stage not (fully) run: no later stage can be chosen
                records += stage_records
                break
            records += stage_records
            best = tuned_rates(stage_records, settings["tie"])
        out[method] = records
    return out


def rates_for(study: Study, arm: str, tuned: dict) -> dict:
    method = study.grid["tuned_from"].get(arm, arm)
    records = tuned.get(method)
    return tuned_rates(records, study.grid["tuning"]["tie"]) if records else {}


def contingency_steps(study: Study, tuned: dict, settings: dict) -> dict:
    """The plan's contingency: more steps for experiment 1 when vanilla did not learn on the tuning seed."""
    vanilla = [r for r in tuned.get("vanilla", []) if not r["failed"]]
    if vanilla and vanilla[0]["metrics"]["T"] >= vanilla[0]["metrics"]["cap"]:
        more = study.grid["tuning"]["contingency"]
        print(f"  contingency: vanilla did not reach the bar on the tuning seed: {more}", flush=True)
        return merge(settings, {"train": more})
    return settings


def experiment(study: Study, part: str, tuned: dict, evaluate, settings: dict | None = None) -> dict:
    """The part's records by arm, in seed order; with evaluate None only those already made (the report lists the
    others as not run)."""
    settings = settings or study.grid[part]
    jobs = [(arm, seed) for seed in settings["seeds"] for arm in settings["arms"]]
    run = [(lambda arm=arm, seed=seed: study.run(part, arm, seed, rates_for(study, arm, tuned), settings, evaluate))
           for arm, seed in jobs]
    records = study.in_parallel(run)
    out: dict[str, list] = {arm: [] for arm in settings["arms"]}
    for (arm, _), record in zip(jobs, records):
        if record is not None:
            out[arm].append(record)
    return out


def toys(study: Study, run: bool = True) -> dict | None:
    """Experiment 5's record: read when there, else (with run) made; None when neither."""
    settings = study.grid["toys"]
    path = study.record_path("toys", "toys")
    spec = json.loads(json.dumps(settings))
    if path.is_file() and json.loads(path.read_text())["spec"] == spec:
        return json.loads(path.read_text())
    if not run:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    dilution = settings["dilution"]
    arms = (*DILUTION_ARMS, *(f"{FIXED_SLOPE}{s:g}" for s in dilution["fixed_slopes"]))
    result = {"dilution": {}, "learned": {}}
    start = time.perf_counter()
    for variant in dilution["variants"]:
        rows = {arm: [] for arm in (*arms, "logn at inference", "oracle (best fixed sharpness)")}
        learned = {arm: [] for arm in ("constant", "ssa", "ssmax")}
        for seed in settings["seeds"]:
            heads = {arm: train_dilution(arm, variant, dilution, seed) for arm in arms}
            for arm, head in heads.items():
                rows[arm].append({str(n): e for n, e in dilution_errors(head, variant, dilution, seed).items()})
                if arm in learned:
                    learned[arm].append(head.learned())
            logn = lambda n: max(1.0, math.log(n) / math.log(dilution["logn_length"]))  # noqa: E731
            rows["logn at inference"].append(
                {str(n): e for n, e in dilution_errors(heads["vanilla"], variant, dilution, seed, tau=logn).items()})
            rows["oracle (best fixed sharpness)"].append(
                {str(n): e for n, e in oracle_errors(heads["vanilla"], variant, dilution, seed).items()})
        result["dilution"][variant] = rows
        result["learned"][variant] = learned
    per_seed = [value_errors(settings["value"], seed) for seed in settings["seeds"]]
    result["value"] = {kind: [errors[kind] for errors in per_seed] for kind in per_seed[0]}
    return study.write(path, dict(spec=spec, **result, wall_s=round(time.perf_counter() - start, 1),
                                  plan_sha256=study.plan_sha, plan_commit=study.commit, failed=False))


def main(grid: Path = ROOT / "study" / "grid.yaml", out_dir: Path | None = None, records: Path | None = None,
         quick: bool = False, only: list[str] | None = None) -> str:
    """Run the parts of the grid that have no record yet, then write the report.

    Args:
        grid: the YAML of the grid (study/grid.yaml).
        out_dir: the runs' folders (checkpoints, logs) and the prepared data. Default out/study, or out/study-quick.
        records: one JSON per finished run, and the report. Default study/runs (committed), or <out_dir>/runs with
            --quick.
        quick: the reduced grid of the grid's `quick` section.
        only: the parts to run (tuning, speed, lm, length, toys; default all); the report covers what has records.
    """
    only = list(PARTS) if only is None else only
    unknown = [p for p in only if p not in PARTS]
    if unknown:
        raise ValueError(f"--only: {unknown} unknown; expected some of {list(PARTS)}.")
    grid = load_grid(grid, quick)
    out_dir = Path(out_dir or ("out/study-quick" if quick else "out/study"))
    records = Path(records or (out_dir / "runs" if quick else ROOT / "study" / "runs"))
    study = Study(grid, out_dir, records, quick)
    study.data()  # prepared once, before parallel runs could each start preparing it
    tuned = tuning(study, run=bool({"tuning", "speed", "lm", "length"} & set(only)))  # every part's rates
    results: dict = {"tuning": tuned}
    for part, title, evaluate, settings in (
            ("speed", "Experiment 1, speed of learning", study.curve, contingency_steps(study, tuned, grid["speed"])),
            ("lm", "Experiment 3, language modelling", study.lm, grid["lm"]),
            ("length", "Experiments 4 and 2, length generalisation and the ablations", study.length_with_controls,
             grid["length"])):
        if part in only:
            print(f"{title}:", flush=True)
        results[part] = experiment(study, part, tuned, evaluate if part in only else None, settings)
    if "toys" in only:
        print("Experiment 5, the toys:", flush=True)
    results["toys"] = toys(study, run="toys" in only)
    flat = [r for part in ("speed", "lm", "length") for rows in results.get(part, {}).values() for r in rows]
    flat += [r for rows in tuned.values() for r in rows] + ([results["toys"]] if results["toys"] else [])
    made_under = check_plan([r for r in flat if "plan_sha256" in r], study.plan_text)
    deviations = study.plan_text.split(DEVIATIONS, 1)[1] if DEVIATIONS in study.plan_text else ""
    text = report(grid, results, dict(made_under=made_under, commit=study.commit, quick=quick,
                                      dropped=study.data()["dropped"], deviations=deviations), records)
    (records / "results.md").write_text(text)
    print("\n" + text)
    print(f"Wrote {records}/results.md and its plots")
    return text


if __name__ == "__main__":
    run_cli(main)
