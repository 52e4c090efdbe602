"""The registered fine-tuning study's statistics, rule and data split (study/finetune_study.py), each against an
independent reference written from its definition."""

import itertools
import json
import math
import statistics

import pytest

from lit_gpt.config import read_yaml
from study.finetune_study import (
    GRID,
    FinetuneStudy,
    best,
    interval,
    measured_section,
    movement,
    relative_differences,
    rule_power,
    sign_test_p,
    split_articles,
    tune,
    verdict,
    wilcoxon_p,
)

RULE = dict(margin=0.001, t_975_4=2.7764451051977987)


def brute_sign_p(d):
    """P(#negatives >= observed) when every nonzero difference's sign is a fair coin, counted over all sign vectors."""
    d = [x for x in d if x != 0]
    observed = sum(x < 0 for x in d)
    signs = list(itertools.product((-1, 1), repeat=len(d)))
    return sum(sum(s < 0 for s in v) >= observed for v in signs) / len(signs)


def brute_wilcoxon_p(d):
    """Mean ranks from counting (rank = #smaller + (#equal + 1) / 2); P(W- >= observed) over all sign vectors."""
    d = [x for x in d if x != 0]
    a = [abs(x) for x in d]
    ranks = [sum(y < x for y in a) + (sum(y == x for y in a) + 1) / 2 for x in a]
    observed = sum(r for r, x in zip(ranks, d) if x < 0)
    vectors = list(itertools.product((False, True), repeat=len(d)))
    return sum(sum(r for r, neg in zip(ranks, v) if neg) >= observed - 1e-12 for v in vectors) / len(vectors)


@pytest.mark.parametrize("d", [[-0.01, -0.02, -0.03, -0.04, -0.05], [-0.01, 0.02, -0.03, -0.04, 0.05],
                               [0.01, -0.01, 0.02, -0.02, 0.0], [-0.02, -0.02, 0.02, -0.01, -0.03],
                               [0.1, 0.2, 0.3, 0.4, 0.5], [-1e-4, 2e-4, -3e-4, 4e-4, -5e-4, 6e-4, -7e-4]])
def test_exact_tests_match_brute_force_counts(d):
    assert sign_test_p(d) == pytest.approx(brute_sign_p(d))
    assert wilcoxon_p(d) == pytest.approx(brute_wilcoxon_p(d))


def test_five_negative_pairs_give_one_in_thirty_two():
    d = [-0.001, -0.002, -0.003, -0.004, -0.005]
    assert sign_test_p(d) == wilcoxon_p(d) == 1 / 32


def test_interval_is_the_t_interval_of_the_mean():
    d = [-0.003, -0.001, -0.002, -0.004, 0.0005]
    mean, low, high = interval(d, RULE["t_975_4"])
    half = 2.7764451051977987 * statistics.stdev(d) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((sum(d) / 5, sum(d) / 5 - half, sum(d) / 5 + half))


def test_rule_needs_every_seed_below_zero_and_the_mean_past_the_margin():
    assert verdict([-0.002] * 5, RULE, 5, power=True) == "lower"
    assert verdict([0.002] * 5, RULE, 5, power=True) == "higher"
    assert verdict([-0.002] * 4 + [0.0001], RULE, 5, power=True) == "no difference shown"  # one seed the other way
    assert verdict([-0.0005] * 5, RULE, 5, power=True) == "no difference shown"  # inside the margin
    assert verdict([-0.002] * 4, RULE, 5, power=True).startswith("pending")
    assert verdict([-0.002] * 5, RULE, 5, power=False).startswith("no power")


def test_relative_differences_pair_by_seed():
    a = {1: dict(test_ppl=9.9), 2: dict(test_ppl=10.2), 3: dict(test_ppl=7.0)}
    b = {1: dict(test_ppl=10.0), 2: dict(test_ppl=10.0)}
    assert relative_differences(a, b) == pytest.approx({1: -0.01, 2: 0.02})


