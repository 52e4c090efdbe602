"""Fine-tuning quality by method: SmolLM2-135M-Instruct on the bundled Wikipedia sample, the same data, steps and
seeds for every arm (full, full + SSA, LoRA, LoRA + SSA, SSA only), validation perplexity before and after.

    python study/finetune_quality.py                       # 5 arms x 3 seeds, about 70 minutes on 2 CPU cores
    python study/finetune_quality.py --seeds "[1]" --arms "[lora, lora_ssa]"

Every run goes through its real entry point (finetune/full.py or finetune/lora.py) with the settings of
configs/finetune-smollm2-wiki.yaml and each script's own default learning rates (full 3e-5, LoRA 3e-4; SSA's slopes
1e-2 and token weights 1e-4 in every arm that has them). A finished run writes one record (settings, the validation
losses, the learned slopes, wall time) to --records; a record already there is reused, so the command continues where
it stopped. The table goes to --records/results.md.
"""

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lit_gpt.analysis import learned_slopes
from lit_gpt.checkpoint import load_checkpoint
from lit_gpt.utils import run_cli

ROOT = Path(__file__).resolve().parents[1]
ARMS = {  # name: (entry point, its extra flags)
    "full": ("finetune/full.py", []),
    "full_ssa": ("finetune/full.py", ["--ssa", "true"]),
    "lora": ("finetune/lora.py", ["--train.learning_rate", "3e-4", "--train.min_lr", "3e-5"]),
    "lora_ssa": ("finetune/lora.py", ["--ssa", "true", "--train.learning_rate", "3e-4", "--train.min_lr", "3e-5"]),
    "ssa_only": ("finetune/full.py", ["--ssa", "true", "--ssa_only", "true"]),
}


def main(checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
         config: Path = Path("configs/finetune-smollm2-wiki.yaml"), arms: list[str] | None = None,
         seeds: list[int] | None = None, records: Path = Path("study/runs/finetune"),
         out_dir: Path = Path("out/finetune-quality")) -> None:
    """Run every (arm, seed) without a record, then write the table.

    Args:
        checkpoint_dir: the converted SmolLM2-135M-Instruct (docs/finetuning.md says how to make it).
        config: the shared settings (data, steps, batch, schedule, validation).
        arms: which of full, full_ssa, lora, lora_ssa, ssa_only (default all).
        seeds: the paired seeds (default 1, 2, 3): a seed fixes the data order and the adapters' initialisation.
        records: one JSON file per finished run, and results.md.
        out_dir: the runs' own folders (checkpoints, logs), one per (arm, seed).
    """
    arms = list(ARMS) if arms is None else arms
    seeds = [1, 2, 3] if seeds is None else seeds
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"--arms: {unknown} unknown; expected some of {list(ARMS)}.")
    if not (checkpoint_dir / "model_config.yaml").is_file():
        raise FileNotFoundError(f"--checkpoint_dir {checkpoint_dir}: no converted checkpoint there; make it as"
                                " docs/finetuning.md shows (gguf_to_hf.py, then scripts/convert_hf_checkpoint.py).")
    records.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for arm in arms:
            path = records / f"{arm}-seed{seed}.json"
            if path.is_file():
                continue
            record = run(arm, seed, checkpoint_dir, config, out_dir / f"{arm}-seed{seed}")
            path.write_text(json.dumps(record, indent=1) + "\n")
            print(f"{arm} seed {seed}: perplexity {record['ppl_before']:.3f} -> {record['ppl_after']:.3f}"
                  f" ({record['wall_s']:.0f} s)", flush=True)
    table = results_table([json.loads(p.read_text()) for p in sorted(records.glob("*-seed*.json"))])
    (records / "results.md").write_text(table)
    print(table)


def run(arm: str, seed: int, checkpoint_dir: Path, config: Path, out_dir: Path) -> dict:
    script, flags = ARMS[arm]
    command = [sys.executable, str(ROOT / script), "--config", str(config), "--checkpoint_dir", str(checkpoint_dir),
               "--seed", str(seed), "--out_dir", str(out_dir), "--resume", "auto", *flags]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    history = json.loads((out_dir / "history.json").read_text())
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    model = load_checkpoint(out_dir / "final")
    slopes = [{side: [round(float(v), 5) for v in values] for side, values in layer.items()}
              for layer in learned_slopes(model)]
    token_norms = [round(float(p.float().norm()), 5) for name, p in model.named_parameters() if "token" in name]
    return {"arm": arm, "seed": seed, "command": " ".join(command[1:]), "val_loss": val,
            "ppl_before": math.exp(val[0][1]), "ppl_after": math.exp(val[-1][1]), "wall_s": round(wall, 1),
            "slopes_per_layer_and_head": slopes, "token_weight_norms": token_norms}


def results_table(records: list[dict]) -> str:
    """Per arm: perplexity before and after (mean over seeds, each seed), and the paired difference from full."""
    by_arm: dict[str, dict[int, dict]] = {}
    for r in records:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    lines = ["| arm | seeds | perplexity before | after (mean) | after, each seed | after - full's, each seed |",
             "|---|---|---|---|---|---|"]
    full = by_arm.get("full", {})
    for arm in ARMS:
        runs = by_arm.get(arm)
        if not runs:
            continue
        seeds = sorted(runs)
        after = [runs[s]["ppl_after"] for s in seeds]
        diff = ", ".join(f"{runs[s]['ppl_after'] - full[s]['ppl_after']:+.3f}" for s in seeds if s in full)
        before = statistics.mean(r["ppl_before"] for r in runs.values())
        lines.append(f"| {arm} | {', '.join(map(str, seeds))} | {before:.3f}"
                     f" | {statistics.mean(after):.3f} | {', '.join(f'{a:.3f}' for a in after)} |"
                     f" {diff if arm != 'full' else '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main)
