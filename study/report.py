"""The study's report: paired differences, the verdicts by the rule of the grid, the tables and the plots."""

import math
import statistics
from pathlib import Path


def per_length(row: dict, metric: str) -> dict[int, float]:
    """A run's `metric` averaged over depths, per length."""
    lengths = sorted({c["length"] for c in row["cells"]})
    return {n: statistics.mean(c[metric] for c in row["cells"] if c["length"] == n) for n in lengths}


def mean_std(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def paired(differences: list[float]) -> dict:
    """Mean, standard error and sign count of paired differences (arm minus baseline, same seed)."""
    if not differences:
        return dict(mean=float("nan"), se=float("nan"), positive=0, negative=0, seeds=0)
    mean = statistics.mean(differences)
    se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    return dict(mean=mean, se=se, positive=sum(d > 0 for d in differences), negative=sum(d < 0 for d in differences),
                seeds=len(differences))


def far_gain(row: dict, base: dict, metric: str, lengths: list[int]) -> float:
    """The difference in `metric` between two runs, averaged over `lengths`."""
    a, b = per_length(row, metric), per_length(base, metric)
    return statistics.mean(a[n] - b[n] for n in lengths)


def verdict(length: dict, settings: dict, seeds_wanted: int = 3) -> dict:
    """The README's decision rule: SSA helps at length if SSA minus vanilla is at least 0.15 of exact match averaged
    over 4x and 8x the training length, with the same sign in every seed (`seeds_wanted` of them), and at most 0.05
    worse at 1x; it does not help if the difference is under 0.05 or the signs disagree; in between, more seeds are
    needed. Only seeds where both runs learned the task inside the training length are compared."""
    train = settings["lengths"][0]
    far = [n for n in settings["lengths"] if n >= 4 * train] or settings["lengths"][-1:]
    by_seed = {arm: {r["seed"]: r for r in rows} for arm, rows in length.items()}
    learned = learned_runs(length, settings)
    out = {}
    for arm in [a for a in length if a != "vanilla"]:
        seeds = sorted(set(learned[arm]) & set(learned["vanilla"]))
        if not seeds:
            out[arm] = dict(far_lengths=far, seeds=[], verdict="undecided: no seed where both runs learned the task")
            continue
        far_diff = paired([far_gain(by_seed[arm][s], by_seed["vanilla"][s], "exact", far) for s in seeds])
        near_diff = paired([far_gain(by_seed[arm][s], by_seed["vanilla"][s], "exact", [train]) for s in seeds])
        ll_diff = paired([far_gain(by_seed[arm][s], by_seed["vanilla"][s], "log_likelihood", far) for s in seeds])
        same_sign = not (far_diff["positive"] and far_diff["negative"])  # a zero difference disagrees with neither
        if len(seeds) < seeds_wanted and abs(far_diff["mean"]) >= 0.05:
            call = "undecided: more seeds"
        elif far_diff["mean"] >= 0.15 and far_diff["positive"] == far_diff["seeds"] and near_diff["mean"] >= -0.05:
            call = "helps"
        elif abs(far_diff["mean"]) < 0.05 or not same_sign:
            call = "does not help"
        else:
            call = "undecided: more seeds"
        if far_diff["mean"] <= -0.15 and far_diff["negative"] == far_diff["seeds"]:
            call = "hurts"
        out[arm] = dict(far_lengths=far, seeds=seeds, exact_far=far_diff, exact_train=near_diff,
                        log_likelihood_far=ll_diff, verdict=call)
    seeds = sorted(set(learned.get("ssa", [])) & set(learned.get("logn", [])))
    if seeds:
        out["ssa minus logn"] = dict(far_lengths=far, seeds=seeds, exact_far=paired(
            [far_gain(by_seed["ssa"][s], by_seed["logn"][s], "exact", far) for s in seeds]), log_likelihood_far=paired(
            [far_gain(by_seed["ssa"][s], by_seed["logn"][s], "log_likelihood", far) for s in seeds]))
    return out


def learned_runs(length: dict, settings: dict) -> dict[str, list[int]]:
    """The seeds of each arm that learned the task inside the training length (exact match >= learned_at)."""
    train = settings["lengths"][0]
    return {arm: [r["seed"] for r in rows if per_length(r, "exact")[train] >= settings["learned_at"]]
            for arm, rows in length.items()}


def fmt_paired(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:+.{digits}f} ± {d['se']:.{digits}f} ({d['positive']}+ / {d['negative']}- of {d['seeds']})"


def report(grid: dict, slopes: dict, length: dict, dilution: dict, value: dict, decisions: dict, quick: bool) -> str:
    settings = grid["length"]
    lengths = settings["lengths"]
    lines = [f"Grid: study/grid.yaml{' (--quick)' if quick else ''}; seeds {grid['seeds']} (paired).", "",
             "**1. Position slopes after pretraining (min / median / max over layers and heads)**", "",
             "| arm | validation loss | query slopes | value slopes |", "| --- | ---: | ---: | ---: |"]
    for arm, runs in slopes.items():
        cells = [" / ".join(f"{s[k]:.4f}" for k in ("min", "median", "max")) if s else "-"
                 for s in (runs[0]["slopes"].get("query"), runs[0]["slopes"].get("value"))]
        lines.append(f"| {arm} | {runs[0]['val_loss']:.4f} | {cells[0]} | {cells[1]} |")
    lines += ["", "**2. Length generalisation: passkey exact match (mean ± std over seeds and"
              f" {len(settings['depths'])} depths; trained at {lengths[0]} tokens)**", "",
              "| arm | " + " | ".join(f"{n} tokens" for n in lengths) + " | runs that learned the task |",
              "| --- |" + " ---: |" * (len(lengths) + 1)]
    learned = learned_runs(length, settings)
    for arm, rows in length.items():
        cells = [mean_std([per_length(r, "exact")[n] for r in rows], 2) for n in lengths]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {len(learned[arm])} of {len(rows)} |")
    lines += ["", "Answer log-likelihood (nats, mean over seeds and depths):", "",
              "| arm | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "| --- |" + " ---: |" * len(lengths)]
    for arm, rows in length.items():
        lines.append(f"| {arm} | " + " | ".join(
            f"{statistics.mean(per_length(r, 'log_likelihood')[n] for r in rows):.2f}" for n in lengths) + " |")
    bands = list(next(iter(length.values()))[0]["bands"])
    lines += ["", "Held-out corpus loss by position band (nats, mean ± std over seeds):", "",
              "| arm | " + " | ".join(bands) + " |", "| --- |" + " ---: |" * len(bands)]
    for arm, rows in length.items():
        lines.append(f"| {arm} | " + " | ".join(mean_std([r["bands"][b] for r in rows]) for b in bands) + " |")
    lines += ["", "Paired differences against vanilla (same seed, only seeds where both runs learned the task), at"
              f" {decisions[next(iter(decisions))]['far_lengths']} tokens (far) and at the training length, mean ±"
              " standard error (seeds above / below zero):", "",
              "| arm | seeds compared | exact match, far | exact match, training length | log-likelihood, far |"
              " verdict |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for arm, d in decisions.items():
        if "exact_far" not in d:
            lines.append(f"| {arm} | none | | | | {d['verdict']} |")
        elif arm == "ssa minus logn":
            lines.append(f"| SSA minus log-n at inference | {d['seeds']} | {fmt_paired(d['exact_far'])} | |"
                         f" {fmt_paired(d['log_likelihood_far'], 2)} | |")
        else:
            cells = [fmt_paired(d["exact_far"]), fmt_paired(d["exact_train"]), fmt_paired(d["log_likelihood_far"], 2)]
            lines.append(f"| {arm} | {d['seeds']} | " + " | ".join(cells) + f" | {d['verdict']} |")
    lines += ["", "Paired differences against vanilla at every length, all seeds (whether or not a run learned the"
              " task), exact match, mean ± standard error (seeds above / below zero):", "",
              "| arm | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "| --- |" + " ---: |" * len(lengths)]
    vanilla = {r["seed"]: per_length(r, "exact") for r in length["vanilla"]}
    for arm, rows in length.items():
        if arm != "vanilla":
            diffs = {n: paired([per_length(r, "exact")[n] - vanilla[r["seed"]][n] for r in rows]) for n in lengths}
            lines.append(f"| {arm} | " + " | ".join(fmt_paired(diffs[n], 2) for n in lengths) + " |")
    ssa_slopes = [r["slopes"] for r in length.get("ssa", []) if r.get("slopes")]
    if ssa_slopes:
        lines += ["", "Learned position slopes of the SSA arm (min / median / max over layers and heads; start 0.01):",
                  "", "| seed | query | value |", "| --- | ---: | ---: |"]
        for r in length["ssa"]:
            cells = [" / ".join(f"{r['slopes'][side][k]:.4f}" for k in ("min", "median", "max"))
                     if side in r["slopes"] else "-" for side in ("query", "value")]
            lines.append(f"| {r['seed']} | {cells[0]} | {cells[1]} |")
    test_n = grid["dilution"]["test_n"]
    for variant, rows in dilution.items():
        lines += ["", f"**3. Dilution toy, {variant} (squared error of the head's output / squared norm of the target,"
                  " mean ± std over"
                  f" {len(grid['dilution']['seeds'])} seeds; trained at n in {grid['dilution']['train_n']})**", "",
                  "| arm | " + " | ".join(f"n = {n}" for n in test_n) + " |", "| --- |" + " ---: |" * len(test_n)]
        for arm, errors in rows.items():
            lines.append(f"| {arm} | " + " | ".join(mean_std([e[str(n)] for e in errors]) for n in test_n) + " |")
    lines += ["", "**4. Value toy (test error / target variance, mean ± std over seeds)**", "",
              "| method | parameters beyond vanilla | normalised error |", "| --- | ---: | ---: |"]
    extra = {"naive average": "-", "vanilla attention": "0", "key gate": str(grid["toy"]["dim"]),
             "value temperature": str(grid["toy"]["dim"])}
    lines += [f"| {name} | {extra[name]} | {mean_std(errors)} |" for name, errors in value.items()]
    return "\n".join(lines) + "\n"


def plot(grid: dict, length: dict, dilution: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = grid["length"]["lengths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, rows in length.items():
        for ax, metric in zip(axes, ("exact", "log_likelihood")):
            means = [statistics.mean(per_length(r, metric)[n] for r in rows) for n in lengths]
            ax.plot(lengths, means, "o-", label=arm)
    for ax, label in zip(axes, ("passkey exact match", "answer log-likelihood (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens); trained at " + str(lengths[0]))
        ax.set_ylabel(label + " (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "length.png", dpi=120)
    plt.close(fig)
    test_n = grid["dilution"]["test_n"]
    fig, axes = plt.subplots(1, len(dilution), figsize=(5.5 * len(dilution), 4), squeeze=False)
    for ax, (variant, rows) in zip(axes[0], dilution.items()):
        for arm, errors in rows.items():
            ax.plot(test_n, [statistics.mean(e[str(n)] for e in errors) for n in test_n], "o-", label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keys n (trained at 8-64)")
        ax.set_ylabel("output error / target norm (squared)")
        ax.set_title(f"dilution toy: {variant}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "dilution.png", dpi=120)
    plt.close(fig)
    rows = [r for r in length.get("ssa", []) if r.get("slopes")]
    if rows:
        plot_slopes(rows, out_dir / "slopes.png", plt)


def plot_slopes(rows: list[dict], path: Path, plt) -> None:
    """Every learned slope of the SSA arm, by layer and side, one colour per side, seeds side by side."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for side, colour, shift in (("query", "tab:blue", -0.15), ("value", "tab:orange", 0.15)):
        for k, row in enumerate(rows):
            for layer, sides in enumerate(row["slopes"]["per_layer"]):
                heads = sides.get(side, [])
                ax.scatter([layer + shift + 0.05 * (k - 1)] * len(heads), [max(h, 1e-5) for h in heads], s=12,
                           color=colour, label=side if layer == 0 and k == 0 else None)
    ax.axhline(0.01, color="gray", linestyle="--", linewidth=1, label="start (0.01)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows[0]["slopes"]["per_layer"])))
    ax.set_xlabel("layer (seeds side by side)")
    ax.set_ylabel("learned position slope per head")
    ax.set_title("SSA's position slopes after training (length experiment)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


