"""study/reproduce.py: the reduced grid end to end, and its pieces."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from study.report import paired, verdict
from study.reproduce import check_same_grid, flags, load_grid
from study.toys import value_batch

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "study" / "grid.yaml"


def test_quick_grid_runs_every_experiment(tmp_path):
    command = [sys.executable, str(ROOT / "study" / "reproduce.py"), "--quick", "--out_dir", str(tmp_path / "out"),
               "--data_dir", str(tmp_path / "data")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    grid = load_grid(GRID, quick=True)
    assert set(summary["length"]) == {"vanilla", "ssa", "logn"}  # logn: the vanilla checkpoints at inference
    for rows in summary["length"].values():
        assert [r["seed"] for r in rows] == grid["seeds"]
        assert {c["length"] for c in rows[0]["cells"]} == set(grid["length"]["lengths"])
        assert set(rows[0]["bands"]) == {"[0,128)", "[128,256)"}
    assert summary["length"]["ssa"][0]["slopes"]["query"]["max"] > 0
    assert set(summary["decisions"]) == {"ssa", "logn", "ssa minus logn"}
    assert set(summary["dilution"]) == {"cluster", "single"}
    assert set(summary["value"]) == {"naive average", "vanilla attention", "key gate", "value temperature"}
    assert set(summary["slopes"]) == {"log-lr3e-2"}
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| vanilla |" in report and "| key gate |" in report and "verdict" in report
    for picture in ("length.png", "dilution.png", "slopes.png"):
        assert (tmp_path / "out" / picture).stat().st_size > 0
    again = subprocess.run(command, capture_output=True, text=True)  # finished runs and evaluations are reused
    assert again.returncode == 0 and "Prepared" not in again.stdout


def test_quick_section_overrides_the_grid():
    full, quick = load_grid(GRID, quick=False), load_grid(GRID, quick=True)
    assert len(full["seeds"]) >= 3 and set(full["length"]["arms"]) == {"vanilla", "ssa", "ssmax"}
    assert quick["length"]["arms"] == {arm: full["length"]["arms"][arm] for arm in ("vanilla", "ssa")}
    assert quick["length"]["train"]["max_steps"] < full["length"]["train"]["max_steps"]
    assert quick["length"]["train"]["learning_rate"] == full["length"]["train"]["learning_rate"]  # kept


def test_every_arm_runs_on_the_same_budget():
    full = load_grid(GRID, quick=False)
    for section in ("slopes", "length"):
        assert "max_steps" not in str(full[section]["arms"])
    assert full["length"]["model"]["overrides"]["position_embedding"] == "none"  # NoPE: lengths beyond training
    assert min(full["length"]["lengths"]) == full["length"]["model"]["overrides"]["block_size"]
    assert max(full["length"]["lengths"]) >= 8 * full["length"]["model"]["overrides"]["block_size"]


def test_flags_spell_values_as_the_cli_reads_them():
    assert flags("train.", {"max_steps": 3, "save_interval": None, "learning_rate": 0.003}) == [
        "--train.max_steps", "3", "--train.save_interval", "null", "--train.learning_rate", "0.003"]
    assert flags("model.", {"ssa_value": "token", "attention_temperature": "ssa"}) == [
        "--model.ssa_value", "token", "--model.attention_temperature", "ssa"]


def test_paired_differences_and_the_decision_rule():
    def row(seed, exact_far, exact_train):
        cells = [dict(length=128, depth=0.5, exact=exact_train, log_likelihood=-1.0),
                 dict(length=512, depth=0.5, exact=exact_far, log_likelihood=-2.0),
                 dict(length=1024, depth=0.5, exact=exact_far, log_likelihood=-3.0)]
        return dict(seed=seed, cells=cells, bands={})

    settings = {"lengths": [128, 512, 1024], "learned_at": 0.5}
    vanilla = [row(s, 0.1, 0.9) for s in (1, 2, 3)]
    helps = {"vanilla": vanilla, "ssa": [row(s, 0.1 + d, 0.9) for s, d in zip((1, 2, 3), (0.2, 0.3, 0.25))]}
    assert verdict(helps, settings)["ssa"]["verdict"] == "helps"
    assert verdict(helps, settings)["ssa"]["exact_far"]["positive"] == 3
    mixed = {"vanilla": vanilla, "ssa": [row(s, 0.1 + d, 0.9) for s, d in zip((1, 2, 3), (0.3, -0.1, 0.3))]}
    assert verdict(mixed, settings)["ssa"]["verdict"] == "does not help"
    worse_inside = {"vanilla": vanilla, "ssa": [row(s, 0.4, 0.7) for s in (1, 2, 3)]}
    assert verdict(worse_inside, settings)["ssa"]["verdict"] == "undecided: more seeds"
    one_did_not_learn = {"vanilla": vanilla, "ssa": [row(s, 0.4, 0.9 if s != 2 else 0.1) for s in (1, 2, 3)]}
    decision = verdict(one_did_not_learn, settings)["ssa"]
    assert decision["seeds"] == [1, 3] and decision["verdict"] == "undecided: more seeds"  # seed 2 is not compared
    assert paired([0.1, 0.2, 0.3])["se"] == pytest.approx(0.1 / 3**0.5)


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
    x, target = value_batch(64, settings, torch.Generator().manual_seed(0))
    assert x.shape == (64, 8, 4) and target.shape == (64, 4)
    close = (x - target.unsqueeze(1)).norm(dim=-1) < 1.0  # relevant tokens sit next to the target, noise does not
    assert close.any(1).all() and not close.all()


def test_an_output_folder_holds_one_grid(tmp_path):
    grid = load_grid(GRID, quick=True)
    check_same_grid(tmp_path, grid)
    check_same_grid(tmp_path, {**grid, "seeds": [1, 2, 3], "workers": 1})  # more seeds reuse the finished runs
    check_same_grid(tmp_path, {**grid, "toy": {**grid["toy"], "steps": 7}})  # toys are computed again
    with pytest.raises(ValueError, match="holds the runs of a different grid"):
        check_same_grid(tmp_path, load_grid(GRID, quick=False))
    length = grid["length"]
    changed = {**grid, "length": {**length, "arms": {**length["arms"], "ssa": {"attention_temperature": "logn"}}}}
    with pytest.raises(ValueError, match="holds the runs of a different grid"):
        check_same_grid(tmp_path, changed)


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
