"""Conversion cost: a random Llama-style model of 1.1B parameters (TinyLlama's shape) written as a sharded
Hugging Face safetensors folder, converted with scripts/convert_hf_checkpoint.py; wall time and peak resident memory
measured from outside the process (/usr/bin/time -v) against the checkpoint size.

    python benchmarks/convert.py                      # needs about 9 GB of free disk in --work_dir
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import header, table
from safetensors.torch import save_file

from lit_gpt import GPT, Config
from lit_gpt.checkpoint import model_state_dict
from lit_gpt.hf import hf_config_from_lit, hf_weights_from_lit

ROOT = Path(__file__).resolve().parents[1]


def write_hf_folder(config: Config, folder: Path, shard_bytes: int) -> int:
    """Random weights, written shard by shard (never the whole model in memory); returns the checkpoint's bytes."""
    folder.mkdir(parents=True)
    with torch.device("meta"):
        names = [(k, v.shape) for k, v in hf_weights_from_lit(config, model_state_dict(GPT(config)).items())]
    shard, weight_map, total, index = {}, {}, 0, 0

    def flush():
        nonlocal shard, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard = {}

    for name, shape in names:
        shard[name] = torch.randn(shape) * 0.02
        total += shard[name].numel() * 4
        if sum(t.numel() * 4 for t in shard.values()) >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config_from_lit(config)))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama-1.1b")
    parser.add_argument("--shard_gb", type=float, default=1.0)
    parser.add_argument("--work_dir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.work_dir))
    try:
        config = Config.from_name(args.model)
        started = time.perf_counter()
        size = write_hf_folder(config, work / "hf", int(args.shard_gb * 2**30))
        print(f"wrote the random checkpoint in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        command = [sys.executable, str(ROOT / "scripts" / "convert_hf_checkpoint.py"), "--checkpoint_dir",
                   str(work / "hf"), "--output_dir", str(work / "lit")]
        result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
        seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
        params = sum(p.numel() for p in GPT(config).to("meta").parameters())
        title = f"Conversion: {args.model} ({params / 1e9:.2f}B parameters, float32, {args.shard_gb:g} GB shards)"
        print(header(title))
        print(table(["checkpoint size (GB)", "wall time (s)", "peak RSS (GB)", "peak RSS / checkpoint size"],
                    [[f"{size / 1e9:.2f}", f"{seconds:.1f}", f"{peak_kb * 1024 / 1e9:.2f}",
                      f"{peak_kb * 1024 / size:.1%}"]]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
