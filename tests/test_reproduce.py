"""scripts/reproduce.py: the reduced grid end to end, and its pieces."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.reproduce import check_same_grid, flags, load_grid, toy_batch

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "reproduce.yaml"


def test_quick_grid_runs_every_experiment(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--quick", "--out_dir", str(tmp_path / "out"),
               "--data_dir", str(tmp_path / "data")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    grid = load_grid(GRID, quick=True)
    assert set(summary["language_modelling"]) == set(grid["arms"]) == {"vanilla", "ssa"}
    assert all(len(losses) == len(grid["seeds"]) for losses in summary["language_modelling"].values())
    assert summary["parameters"]["ssa"] > summary["parameters"]["vanilla"]
    for runs in summary["passkey"].values():
        assert [set(r) for r in runs] == [{str(n) for n in grid["passkey"]["lengths"]}] * len(grid["seeds"])
    assert set(summary["toy"]) == {"naive average", "vanilla attention", "value temperature"}
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| vanilla |" in report and "| value temperature |" in report
    for picture in ("loss_curves.png", "passkey.png"):
        assert (tmp_path / "out" / picture).stat().st_size > 0


def test_quick_section_overrides_the_grid():
    full, quick = load_grid(GRID, quick=False), load_grid(GRID, quick=True)
    assert len(full["seeds"]) >= 3 and len(full["arms"]) == 11
    assert quick["arms"] == {arm: full["arms"][arm] for arm in ("vanilla", "ssa")}
    assert quick["train"]["max_steps"] < full["train"]["max_steps"]
    assert quick["train"]["learning_rate"] == full["train"]["learning_rate"]  # untouched keys are kept


def test_every_arm_runs_on_the_same_budget():
    full = load_grid(GRID, quick=False)
    assert "max_steps" not in str(full["arms"]) and "train" not in str(full["arms"])
    expected = {"vanilla", "ssa", "ssa-separate", "position-only", "token-only", "query-only", "value-only",
                "official-position", "logn", "ssmax", "constant"}
    assert set(full["arms"]) == expected


def test_flags_spell_values_as_the_cli_reads_them():
    assert flags("train.", {"max_steps": 3, "save_interval": None, "learning_rate": 0.003}) == [
        "--train.max_steps", "3", "--train.save_interval", "null", "--train.learning_rate", "0.003"]
    assert flags("model.", {"ssa_token": False, "attention_temperature": "ssa"}) == [
        "--model.ssa_token", "false", "--model.attention_temperature", "ssa"]


def test_toy_target_is_the_mean_of_the_relevant_tokens():
    settings = {"tokens": 8, "dim": 4, "noise_share": 0.5, "noise_scale": 3.0}
    x, target = toy_batch(64, settings, torch.Generator().manual_seed(0))
    assert x.shape == (64, 8, 4) and target.shape == (64, 4)
    close = (x - target.unsqueeze(1)).norm(dim=-1) < 1.0  # relevant tokens sit next to the target, noise does not
    assert close.any(1).all() and not close.all()


def test_an_output_folder_holds_one_grid(tmp_path):
    grid = load_grid(GRID, quick=True)
    check_same_grid(tmp_path, grid)
    check_same_grid(tmp_path, {**grid, "seeds": [1, 2, 3], "workers": 1})  # more seeds reuse the finished runs
    with pytest.raises(ValueError, match="holds the runs of a different grid"):
        check_same_grid(tmp_path, load_grid(GRID, quick=False))
    changed = {**grid, "arms": {**grid["arms"], "ssa": {"attention_temperature": "logn"}}}
    with pytest.raises(ValueError, match="holds the runs of a different grid"):
        check_same_grid(tmp_path, changed)
