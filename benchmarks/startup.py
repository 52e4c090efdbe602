"""Start-up time of each command: `python <script> --help` from a fresh process, the median of a few runs, and whether
it imported Lightning (about 4.5 s on two cores, with the torchmetrics, transformers and scipy it pulls in).

    python benchmarks/startup.py
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import header, table

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["generate/base.py", "eval/perplexity.py", "eval/passkey.py", "eval/attention.py", "eval/lm_eval_harness.py",
           "scripts/convert_hf_checkpoint.py", "scripts/convert_lit_checkpoint.py", "scripts/merge_lora.py",
           "scripts/prepare_openwebtext.py", "finetune/full.py", "finetune/lora.py", "pretrain/openwebtext.py"]


def start(script: str) -> tuple[float, bool]:
    """Seconds until `script --help` has answered, and whether it imported Lightning (-X importtime lists every
    module imported, on stderr)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{script} --help failed:\n{result.stderr[-2000:]}")
    return seconds, any(line.split("|")[-1].strip() == "lightning" for line in result.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for script in SCRIPTS:
        runs = [start(script) for _ in range(args.repeats)]
        rows.append([f"`{script}`", f"{statistics.median(s for s, _ in runs):.1f}", "yes" if runs[0][1] else "no"])
    print(header("Start-up: `python <script> --help`"))
    print(table(["script", "seconds (median)", "imports Lightning"], rows))
    print(f"\nMedian of {args.repeats} fresh processes each; -X importtime adds a little to every row.")


if __name__ == "__main__":
    main()
