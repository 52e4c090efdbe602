"""The study's verdicts by the rules registered in study/plan.md, its tables and its plots (study/reproduce.py)."""

import itertools
import math
import statistics
from pathlib import Path

import numpy as np

RATE_KEYS = ("ssa_position_lr", "ssa_token_lr", "gate_lr")


# ---- statistics -----------------------------------------------------------------------------------------------------

def wilcoxon_greater(values: list[float]) -> float:
    """Exact one-sided Wilcoxon signed-rank p-value for "the values lie above zero": zeros dropped, ties given their
    mean rank, every sign pattern enumerated (exact for the small n of the study)."""
    nonzero = [v for v in values if v != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(nonzero[i]))
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(nonzero[order[j + 1]]) == abs(nonzero[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    observed = sum(r for r, v in zip(ranks, nonzero) if v > 0)
    at_least = sum(1 for signs in itertools.product((0, 1), repeat=n)
                   if sum(r for r, s in zip(ranks, signs) if s) >= observed - 1e-9)
    return at_least / 2**n


def paired(differences: list[float]) -> dict:
    n = len(differences)
    mean = statistics.mean(differences) if n else float("nan")
    se = statistics.stdev(differences) / math.sqrt(n) if n > 1 else float("nan")
    return dict(n=n, mean=mean, se=se, positive=sum(d > 0 for d in differences),
                negative=sum(d < 0 for d in differences))


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (p > 0.5): bisection on the CDF, the density integrated by Simpson's rule."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t):
        x = np.linspace(0.0, t, 2001)
        y = c * (1 + x**2 / df) ** (-(df + 1) / 2)
        return 0.5 + (x[1] - x[0]) / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())

    low, high = 0.0, 100.0
    while high - low > 1e-10:
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The mean and its two-sided t-interval."""
    mean = statistics.mean(values)
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def sign_rule_power(effect: float, sd: float, n: int, margin: float, draws: int = 200_000, seed: int = 0) -> float:
    """P(a rule "every one of n paired differences below zero and their mean below -margin" fires) when the
    differences are normal with mean -effect and this sd (Monte Carlo, fixed seed: the same figure on any machine
    for a given numpy)."""
    d = np.random.default_rng(seed).normal(-effect, sd, size=(draws, n))
    return float(((d < 0).all(axis=1) & (d.mean(axis=1) < -margin)).mean())


def fmt_paired(d: dict, digits: int = 3) -> str:
    spread = f" +- {d['se']:.{digits}f}" if d["n"] > 1 else ""  # one seed has no standard error
    return (f"{d['mean']:+.{digits}f}{spread} (n = {d['n']}; {d['positive']} above zero,"
            f" {d['negative']} below)")


# ---- tuning ---------------------------------------------------------------------------------------------------------

def final_val_loss(record: dict) -> float:
    return record["val_loss"][-1][1] if not record["failed"] and record["val_loss"] else float("inf")


def tuned_rates(records: list[dict], tie: float) -> dict:
    """The rates of the record with the lowest final validation loss; within `tie` of it, the smaller rates."""
    best = min(final_val_loss(r) for r in records)
    close = [r for r in records if final_val_loss(r) <= best + tie]
    chosen = min(close, key=lambda r: tuple(r["spec"]["rates"].get(k, 0) for k in RATE_KEYS))
    return dict(chosen["spec"]["rates"])


# ---- the rules ------------------------------------------------------------------------------------------------------

def by_seed(rows: list[dict]) -> dict[int, dict]:
    return {r["spec"]["seed"]: r for r in rows}


def speed_verdict(base: list[dict], arm: list[dict], rule: dict) -> dict:
    """Experiment 1: r = T_base / T_arm per seed (a failed run counts as the cap)."""
    b, a = by_seed(base), by_seed(arm)
    seeds = sorted(set(b) & set(a))

    def cap(record):
        return record["spec"]["train"]["max_steps"] + record["spec"]["evaluation"]["curve"]["every"]

    def T(record):  # a failed run counts as never reaching the bar
        return record["metrics"]["T"] if not record["failed"] else cap(record)

    ratios = [T(b[s]) / T(a[s]) for s in seeds]
    capped = all(T(b[s]) >= cap(b[s]) and T(a[s]) >= cap(a[s]) for s in seeds)
    median = statistics.median(ratios) if ratios else float("nan")
    p = wilcoxon_greater([math.log(r) for r in ratios])
    if not ratios:
        verdict = "not run"
    elif capped:
        verdict = "no power (neither arm reached the bar in any seed)"
    elif median >= rule["faster"]["median_ratio"] and p <= rule["faster"]["p"]:
        verdict = "learns faster"
    elif median <= rule["refuted"]["median_ratio"] or sum(r <= 1 for r in ratios) >= len(ratios) / 2:
        verdict = "refuted (does not learn faster)"
    else:
        more = next((k for k in range(1, 30) if wilcoxon_greater([math.log(r) for r in ratios] + [10.0] * k)
                     <= rule["faster"]["p"]), None)
        verdict = f"inconclusive (at least {more} more seed(s) favouring it would decide)"
    auc = [shared_auc(a[s], b[s]) - shared_auc(b[s], a[s]) for s in seeds if not a[s]["failed"] and not b[s]["failed"]]
    logs = [math.log(r) for r in ratios]
    estimate = tuple(math.exp(v) for v in mean_interval(logs)) if len(logs) > 1 else (float("nan"),) * 3
    return dict(seeds=seeds, ratios=ratios, median=median, p=p, verdict=verdict, auc=paired(auc), estimate=estimate,
                log_sd=statistics.stdev(logs) if len(logs) > 1 else float("nan"))


def speed_rule_refutes(true_ratio: float, log_sd: float, n: int, rule: dict, draws: int = 100_000,
                       seed: int = 0) -> float:
    """P(the registered rule says "refuted") when the true speed-up is `true_ratio` and the log ratios are normal
    with this spread (Monte Carlo, fixed seed)."""
    r = np.exp(np.random.default_rng(seed).normal(math.log(true_ratio), log_sd, size=(draws, n)))
    refuted = (np.median(r, axis=1) <= rule["refuted"]["median_ratio"]) | ((r <= 1).sum(axis=1) >= n / 2)
    return float(refuted.mean())


def speed_rule_faster(true_ratio: float, log_sd: float, n: int, rule: dict, draws: int = 100_000,
                      seed: int = 0) -> float:
    """P(the registered rule says "learns faster": median ratio at its bar and the exact one-sided Wilcoxon p at most
    its level) when the true speed-up is `true_ratio` and the log ratios are normal with this spread (Monte Carlo,
    fixed seed; the same draws as speed_rule_refutes)."""
    logs = np.random.default_rng(seed).normal(math.log(true_ratio), log_sd, size=(draws, n))
    ranks = np.abs(logs).argsort(axis=1).argsort(axis=1) + 1  # continuous draws: no ties
    w = np.where(logs > 0, ranks, 0).sum(axis=1)
    null = np.array([sum(c) for k in range(n + 1) for c in itertools.combinations(range(1, n + 1), k)])
    p = (null[None, :] >= np.arange(n * (n + 1) // 2 + 1)[:, None]).mean(axis=1)[w]  # P(W >= w), every w at once
    faster = (np.median(np.exp(logs), axis=1) >= rule["faster"]["median_ratio"]) & (p <= rule["faster"]["p"])
    return float(faster.mean())


def shared_auc(record: dict, other: dict) -> float:
    """The area under `record`'s exact-match curve (the mean over its evaluations) up to the last step both runs
    evaluated: runs that stop when they reach the bar are compared over the steps both trained."""
    last = min(record["metrics"]["curve"][-1][0], other["metrics"]["curve"][-1][0])
    values = [e for step, e in record["metrics"]["curve"] if step <= last]
    return sum(values) / len(values)


def signed_rule(differences: list[float], margin: float, up: str, down: str, neither: str) -> str:
    if not differences:
        return "not run"
    if all(d > 0 for d in differences) and statistics.mean(differences) > margin:
        return up
    if all(d < 0 for d in differences) and statistics.mean(differences) < -margin:
        return down
    return neither


def lm_verdicts(lm: dict, margin: float) -> dict:
    out = {}
    base = by_seed(lm.get("vanilla", []))
    for arm, rows in lm.items():
        if arm == "vanilla":
            continue
        mine = by_seed(rows)
        seeds = sorted(s for s in set(base) & set(mine) if not base[s]["failed"] and not mine[s]["failed"])
        out[arm] = {}
        for metric in ("val_loss", "wiki_loss"):
            d = [mine[s]["metrics"][metric] - base[s]["metrics"][metric] for s in seeds]
            out[arm][metric] = dict(paired(d), differences=d, verdict=signed_rule(
                d, margin, "hurts", "helps", "no difference shown"))
    return out


def far_metric(evaluation: dict, far: list[int], metric: str = "log_likelihood") -> float:
    values = [c[metric] for c in evaluation["cells"] if c["length"] in far]
    return statistics.mean(values)


def length_verdicts(length: dict, settings: dict) -> dict:
    """Experiment 4: paired differences of the far log-likelihood against vanilla; log-n at inference is the control
    (its own rule), and an arm without an effect where the control has none too is "no power"."""
    base = by_seed(length.get("vanilla", []))
    far, margin = settings["far"], settings["margin"]
    rows = {arm: by_seed(r) for arm, r in length.items() if arm != "vanilla"}
    for name in settings.get("inference_arms", {}):
        rows[name] = {s: dict(r, metrics=r["metrics"][f"inference:{name}"]) for s, r in base.items()
                      if not r["failed"]}
    out = {}
    for arm, mine in rows.items():
        seeds = sorted(s for s in set(base) & set(mine) if not base[s]["failed"] and not mine[s].get("failed"))
        d = [far_metric(mine[s]["metrics"], far) - far_metric(base[s]["metrics"], far) for s in seeds]
        exact = [far_metric(mine[s]["metrics"], far, "exact") - far_metric(base[s]["metrics"], far, "exact")
                 for s in seeds]
        out[arm] = dict(paired(d), differences=d, exact=paired(exact),
                        verdict=signed_rule(d, margin, "helps", "hurts", "no effect shown"))
    learned = task_learned(length, settings)
    if not learned["any"]:  # D4: a metric where no arm learned the task has no power, whatever the control says
        for row in out.values():
            row["verdict"] = (f"no power (no arm retrieves at the training length: best exact match"
                              f" {learned['best_exact']:.2f}; {learned['below_chance']} of {learned['cells']} cells"
                              f" below chance, {learned['chance']:.1f} nats)")
        return out
    control = [out[name]["verdict"] for name in settings.get("inference_arms", {})]
    if control and all(v == "no effect shown" for v in control):
        for arm, row in out.items():
            if arm not in settings.get("inference_arms", {}) and row["verdict"] == "no effect shown":
                row["verdict"] = "no power (the positive control shows no effect either)"
    return out


def task_learned(length: dict, settings: dict, bar: float = 0.5) -> dict:
    """Whether any trained arm learned retrieval: mean exact match (over seeds and depths) at the training length at
    least `bar` (experiment 1's bar); with how many cells' answer log-likelihood lies below a uniform guess of a
    five-digit key (log 1/90,000)."""
    n = settings["lengths"][0]  # the first length evaluated is the training length
    runs = [r for rows in length.values() for r in rows if not r["failed"]]
    exact = [statistics.mean(c["exact"] for r in rows if not r["failed"] for c in r["metrics"]["cells"]
                             if c["length"] == n) for rows in length.values() if any(not r["failed"] for r in rows)]
    chance = -math.log(90_000)
    cells = [c["log_likelihood"] for r in runs for c in r["metrics"]["cells"]]
    best = max(exact, default=0.0)
    return dict(any=best >= bar, best_exact=best, chance=chance, cells=len(cells),
                below_chance=sum(v < chance for v in cells))


def ablation_interpretation(verdicts: dict, rule: dict) -> str:
    ssa = verdicts.get("ssa")
    if not ssa or not all(k in verdicts for k in ("ssa-position", "ssa-token", "ssa-query", "ssa-value")):
        return "not run"
    gain = ssa["mean"]
    if gain <= 0:
        return "SSA shows no gain over vanilla here: nothing to attribute"
    share = {arm: verdicts[arm]["mean"] / gain for arm in ("ssa-position", "ssa-token", "ssa-query", "ssa-value")}
    found = []
    for first, second, what in (("ssa-position", "ssa-token", "position terms"), ("ssa-token", "ssa-position",
                                "token terms"), ("ssa-query", "ssa-value", "query side"),
                                ("ssa-value", "ssa-query", "value side")):
        if share[first] >= rule["keeps"] and share[second] <= rule["loses"]:
            found.append(f"carried by the {what}")
    shares = ", ".join(f"{arm} keeps {s:.0%}" for arm, s in share.items())
    return ("; ".join(found) or "not separable with these seeds") + f" ({shares} of SSA's mean gain)"


# ---- the report -----------------------------------------------------------------------------------------------------

def report(grid: dict, results: dict, about: dict, folder: Path) -> str:
    lines = ["# The registered study: results", ""]
    lines += [f"Plan: study/plan.md, registered part SHA-256 {', '.join(h[:12] for h in about['made_under'])};"
              f" plan as of commit {about['commit'] or '(uncommitted: a --quick run)'}.",
              f"Decontamination dropped {about['dropped']['corpus_val']} corpus validation line(s) and"
              f" {about['dropped']['wiki']} Wikipedia line(s) that shared a 50-character string with training.", ""]
    if about["quick"]:
        lines += ["**Quick grid: a smoke test of the pipeline, not evidence.**", ""]
    lines += ["## Deviations from the registered plan (copied from study/plan.md)", "",
              about.get("deviations", "").strip() or "None.", ""]
    lines += tuning_section(results.get("tuning", {}))
    for part, section in (("speed", speed_section), ("lm", lm_section), ("length", length_section)):
        rows = {arm: r for arm, r in results.get(part, {}).items() if r}
        missing = not_run(results.get(part, {}), grid[part])
        body = section(rows, grid[part], folder, pending=bool(missing)) if rows else [f"## {TITLES[part]}", ""]
        if missing:
            body[2:2] = [f"**Incomplete: {len(missing)} of {len(grid[part]['seeds']) * len(grid[part]['arms'])} runs"
                         f" not made yet ({', '.join(missing)}); the verdicts wait for every seed.**", ""]
        lines += body
    lines += toys_section(results["toys"]) if results.get("toys") else [f"## {TITLES['toys']}", "", "Not run yet.", ""]
    return "\n".join(lines) + "\n"


TITLES = {"speed": "Experiment 1: speed of learning (primary)", "lm": "Experiment 3: language modelling",
          "length": "Experiment 4: length generalisation (NoPE), with the ablations of experiment 2",
          "toys": "Experiment 5: the toys"}


def not_run(rows: dict, settings: dict) -> list[str]:
    """The (arm, seed) runs of the grid that have no record, as "arm seed k"."""
    made = {(arm, r["spec"]["seed"]) for arm, records in rows.items() for r in records}
    return [f"{arm} seed {seed}" for seed in settings["seeds"] for arm in settings["arms"] if (arm, seed) not in made]


def pending_verdict(seeds: int, settings: dict) -> str:
    return f"pending ({seeds} of {len(settings['seeds'])} seeds)"


def tuning_section(tuned: dict) -> list[str]:
    lines = ["## Tuning (seed 0, not scored)", "", "| method | rates | final validation loss | T (steps) |",
             "|---|---|---|---|"]
    for method, records in tuned.items():
        shown = set()
        for r in records:
            rates = ", ".join(f"{k} {v:g}" for k, v in r["spec"]["rates"].items()) or "-"
            if rates in shown:  # a later stage's sweep includes the earlier best: one run, one row
                continue
            shown.add(rates)
            T = r["metrics"]["T"] if not r["failed"] else "failed"
            lines.append(f"| {method} | {rates} | {final_val_loss(r):.4f} | {T} |")
    lines.append("")
    for method, records in tuned.items():
        if records and records[0]["spec"]["rates"] or len(records) > 1:
            lines.append(f"Chosen for {method}: {tuned_rates(records, 0.002)}.")
    return lines + [""]


def speed_section(speed: dict, settings: dict, folder: Path, pending: bool = False) -> list[str]:
    lines = [f"## {TITLES['speed']}", "",
             "T = the first evaluated step with exact match >= 0.5 on held-out prompts (the cap when never). The"
             " area under the curve (AUC) of a pair is over the steps both runs trained.", "",
             "| arm | T per seed | learned parameters (last seed) |", "|---|---|---|"]
    for arm, rows in speed.items():
        Ts = ", ".join(str(r["metrics"]["T"]) if not r["failed"] else "failed" for r in rows)
        lines.append(f"| {arm} | {Ts} | {brief(rows[-1])} |")
    lines += ["", "| comparison | ratios per seed | median | geometric mean [95% interval] | Wilcoxon p (one-sided) |"
              " verdict | AUC difference |", "|---|---|---|---|---|---|---|"]
    pairs = [(arm, "vanilla") for arm in speed if arm != "vanilla"]
    pairs += [("ssa", arm) for arm in speed if arm not in ("vanilla", "ssa")]
    notes = []
    for arm, base in pairs:
        if base not in speed or arm not in speed:
            continue
        v = speed_verdict(speed[base], speed[arm], settings)
        verdict = pending_verdict(len(v["seeds"]), settings) if pending else v["verdict"]
        g, low, high = v["estimate"]
        lines.append(f"| {arm} against {base} | {', '.join(f'{r:.2f}' for r in v['ratios'])} | {v['median']:.2f} |"
                     f" {g:.2f}x [{low:.2f}, {high:.2f}] | {v['p']:.3f} | {verdict} | {fmt_paired(v['auc'])} |")
        if base == "vanilla" and len(v["ratios"]) > 1:
            n, bar = len(v["ratios"]), settings["faster"]["median_ratio"]
            refutes = speed_rule_refutes(bar, v["log_sd"], n, settings)
            power = {r: speed_rule_faster(r, v["log_sd"], n, settings) for r in (bar, PAPER_SPEEDUP)}
            notes.append(f"- {arm}: the interval excludes speed-ups above {high:.2f}x and slow-downs below {low:.2f}x"
                         f" (95%); at the measured spread (SD of log ratio {v['log_sd']:.2f}) the rule would refute a"
                         f" true {bar}x speed-up in {refutes:.0%} of repetitions, and its power (calling a true"
                         f" speed-up \"learns faster\") is {power[bar]:.0%} at {bar}x and {power[PAPER_SPEEDUP]:.0%} at"
                         f" the paper's {PAPER_SPEEDUP}x.")
    if notes:
        lines += ["", "The estimate is the geometric mean of the ratios with the t-interval of their logs; what the"
                  " data exclude, and how often the registered rule errs at its own bar:", "", *notes]
    plot_curves(speed, folder / "speed.png")
    return lines + ["", "![exact match against step](speed.png)", ""]


def brief(record: dict, fmt: str = ".3f") -> str:
    """The range over layers and heads of each kind of learned parameter: slopes per side, token-weight norms,
    gate-weight norms, Scalable-Softmax's and the constant temperature's scales; each figure in format `fmt`."""
    if record["failed"]:
        return "failed"
    return "; ".join(f"{kind} {min(v):{fmt}}-{max(v):{fmt}}" for kind, v in learned_kinds(record).items()) or "-"


def learned_kinds(record: dict) -> dict[str, list[float]]:
    """A record's learned parameters by kind (brief's names), over every layer and head; kinds without values left
    out."""
    learned, kinds = record["learned"], {}
    for side in ("query", "key", "value"):
        kinds[f"{side} slope"] = [v for layer in learned["slopes"] for v in layer.get(side, [])]
    for name, values in learned.items():
        for suffix, kind in (("query_temperature.token_weight", "query u norm"),
                             ("value_temperature.token_weight", "value u norm"),
                             ("key_temperature.token_weight", "key u norm"), ("gate.proj.weight", "gate norm"),
                             ("temperature.scale", "scale")):
            if name.endswith(suffix):
                kinds.setdefault(kind, []).extend(values)
    return {kind: v for kind, v in kinds.items() if v}


def lm_section(lm: dict, settings: dict, folder: Path, pending: bool = False) -> list[str]:
    lines = [f"## {TITLES['lm']}", "",
             "| arm | validation loss per seed | Wikipedia loss per seed | learned parameters (last seed) |",
             "|---|---|---|---|"]
    for arm, rows in lm.items():
        val, wiki = ([f"{r['metrics'][k]:.4f}" for r in rows if not r["failed"]] for k in ("val_loss", "wiki_loss"))
        lines.append(f"| {arm} | {', '.join(val)} | {', '.join(wiki)} | {brief(rows[-1])} |")
    lines += ["", "| arm against vanilla | validation: paired difference | verdict | Wikipedia: paired difference |"
              " verdict |", "|---|---|---|---|---|"]
    verdicts = lm_verdicts(lm, settings["margin"])
    for arm, v in verdicts.items():
        val, wiki = (pending_verdict(len(v[k]["differences"]), settings) if pending
                     else v[k]["verdict"] for k in ("val_loss", "wiki_loss"))
        lines.append(f"| {arm} | {fmt_paired(v['val_loss'], 4)} | {val} | {fmt_paired(v['wiki_loss'], 4)} | {wiki} |")
    lines += ["", f"Power of the rule at the paper's GPT-2 fine-tuning effect ({PAPER_GPT2_EFFECT:.4f} nats: perplexity"
              " 36.50 -> 34.62), from each arm's measured spread of paired differences (validation):", ""]
    for arm, v in verdicts.items():
        d = v["val_loss"]["differences"]
        if len(d) > 1:
            sd = statistics.stdev(d)
            lines.append(f"- {arm}: SD {sd:.4f} over {len(d)} seeds, power"
                         f" {sign_rule_power(PAPER_GPT2_EFFECT, sd, len(d), settings['margin']):.2f}")
    return lines + [""]


PAPER_GPT2_EFFECT = math.log(36.50 / 34.62)  # the paper's GPT-2 WikiText fine-tuning gain, in nats
PAPER_SPEEDUP = 1.45  # the speed-up of learning the paper's figures suggest (docs/study.md, experiment 1)


def length_section(length: dict, settings: dict, folder: Path, pending: bool = False) -> list[str]:
    verdicts = length_verdicts(length, settings)
    lines = [f"## {TITLES['length']}", "",
             f"Primary: the answer's log-likelihood averaged over the lengths {settings['far']} (nats), paired"
             " against vanilla. With 3 seeds the all-signs condition alone has p = 0.125.", "",
             "| arm | paired difference (nats) | verdict | exact match difference |", "|---|---|---|---|"]
    for arm, v in verdicts.items():
        verdict = pending_verdict(len(v["differences"]), settings) if pending else v["verdict"]
        lines.append(f"| {arm} | {fmt_paired(v)} | {verdict} | {fmt_paired(v['exact'])} |")
    carried = ("pending" if pending else ablation_interpretation(verdicts, settings["ablation"])
               if task_learned(length, settings)["any"] else "no power (no arm learned the task)")
    lines += ["", f"Which part of SSA carries it: {carried}.", ""]
    lines += ["| arm | exact match per length (mean over seeds and depths) |", "|---|---|"]
    for arm, rows in length.items():
        ok = [r for r in rows if not r["failed"]]
        if ok:
            per = {n: statistics.mean(c["exact"] for r in ok for c in r["metrics"]["cells"] if c["length"] == n)
                   for n in settings["lengths"]}
            lines.append(f"| {arm} | {', '.join(f'{n}: {e:.2f}' for n, e in per.items())} |")
    return lines + [""]


def toys_section(toys: dict) -> list[str]:
    lines = [f"## {TITLES['toys']}", ""]
    for variant, rows in toys["dilution"].items():
        ns = list(next(iter(rows.values()))[0])
        lines += [f"Dilution ({variant}): normalised error, mean over seeds", "",
                  "| arm | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for arm, errors in rows.items():
            lines.append(f"| {arm} | " + " | ".join(f"{statistics.mean(e[n] for e in errors):.3f}" for n in ns) + " |")
        learned = toys["learned"][variant]
        lines += ["", "Learned: " + "; ".join(f"{arm} {', '.join(f'{v:.3f}' for v in values)}"
                                              for arm, values in learned.items()), ""]
    lines += ["Value toy: normalised test error, mean and each seed", "", "| model | mean | each seed |",
              "|---|---|---|"]
    for kind, errors in toys["value"].items():
        lines.append(f"| {kind} | {statistics.mean(errors):.3f} | {', '.join(f'{e:.3f}' for e in errors)} |")
    return lines + [""]


def plot_curves(speed: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, reached) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (arm, rows) in enumerate(speed.items()):
        done = [r for r in rows if not r["failed"]]
        if not done:
            continue
        curves = [r["metrics"]["curve"] for r in done]
        color = f"C{i}"
        for c in curves:
            ax.plot([s for s, _ in c], [e for _, e in c], color=color, alpha=0.25, lw=0.8)
            ax.plot(*c[-1], "o", color=color, alpha=0.5, ms=3)  # where the run stopped (at T, or at the cap)
        shared = min(len(c) for c in curves)  # the median where every seed still trains
        median = [statistics.median(c[k][1] for c in curves) for k in range(shared)]
        ax.plot([s for s, _ in curves[0][:shared]], median, color=color, lw=2, label=arm)
        # runs stop at T, so past the first stop the median says little: the share of seeds at the bar by each step
        cap = done[0]["metrics"]["cap"]
        steps = sorted({s for c in curves for s, _ in c} | {cap})
        share = [sum(r["metrics"]["T"] <= s and r["metrics"]["T"] < r["metrics"]["cap"] for r in done) / len(done)
                 for s in steps]
        reached.step(steps, share, where="post", color=color, lw=2, label=f"{arm} ({len(done)} seeds)")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("exact match, held-out prompts")
    ax.set_title("each seed (thin), median while all train (thick)", fontsize=9)
    ax.legend()
    reached.set_xlabel("step")
    reached.set_ylabel("share of seeds with exact match >= 0.5")
    reached.set_ylim(-0.02, 1.02)
    reached.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