def test_rule_power_matches_the_normal_formula_without_a_margin():
    """With margin 0 the rule says "lower" iff every draw is negative: power = Phi(effect / sd)^n."""
    for effect, sd, n in ((0.001, 0.001, 5), (0.002, 0.001, 5), (0.0005, 0.001, 3)):
        exact = (0.5 * (1 + math.erf(effect / sd / math.sqrt(2)))) ** n
        assert rule_power(effect, sd, n, margin=0.0) == pytest.approx(exact, abs=0.005)
    assert rule_power(0.001, 0.0001, 5, margin=0.002) < 0.001  # the margin binds when every seed agrees


def test_tuning_picks_the_lowest_loss_and_the_smaller_rate_within_the_tie():
    def rec(lr, loss, failed=False):
        return dict(spec=dict(rates=dict(learning_rate=lr)), val_loss=loss, failed=failed)

    assert best([rec(1e-5, 3.0), rec(3e-5, 2.9), rec(1e-4, 2.95)], tie=0.0005) == dict(learning_rate=3e-5)
    assert best([rec(1e-5, 2.9003), rec(3e-5, 2.9), rec(1e-4, 2.8, failed=True)], tie=0.0005) == \
        dict(learning_rate=1e-5)


class SweepStudy:
    """Stands in for FinetuneStudy in `tune`: the validation loss of a run is a given function of its rates, and every
    run asked for is logged (a record asked for twice is made once, as the real runner reuses records)."""

    def __init__(self, loss):
        self.grid, self.loss, self.made = read_yaml(GRID, "grid"), loss, {}

    def run(self, part, arm, seed, rates, steps, train=True):
        key = (arm, tuple(sorted(rates.items())))
        if key not in self.made:
            self.made[key] = dict(spec=dict(arm=arm, seed=seed, rates=rates, max_steps=steps), failed=False,
                                  val_loss=self.loss(arm, rates))
        return self.made[key]

    def in_parallel(self, jobs):
        return [job() for job in jobs]


def test_ssa_second_stage_compares_the_carried_token_rate():
    """Deviation D1: with the token rate carried from stage 1 (1e-4) best, stage 2 keeps it; at b3cc8df it could only
    pick 1e-3 or 1e-2."""
    def loss(arm, rates):
        base = abs(math.log10(rates["learning_rate"]) + 4)  # vanilla's and every closing sweep's best: 1e-4
        if arm == "vanilla":
            return 3.0 + base
        return 2.9 + base + abs(math.log10(rates["ssa_position_lr"]) + 2) + abs(math.log10(rates["ssa_token_lr"]) + 4)

    study = SweepStudy(loss)
    rates, records = tune(study, "ssa", train=True)
    assert rates == dict(learning_rate=1e-4, ssa_position_lr=1e-2, ssa_token_lr=1e-4)
    token_rates = sorted({r["spec"]["rates"]["ssa_token_lr"] for r in records})
    assert token_rates == [1e-4, 1e-3, 1e-2]
    # the carried run is reused, not run again: 3 (stage 1) + 2 (stage 2) + 3 (the other backbone rates) SSA runs
    assert sum(arm == "ssa" for arm, _ in study.made) == 3 + 2 + len(study.grid["tuning"]["backbone"]) - 1


def test_every_backbone_sweep_includes_3e4_deviation_d2():
    """Deviation D2: vanilla's sweep and each arm's closing backbone sweep include 3e-4, which wins here."""
    def loss(arm, rates):
        return 3.0 - rates["learning_rate"] * 100 + sum(v for k, v in rates.items() if k != "learning_rate")

    for arm in ("vanilla", "constant", "gate"):
        study = SweepStudy(loss)
        rates, records = tune(study, arm, train=True)
        assert rates["learning_rate"] == 3e-4
        assert 3e-4 in {r["spec"]["rates"]["learning_rate"] for r in records if r["spec"]["arm"] == arm}


