"""A pilot run on the tuning seed (never scored): one arm in the tuning setting of study/grid.yaml, with another step
count, evaluated like every retrieval run (exact match on held-out prompts every 50 steps). It informs a deviation of
the plan (the steps or the task experiment 1 needs) without touching the scored seeds.

    python study/pilot.py --steps 2400            # vanilla -> study/runs/diagnostic/vanilla-2400steps-seed0.json
    python study/pilot.py --steps 4800

The run's folder is out/study-pilot-<steps>/ (it reuses out/study/data, prepared by study/reproduce.py).
"""

import json
import shutil
from pathlib import Path

from lit_gpt.utils import run_cli
from study.reproduce import ROOT, Study, load_grid, merge, settings_name


def main(steps: int, arm: str = "vanilla", rates: dict | None = None, data: Path = Path("out/study/data")) -> dict:
    """One arm on the tuning seed for `steps` steps, evaluated; its record copied to study/runs/diagnostic/.

    Args:
        steps: training steps (the tuning setting has 1,200).
        arm: an arm of the grid.
        rates: the arm's own learning rates (default none: the backbone's).
        data: the study's prepared data.
    """
    grid = load_grid(ROOT / "study" / "grid.yaml", False)
    if arm not in grid["arms"]:
        raise ValueError(f"--arm {arm!r} is not an arm of the grid; expected one of {list(grid['arms'])}.")
    if not (data / "mix").is_dir():
        raise FileNotFoundError(f"--data {data}: no prepared study data there; run study/reproduce.py first.")
    out = Path(f"out/study-pilot-{steps}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data").exists():
        (out / "data").symlink_to(data.resolve())
    study = Study(grid, out, out / "runs", False)
    study.threads = 1
    record = study.run("diagnostic", arm, grid["tuning"]["seed"], rates or {},
                       merge(grid["tuning"], {"train": {"max_steps": steps}}), study.curve)
    name = settings_name(arm, rates or {}, grid["tuning"]["seed"])
    target = ROOT / "study" / "runs" / "diagnostic" / f"{name.replace('-seed', f'-{steps}steps-seed')}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(study.record_path("diagnostic", name), target)
    print(json.dumps(record["metrics"])[:2000])
    print(f"Wrote {target}")
    return record


if __name__ == "__main__":
    run_cli(main)
