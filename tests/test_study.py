"""study/reproduce.py: the reduced grid end to end, the registered rules against hand-worked cases, the plan's
registration check, and the leakage test (no validation text of the study shares a 50-character string with the
training text of its experiment)."""

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from study.report import (
    ablation_interpretation,
    length_verdicts,
    lm_verdicts,
    report,
    speed_rule_faster,
    speed_verdict,
    tuned_rates,
    wilcoxon_greater,
)
from study.reproduce import check_plan, flags, load_grid, plan_hash
from study.toys import value_batch

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "study" / "grid.yaml"


def test_quick_grid_runs_every_part(tmp_path):
    command = [sys.executable, str(ROOT / "study" / "reproduce.py"), "--quick", "--out_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "out" / "runs"
    grid = load_grid(GRID, quick=True)
    speed = sorted(p.name for p in (runs / "speed").glob("*.json"))
    assert len(speed) == len(grid["speed"]["arms"]) * len(grid["speed"]["seeds"])
    record = json.loads(next((runs / "speed").glob("ssa-*-seed1.json")).read_text())
    assert record["plan_sha256"] == plan_hash((ROOT / "study" / "plan.md").read_text())
    steps = [s for s, _ in record["metrics"]["curve"]]
    assert steps == list(range(10, 21, 10)) and 0 <= record["metrics"]["auc"] <= 1
    assert record["spec"]["rates"] == {"ssa_position_lr": 0.03}  # the one-value quick sweep's choice
    assert any(v > 0 for layer in record["learned"]["slopes"] for v in layer["query"])  # printed, not assumed
    length = json.loads((runs / "length" / "vanilla-seed1.json").read_text())
    assert {c["length"] for c in length["metrics"]["inference:logn"]["cells"]} == {128, 192}
    lm = json.loads((runs / "lm" / "ssa-ssa_position=0.03-seed1.json").read_text())
    assert lm["metrics"]["val_loss"] > 0 and lm["metrics"]["wiki_loss"] > 0
    toys = json.loads((runs / "toys" / "toys.json").read_text())
    assert set(toys["value"]) >= {"key gate, bounded", "oracle value temperature"}
    report = (runs / "results.md").read_text()
    for heading in ("Tuning", "Experiment 1", "Experiment 3", "Experiment 4", "Experiment 5"):
        assert heading in report
    assert (runs / "speed.png").stat().st_size > 0 and not list((tmp_path / "out" / "speed").glob("*/step-*"))
    again = subprocess.run(command, capture_output=True, text=True)  # every record is reused: nothing trains
    assert again.returncode == 0 and "(attempt" not in again.stdout and " s)" not in again.stdout


def test_the_report_refuses_a_plan_changed_after_its_runs_unless_a_deviation_names_it():
    plan = "# Plan\nseeds 1-6\n\n## Deviations\n\nNone yet.\n"
    records = [{"plan_sha256": plan_hash(plan)}]
    assert check_plan(records, plan + "D1: a typo fixed\n") == [plan_hash(plan)]  # deviations are not registered
    changed = plan.replace("1-6", "1-4")
    with pytest.raises(ValueError, match="changed after runs were made"):
        check_plan(records, changed)
    listed = changed.replace("None yet.", f"D1 ({plan_hash(changed)[:12]}): four seeds, the budget.")
    assert check_plan(records, listed) == [plan_hash(plan)]


def test_wilcoxon_matches_hand_counted_cases():
    assert wilcoxon_greater([1, 2, 3, 4, 5, 6]) == 1 / 64  # all positive: only the all-plus pattern reaches W = 21
    assert wilcoxon_greater([-1, 2, 3, 4, 5, 6]) == 2 / 64  # W = 20: {all plus} and {all but rank 1}
    assert wilcoxon_greater([1, -2, 3]) == 3 / 8  # W = 4; rank sets reaching 4: {1,3}, {2,3}, {1,2,3}
    assert wilcoxon_greater([0, 0]) == 1.0 and wilcoxon_greater([2, -2]) == 3 / 4  # tied ranks 1.5 each


def record(seed, exact=0.0, **metrics):
    """A run's record; `exact` is its exact match at every evaluation, unless `curve` is given."""
    metrics.setdefault("curve", [[step, exact] for step in range(50, 1201, 50)])
    return {"spec": {"seed": seed, "train": {"max_steps": 1200}, "evaluation": {"curve": {"every": 50}},
                     "rates": {}}, "failed": False, "metrics": metrics, "val_loss": [[0, 9.0], [100, 5.0]]}


RULE = {"faster": {"median_ratio": 1.25, "p": 0.05}, "refuted": {"median_ratio": 1.1}}


def test_speed_rule_by_the_registered_thresholds():
    vanilla = [record(s, T=600, cap=1250, exact=0.4) for s in range(1, 7)]
    faster = [record(s, T=400, cap=1250, exact=0.5) for s in range(1, 7)]
    v = speed_verdict(vanilla, faster, RULE)
    assert v["verdict"] == "learns faster" and v["median"] == 1.5 and v["p"] == 1 / 64
    assert v["auc"]["mean"] == pytest.approx(0.1)
    same = [record(s, T=600 if s % 2 else 550, cap=1250, exact=0.4) for s in range(1, 7)]
    assert speed_verdict(vanilla, same, RULE)["verdict"].startswith("refuted")
    mixed = [record(s, T=t, cap=1250, exact=0.4) for s, t in zip(range(1, 7), (300, 300, 400, 700, 700, 450))]
    v = speed_verdict(vanilla, mixed, RULE)
    assert v["verdict"].startswith("inconclusive") and "more seed" in v["verdict"]  # median 1.42, p = 5/64
    never = [record(s, T=1250, cap=1250, exact=0.0) for s in range(1, 7)]
    assert speed_verdict(never, never, RULE)["verdict"].startswith("no power")
    failed = dict(record(3), failed=True)
    ratios = speed_verdict(vanilla, faster[:2] + [failed] + faster[3:], RULE)["ratios"]
    assert ratios[2] == pytest.approx(600 / 1250)  # a failed run counts as the cap, not as dropped
    assert speed_verdict(never, never[:2] + [failed] + never[3:], RULE)["verdict"].startswith("no power")
    stopped = [record(s, T=100, cap=1250, curve=[[50, 0.3], [100, 0.6]]) for s in range(1, 7)]
    slow = [record(s, T=150, cap=1250, curve=[[50, 0.1], [100, 0.2], [150, 0.5]]) for s in range(1, 7)]
    assert speed_verdict(slow, stopped, RULE)["auc"]["mean"] == pytest.approx(0.3)  # over steps 50-100 only


def test_a_report_before_every_seed_ran_names_the_missing_runs_and_draws_no_verdict(tmp_path):
    grid = load_grid(GRID, quick=False)
    made = {arm: [dict(record(1, T=T, cap=6050, exact=0.6), learned={"slopes": []})]
            for arm, T in (("vanilla", 3000), ("ssa", 1500))}
    about = dict(made_under=["0" * 64], commit="abc", quick=False, dropped={"corpus_val": 0, "wiki": 0},
                 deviations="- D9: a deviation")
    text = report(grid, {"tuning": {}, "speed": made, "lm": {}, "length": {}, "toys": None}, about, tmp_path)
    assert "Incomplete: 28 of 30 runs" in text and "gated seed 1" in text and "vanilla seed 6" in text
    assert "pending (1 of 6 seeds)" in text and "learns faster" not in text and "refuted" not in text
    assert "- D9: a deviation" in text and "Experiment 5: the toys\n\nNot run yet." in text


def test_lm_rule_every_seed_and_the_margin():
    base = [record(s, val_loss=4.0, wiki_loss=6.0) for s in (1, 2, 3, 4)]
    helps = [record(s, val_loss=3.95 - 0.01 * s, wiki_loss=6.0 + 0.001 * (-1) ** s) for s in (1, 2, 3, 4)]
    v = lm_verdicts({"vanilla": base, "ssa": helps}, 0.01)["ssa"]
    assert v["val_loss"]["verdict"] == "helps" and v["wiki_loss"]["verdict"] == "no difference shown"
    small = [record(s, val_loss=3.995, wiki_loss=6.5) for s in (1, 2, 3, 4)]
    v = lm_verdicts({"vanilla": base, "ssa": small}, 0.01)["ssa"]
    assert v["val_loss"]["verdict"] == "no difference shown" and v["wiki_loss"]["verdict"] == "hurts"


def cells(log_likelihood, exact=0.0):
    return {"cells": [{"length": n, "depth": 0.5, "exact": exact, "log_likelihood": log_likelihood}
                      for n in (128, 256)]}


def test_length_rule_reports_no_power_when_the_positive_control_shows_nothing():
    settings = {"far": [256], "margin": 0.5, "inference_arms": {"logn": {"of": "vanilla"}}, "lengths": [128, 256]}

    def vanilla(control, exact=0.9):
        control_cells = {"inference:logn": cells(-10.0 + control, exact)}
        return [record(s, **cells(-10.0, exact), **control_cells) for s in (1, 2, 3)]

    flat = [record(s, **cells(-10.0 + 0.1 * s, 0.9)) for s in (1, 2, 3)]
    v = length_verdicts({"vanilla": vanilla(control=0.0), "ssa": flat}, settings)
    assert v["logn"]["verdict"] == "no effect shown" and v["ssa"]["verdict"].startswith("no power")
    v = length_verdicts({"vanilla": vanilla(control=2.0), "ssa": flat}, settings)
    assert v["logn"]["verdict"] == "helps" and v["ssa"]["verdict"] == "no effect shown"  # the metric can move
    gain = [record(s, **cells(-8.0, 0.9)) for s in (1, 2, 3)]
    assert length_verdicts({"vanilla": vanilla(control=0.0), "ssa": gain}, settings)["ssa"]["verdict"] == "helps"


def test_length_rule_reports_no_power_when_no_arm_retrieves_at_the_training_length():
    """D4: a gain on a task no arm learned (exact match below 0.5 at the training length) is "no power", even where
    the positive control passes."""
    settings = {"far": [256], "margin": 0.5, "inference_arms": {"logn": {"of": "vanilla"}}, "lengths": [128, 256]}
    base = [record(s, **cells(-20.0, 0.04), **{"inference:logn": cells(-18.0, 0.04)}) for s in (1, 2, 3)]
    gain = [record(s, **cells(-15.0, 0.04)) for s in (1, 2, 3)]
    v = length_verdicts({"vanilla": base, "ssa": gain}, settings)
    assert v["ssa"]["verdict"].startswith("no power") and v["logn"]["verdict"].startswith("no power")
    assert v["ssa"]["mean"] == pytest.approx(5.0)  # the differences are still reported
    learned = [record(s, **cells(-15.0, 0.6)) for s in (1, 2, 3)]
    assert length_verdicts({"vanilla": base, "ssa": learned}, settings)["ssa"]["verdict"] == "helps"


def test_speed_rule_power_matches_the_rule_applied_draw_by_draw():
    """The vectorised power of experiment 1's "learns faster" against the rule itself (median and the exact Wilcoxon
    test of wilcoxon_greater) applied to each of the same draws; no effect gives about the test's own level."""
    import numpy as np

    rule = {"faster": {"median_ratio": 1.25, "p": 0.05}}
    for ratio, sd, n in ((1.25, 0.49, 6), (1.45, 0.3, 5), (1.0, 0.4, 6)):
        logs = np.random.default_rng(0).normal(math.log(ratio), sd, size=(2000, n))
        direct = statistics.mean(float(np.median(np.exp(row)) >= 1.25 and wilcoxon_greater(list(row)) <= 0.05)
                                 for row in logs)
        assert speed_rule_faster(ratio, sd, n, rule, draws=2000) == pytest.approx(direct, abs=1e-12)
    assert speed_rule_faster(1.0, 0.49, 6, rule) < 0.05 < speed_rule_faster(1.45, 0.49, 6, rule)


def test_t_quantile_matches_the_tables():
    from study.report import t_quantile

    for df, q in ((4, 2.7764), (5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)


def test_ablation_rule_names_the_part_that_keeps_the_gain():
    rows = {"ssa": {"mean": 2.0}, "ssa-position": {"mean": 1.8}, "ssa-token": {"mean": 0.2},
            "ssa-query": {"mean": 1.0}, "ssa-value": {"mean": 1.0}}
    text = ablation_interpretation(rows, {"keeps": 0.75, "loses": 0.25})
    assert text.startswith("carried by the position terms") and "query side" not in text.split("(")[0]


def test_tuning_picks_the_lowest_loss_and_the_smaller_rate_within_the_tie():
    def run(rate, loss):
        return {"spec": {"rates": {"ssa_position_lr": rate}}, "failed": False, "val_loss": [[0, 9.0], [1, loss]]}

    assert tuned_rates([run(0.003, 4.0), run(0.03, 3.9), run(0.3, 4.2)], 0.002) == {"ssa_position_lr": 0.03}
    assert tuned_rates([run(0.003, 3.901), run(0.03, 3.9)], 0.002) == {"ssa_position_lr": 0.003}
    assert tuned_rates([dict(run(0.3, 1.0), failed=True), run(0.03, 3.9)], 0.002) == {"ssa_position_lr": 0.03}


def test_flags_spell_values_as_the_cli_reads_them():
    assert flags("train.", {"max_steps": 3, "save_interval": None, "learning_rate": 0.003}) == [
        "--train.max_steps", "3", "--train.save_interval", "null", "--train.learning_rate", "0.003"]
    assert flags("model.", {"ssa_value": "token", "attention_temperature": "ssa"}) == [
        "--model.ssa_value", "token", "--model.attention_temperature", "ssa"]


def test_every_arm_of_an_experiment_runs_on_the_same_budget_and_the_plan_s_settings():
    grid = load_grid(GRID, quick=False)
    assert "max_steps" not in json.dumps(grid["arms"]) and "lr" not in json.dumps(grid["arms"])
    assert grid["models"]["nope"]["position_embedding"] == "none" and "position_embedding" not in grid["models"][
        "retrieval"]
    assert len(grid["speed"]["seeds"]) >= 6 and len(grid["lm"]["seeds"]) >= 4
    assert grid["tuning"]["seed"] not in grid["speed"]["seeds"] + grid["lm"]["seeds"] + grid["length"]["seeds"]
    assert set(grid["speed"]["arms"]) == {"vanilla", "ssa", "gated", "selective", "ssmax"}
    # D2: experiments 1 and 4 on the 9,600-step schedule, 1 stopped at the bar or 6,000 steps, 4 at 4,800
    assert grid["tuning"]["contingency"] == {"max_steps": 6000, "lr_decay_steps": 9600}
    assert grid["length"]["train"] == {"max_steps": 4800, "lr_decay_steps": 9600}
    assert grid["speed"]["curve"]["part_steps"] == 500


LEAK = 50


def shares_a_string(validation: list[str], training: list[str]) -> str | None:
    """Brute force, independent of study.data's hashing: every LEAK-character window of the validation texts in a
    set, every window of the training texts looked up in it. Returns a shared string, or None."""
    windows = {v[i : i + LEAK] for v in validation for i in range(len(v) - LEAK + 1)}
    for text in training:
        for i in range(len(text) - LEAK + 1):
            if text[i : i + LEAK] in windows:
                return text[i : i + LEAK]
    return None


def keys_in(texts: list[str]) -> set[str]:
    """Every pass key written in the texts (the digits after "The pass key is")."""
    return {k for t in texts for k in re.findall(r"The pass key is (\d+)", t)}


def test_no_validation_text_or_key_appears_in_training(tmp_path):
    """Every experiment of the registered grid, with the study's own tokenizer (trained on the corpus training split,
    as study/reproduce.py makes it): the corpus validation text and the Wikipedia sample against the corpus training
    text (experiment 3); the retrieval mix's validation split and every evaluation prompt against the mix's training
    documents (experiments 1, 2, 4), their text and their keys."""
    from lit_gpt.tokenizer import Tokenizer
    from study.data import mix_texts, prepare_folder, study_texts
    from study.tasks import HELD_OUT_FILLER, TRAINING_FILLER, evaluation_cells, held_out_key, training_length_prompts

    grid = load_grid(GRID, quick=False)
    settings = grid["data"]
    texts = study_texts(settings)
    train, val = texts["corpus"]
    assert len(val) > 0.015 * len(train) and len(texts["wiki"]) > 100
    assert shares_a_string(val + texts["wiki"], train) is None
    corpus = prepare_folder(tmp_path / "corpus", train, val, dict(settings, part="corpus"),
                            train_tokenizer=settings["vocab"])
    tokenizer = Tokenizer(corpus)  # the study's tokenizer: the prompts' lengths, hence their filler, depend on it
    assert tokenizer.vocab_size == settings["vocab"]
    mix_train, mix_val = mix_texts(tokenizer, settings, texts["corpus"])
    assert len(mix_train) >= settings["documents"]
    prompts = [tokenizer.decode(torch.cat(pair)) for pair in training_length_prompts(tokenizer, 128, 128, seed=5)]
    prompts += [tokenizer.decode(torch.cat(pair)) for cell in evaluation_cells(
        tokenizer, grid["length"]["lengths"], grid["length"]["depths"], grid["length"]["keys"], seed=0)
        for pair in cell["examples"]]
    assert shares_a_string(mix_val + prompts, mix_train) is None
    assert not set(TRAINING_FILLER) & set(HELD_OUT_FILLER)
    training_keys, held_out_keys = keys_in(mix_train), keys_in(mix_val + prompts)
    assert len(training_keys) > 1000 and len(held_out_keys) > 100
    assert not training_keys & held_out_keys
    assert all(held_out_key(int(k)) for k in held_out_keys) and not any(held_out_key(int(k)) for k in training_keys)
    leaky = mix_train[0][:LEAK]  # the checks themselves find a planted leak, of text and of a key
    assert shares_a_string([mix_val[0] + leaky], mix_train) == leaky
    held_out = sorted(held_out_keys)[0]  # a held-out key planted into one training document is caught
    planted = [mix_train[0] + f" The pass key is {held_out}. Remember it.", *mix_train[1:]]
    assert keys_in(planted) & held_out_keys == {held_out}


def test_retrieval_answers_follow_their_prompts_token_for_token(tmp_path):
    from lit_gpt.data.prepare import GPT2_TOKENIZER
    from lit_gpt.tokenizer import Tokenizer
    from study.tasks import evaluation_cells, training_documents

    tokenizer = Tokenizer(GPT2_TOKENIZER)
    for cell in evaluation_cells(tokenizer, [128, 512], [0.1, 0.9], keys=3, seed=0):
        for prompt, answer in cell["examples"]:
            assert tokenizer.decode(answer).strip().rstrip(".").isdigit()
            assert abs(prompt.numel() + answer.numel() - cell["length"]) <= 0.1 * cell["length"]
    documents = training_documents(tokenizer, 50, block_size=128, seed=0)
    assert max(tokenizer.encode(d, bos=False).numel() for d in documents) <= 128
    assert len({d.count(".") for d in documents}) > 5  # filler counts vary within the block


def test_value_toy_target_is_the_mean_of_the_relevant_tokens():
    settings = {"tokens": 8, "dim": 4, "noise_share": 0.5, "noise_scale": 3.0}
    x, target, relevant = value_batch(64, settings, torch.Generator().manual_seed(0))
    assert x.shape == (64, 8, 4) and target.shape == (64, 4) and relevant.shape == (64, 8)
    torch.testing.assert_close(target, (x * relevant[..., None]).sum(1) / relevant.sum(1, keepdim=True))
    close = (x - target.unsqueeze(1)).norm(dim=-1) < 1.0  # relevant tokens sit next to the target, noise does not
    assert close.any(1).all() and not close.all()


def test_dilution_batches_put_the_targets_where_the_variant_says():
    from study.toys import dilution_batch

    settings = {"dim": 16, "targets": 4, "target_similarity": 2.5, "target_noise": 0.3}
    generator = torch.Generator().manual_seed(0)
    q, keys, values, target = dilution_batch(64, 32, settings, "cluster", generator)
    similarity = torch.einsum("bd,bnd->bn", q, keys) / 4  # q has norm sqrt(d) = 4
    assert similarity[:, 4:].abs().max() <= 1 + 1e-5 and similarity[:, :4].mean() == pytest.approx(2.0, abs=0.1)
    torch.testing.assert_close(target, values[:, :4].mean(1))
    q, keys, values, target = dilution_batch(64, 32, settings, "single", generator)
    similarity = torch.einsum("bd,bnd->bn", q, keys) / 4
    torch.testing.assert_close(similarity[:, 0], torch.full((64,), 2.5))
    assert 0.8 < similarity[:, 1:].std() < 1.2 and torch.equal(target, values[:, 0])