def test_reused_records_must_carry_the_registered_plan_and_a_known_grid(tmp_path):
    """Deviation D3: a record made under another plan or grid is refused; one from the registered grid version is
    reused."""
    grid = read_yaml(GRID, "grid")
    study = FinetuneStudy(grid, tmp_path, tmp_path / "out", tmp_path / "records")
    spec = dict(arm="vanilla", seed=0, rates=dict(learning_rate=1e-4), max_steps=100)
    path = tmp_path / "records" / "tuning" / "vanilla-learning_rate=0.0001-seed0.json"
    path.parent.mkdir(parents=True)

    def reuse(**hashes):
        path.write_text(json.dumps(dict(spec=spec, failed=False, val_loss=3.0, **hashes)))
        return study.run("tuning", "vanilla", 0, dict(learning_rate=1e-4), 100, train=False)

    plan = study.hashes["plan_sha256"]
    assert reuse(plan_sha256=plan, grid_sha256=study.hashes["grid_sha256"])["val_loss"] == 3.0
    assert reuse(plan_sha256=plan, grid_sha256=grid["earlier_grids"][0])["val_loss"] == 3.0
    with pytest.raises(ValueError, match="grid"):
        reuse(plan_sha256=plan, grid_sha256="0" * 64)
    with pytest.raises(ValueError, match="plan"):
        reuse(plan_sha256="0" * 64, grid_sha256=study.hashes["grid_sha256"])


def test_a_failed_run_is_retried_from_scratch_unless_another_process_holds_its_folder(tmp_path, monkeypatch):
    """The plan runs a failed run once more from the start, deleting its folder; a folder that a live run holds (one
    an earlier runner left) is refused in one line and kept, where the runner once deleted it under that run."""
    import sys

    from lit_gpt.checkpoint import RunLock

    study = FinetuneStudy(read_yaml(GRID, "grid"), tmp_path, tmp_path / "out", tmp_path / "records")
    calls = []

    def failing(arm, seed, rates, steps, folder):
        calls.append(folder)
        (folder / "partial.txt").parent.mkdir(parents=True, exist_ok=True)
        (folder / "partial.txt").write_text("a step of training")
        return [sys.executable, "-c", "raise SystemExit(1)"]

    monkeypatch.setattr(study, "command", failing)
    folder = tmp_path / "out" / "tuning" / "vanilla-learning_rate=0.0001-seed0"
    lock = RunLock(folder)  # another run holds the folder
    try:
        with pytest.raises(FileExistsError, match=f"in use by another process \\({lock.path.read_text()}\\)"):
            study.run("tuning", "vanilla", 0, dict(learning_rate=1e-4), 100)
        assert (folder / "partial.txt").is_file() and len(calls) == 1
        assert not (tmp_path / "records" / "tuning").exists()
    finally:
        lock.release()
    record = study.run("tuning", "vanilla", 0, dict(learning_rate=1e-4), 100)  # nobody holds it: two attempts
    assert record["failed"] is True and len(calls) == 3 and not folder.exists()


def test_the_grid_registers_five_paired_seeds_disjoint_from_the_tuning_seed():
    grid = read_yaml(GRID, "grid")
    assert len(grid["seeds"]) >= 4 and grid["tuning"]["seed"] not in grid["seeds"]
    assert set(grid["order"]) == set(grid["arms"]) and grid["order"][0] == "vanilla"


def test_scored_text_shares_no_50_character_string_with_the_training_text():
    """Brute force, independent of the study's hashing: every 50-character string of every kept validation and test
    article, against every 50-character string of every training article."""
    grid = read_yaml(GRID, "grid")
    texts = split_articles(grid["data"])
    train, val, test = texts["train"], texts["val"], texts["test"]
    assert len(train) > 1000 and len(val) > 100 and len(test) > 100
    assert not set(train) & set(test) and not set(train) & set(val)
    seen = {hash(t[i:i + 50]) for t in train for i in range(len(t) - 49)}

    def shared(documents):
        return [d[i:i + 50] for d in documents for i in range(len(d) - 49) if hash(d[i:i + 50]) in seen]

    assert shared(val + test) == []
    long = max(train, key=len)
    assert long[100:150] in shared([test[0][:30] + long[100:160]])  # the check finds a planted leak


