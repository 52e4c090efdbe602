"""Streaming data preparation at scale: peak resident memory (the preparing process and its largest worker) and
tokens per second, on a synthetic corpus of English words (drawn with their frequencies in the bundled corpus) of
about `--tokens` GPT-2 tokens, so that the figures carry over to OpenWebText (9.0e9 tokens).

    python benchmarks/prepare_stream.py --tokens 1e9 --folder /tmp/prepare-bench   # about 4 GB of text, 4 GB of tokens
    python benchmarks/prepare_stream.py --tokens 2e7                               # a quick look

The corpus is made once and kept in `--folder` (remove it afterwards); the prepared folder is replaced on every run.
"""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import header, table  # noqa: E402
from lit_gpt.data.prepare import BUNDLED_CORPUS, GPT2_TOKENIZER, prepare, read_text  # noqa: E402
from lit_gpt.tokenizer import Tokenizer  # noqa: E402
from lit_gpt.utils import run_cli  # noqa: E402


def words_of_the_corpus() -> np.ndarray:
    return np.array(re.findall(r"[A-Za-z']+|[.,;:!?]", " ".join(read_text(p) for p in BUNDLED_CORPUS)))


def synthetic_text(words: np.ndarray, n_words: int, rng: np.random.Generator) -> str:
    """Lines of 8-20 words, a blank line every ~40 lines (the preparation cuts documents of ~4 KB at lines)."""
    chosen = words[rng.integers(0, len(words), n_words)]
    lengths = rng.integers(8, 21, n_words // 8)
    ends = np.cumsum(lengths)
    ends = ends[ends < n_words]
    lines = [" ".join(chunk) for chunk in np.split(chosen, ends)]
    return "\n".join(lines) + "\n"


def make_corpus(path: Path, tokens: float, seed: int = 0) -> None:
    """Text files of about `tokens` GPT-2 tokens (the tokens per character measured on a sample first)."""
    words, rng = words_of_the_corpus(), np.random.default_rng(seed)
    sample = synthetic_text(words, 200_000, rng)
    per_char = len(Tokenizer(GPT2_TOKENIZER).encode(sample, bos=False)) / len(sample)
    chars = int(tokens / per_char * 1.02)
    path.mkdir(parents=True)
    written, part = 0, 0
    while written < chars:
        with open(path / f"part-{part:04d}.txt", "w") as f:
            for _ in range(50):
                text = synthetic_text(words, 1_000_000, rng)
                f.write(text)
                written += len(text)
                if written >= chars:
                    break
        part += 1
    print(f"Wrote {written / 1e9:.2f} GB of text in {part} files to {path} ({per_char:.3f} tokens per character)")


def prepare_and_measure(corpus: str, prepared: str, num_proc: int | None) -> None:
    """In a fresh process: prepare, then print the seconds and the peak RSS of this process and of its largest worker
    (getrusage's ru_maxrss; the workers are finished children by then) as JSON."""
    start = time.perf_counter()
    prepare(corpus, Path(prepared), val_fraction=0.0005, num_proc=num_proc)
    me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps(dict(seconds=time.perf_counter() - start, parent=me.ru_maxrss / 1024,
                          worker=workers.ru_maxrss / 1024,
                          cpu=me.ru_utime + me.ru_stime + workers.ru_utime + workers.ru_stime)))


def main(tokens: float = 1e9, folder: Path = Path("/tmp/prepare-bench"), num_proc: int | None = None,
         output: Path | None = None, child: str | None = None) -> None:
    """Prepare a synthetic corpus of about `tokens` tokens with scripts/prepare_openwebtext.py's code; print a table.

    Args:
        tokens: the corpus size in GPT-2 tokens (the benchmark's record uses 1e9).
        folder: where the corpus (kept) and the prepared folder (replaced) go.
        num_proc: tokenizing processes (default: the number of CPU cores, at most 8).
        output: also write the table to this markdown file.
        child: internal (the measured preparation runs in a fresh process).
    """
    if child is not None:
        return prepare_and_measure(**json.loads(child))
    corpus = Path(folder) / f"corpus-{tokens:.0e}"
    if not corpus.is_dir():
        make_corpus(corpus, tokens)
    prepared = Path(folder) / "prepared"
    shutil.rmtree(prepared, ignore_errors=True)
    job = dict(corpus=str(corpus), prepared=str(prepared), num_proc=num_proc)
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    seconds = measured["seconds"]
    meta = json.loads((prepared / "meta.json").read_text())
    n = meta["train_tokens"] + meta["val_tokens"]
    text_gb = sum(p.stat().st_size for p in corpus.iterdir()) / 1e9
    per_cpu = n / measured["cpu"]
    rows = [[f"{n:,}", f"{meta['documents']:,}", f"{text_gb:.2f}", num_proc or min(8, os.cpu_count() or 1),
             f"{seconds:,.0f}", f"{n / seconds:,.0f}", f"{measured['cpu']:,.0f}", f"{per_cpu:,.0f}",
             f"{measured['parent']:,.0f}", f"{measured['worker']:,.0f}",
             f"{(prepared / 'train.bin').stat().st_size / 1e9:.2f}"]]
    text = "\n".join([header("Streaming preparation"), table(
        ["tokens", "documents", "text GB", "workers", "wall s", "tokens/s (wall)", "CPU s", "tokens per CPU s",
         "peak RSS parent MiB", "peak RSS largest worker MiB", "train.bin GB"], rows),
        "", f"OpenWebText's 9.0e9 tokens at {per_cpu:,.0f} tokens per CPU second take about"
        f" {9.0e9 / per_cpu / 3600:.1f} CPU hours: {9.0e9 / per_cpu / 3600 / 8:.1f} hours with 8 workers on 8 free"
        " cores. The text, the tokens and the statistics pass in pieces; what grows with the corpus is 20 bytes a"
        " document (the split and the shard index). Peak RSS from getrusage (ru_maxrss of the preparing process, and"
        " of its largest worker); CPU seconds are user + system time of both (they depend little on what else the"
        " machine runs, wall time does); every figure varies with the machine.", ""])
    print(text)
    if output is not None:
        Path(output).write_text(text)


if __name__ == "__main__":
    run_cli(main)