def test_movement_reports_each_parameter_against_its_start():
    """The largest change of a slope is relative to SSA's fine-tuning start (6e-4); of a token weight norm, its largest
    value (it starts at 0); of the constant's scale, relative to 1."""
    ssa = dict(failed=False, learned={"slopes": [{"query": [0.0006, 0.00066]}, {"query": [0.00057, 0.0006]}],
                                      "transformer.h.0.attn.query_temperature.token_weight": [0.0, 0.02]})
    constant = dict(failed=False, learned={"slopes": [{}], "transformer.h.0.attn.query_temperature.scale": [0.98, 1.0]})
    rows = {line.split(" | ")[1]: line for line in movement({"ssa": {1: ssa}, "constant": {1: constant}})
            if line.startswith("| ssa") or line.startswith("| constant")}
    assert rows["query slope"].endswith("| 10.0% of the start |")
    assert rows["query u norm"].endswith("| 0.02 (from 0) |")
    assert rows["scale"].endswith("| 2.0% of the start |")
    assert movement({"vanilla": {1: dict(failed=False, learned={"slopes": [{}]})}}) == []


def test_measured_section_sets_a_rerun_beside_its_committed_run(tmp_path):
    grid = read_yaml(GRID, "grid")
    study = FinetuneStudy(grid, tmp_path, tmp_path / "out", tmp_path / "records")
    assert measured_section(study, {}) == []
    terms = {"query": {name: dict(mean=0.001, p99=0.002, max=0.003) for name in ("tau - 1", "position term",
                                                                                  "token term")}}
    record = dict(arm="ssa", seed=1, checkpoint="out/ssa-rerun/seed1/final", split="test", cpu="AMD EPYC",
                  code_commit="bce1cf7" + "0" * 33, terms=terms, loss={"learned": 3.0, "neither (vanilla)": 3.001},
                  ppl={"learned": math.exp(3.0), "neither (vanilla)": math.exp(3.001)})
    (tmp_path / "records" / "measured").mkdir(parents=True)
    (tmp_path / "records" / "measured" / "ssa-seed1.json").write_text(json.dumps(record))
    text = "\n".join(measured_section(study, {"ssa": {1: dict(test_ppl=20.5)}}))
    assert f"test perplexity {math.exp(3.0):.6f}, the committed run's 20.500000." in text
    assert "| neither (vanilla) | 3.001000 | +0.001000 |" in text
    assert "| query | abs(token term) | 1.00e-03 | 2.00e-03 | 3.00e-03 |" in text
    (tmp_path / "records" / "reruns").mkdir()
    rerun = dict(code_commit="bce1cf7" + "0" * 33, cpu="AMD EPYC", threads=1, test_ppl=math.exp(3.0))
    (tmp_path / "records" / "reruns" / "ssa-seed1.json").write_text(json.dumps(rerun))
    text = "\n".join(measured_section(study, {"ssa": {1: dict(test_ppl=math.exp(3.0))}}))
    assert "by the study's runner at code bce1cf7 (AMD EPYC, 1 thread(s))" in text
    assert "(the same to every digit recorded)" in text
    gate = dict(arm="gate", addition="gate", seed=1, checkpoint="out/gate-rerun/seed1/final", split="test",
                cpu="AMD EPYC", code_commit="bce1cf7" + "0" * 33,
                terms={"gate": {"g - 1": dict(mean=0.01, p99=0.05, max=0.2)}}, gate_range=dict(lowest=0.8, highest=1.2),
                loss={"learned": 3.0, "gate off, W = 0 (vanilla)": 3.002},
                ppl={"learned": math.exp(3.0), "gate off, W = 0 (vanilla)": math.exp(3.002)})
    (tmp_path / "records" / "measured" / "gate-seed1.json").write_text(json.dumps(gate))
    text = "\n".join(measured_section(study, {"ssa": {1: dict(test_ppl=math.exp(3.0))}}))
    assert "### gate, seed 1" in text and "no committed record to compare" in text
    assert "| gate | abs(g - 1) | 1.00e-02 | 5.00e-02 | 2.00e-01 |" in text
    assert "g ranges over [0.8000, 1.2000]." in text and "| gates | test loss, nats |" in text
