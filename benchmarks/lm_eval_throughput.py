"""Our lm-evaluation-harness adapter against lm-eval's own `hf` model on the same weights: requests per second and the
largest difference of log-likelihoods, on a local 4-choice task built from the bundled Wikipedia sample.

    python benchmarks/lm_eval_throughput.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct \
        --hf_dir checkpoints/hf/SmolLM2-135M-Instruct --items 200 --batch_size 16

Each item: the first words of a Wikipedia sentence as the context, its true next words and three other sentences'
words as the choices (lm-eval scores 4 requests per item, sharing the context). Both models run float32 on the CPU
with the same batch size; the time is lm_eval.simple_evaluate's whole run (tokenizing included), the second of two
runs (the first warms the caches). `--hf_dir` is the Hugging Face folder of the same model (for an SSA model: its
export, scripts/convert_lit_checkpoint.py, loaded with trust_remote_code).
"""

import importlib
import json
import random
import re
import tempfile
import time
from pathlib import Path

import torch
from common import header, table

from lit_gpt.data.prepare import BUNDLED_WIKI, read_text
from lit_gpt.utils import run_cli, write_file


def write_task(folder: Path, items: int, seed: int = 0) -> Path:
    """A 4-choice task of `items` items in folder/tasks (name wiki_choice); returns that folder."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", read_text(BUNDLED_WIKI)) if 12 <= len(s.split()) <= 40]
    rng = random.Random(seed)
    rng.shuffle(sentences)
    records = []
    for k in range(items):
        words = sentences[k].split()
        cut = len(words) // 2
        others = [s.split() for s in sentences[items + 3 * k : items + 3 * k + 3]]
        choices = [" " + " ".join(words[cut:])] + [" " + " ".join(o[len(o) // 2 :]) for o in others]
        order = list(range(4))
        rng.shuffle(order)
        records.append({"question": " ".join(words[:cut]), "choices": [choices[i] for i in order],
                        "answer": order.index(0)})
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (folder / "tasks").mkdir(exist_ok=True)
    (folder / "tasks" / "wiki_choice.yaml").write_text(
        f"task: wiki_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return folder / "tasks"


def main(checkpoint_dir: Path, hf_dir: Path, items: int = 200, batch_size: int = 16,
         output_file: Path | None = Path("benchmarks/results/lm_eval_throughput.md")) -> str:
    """Time both models on the same task and compare their scores.

    Args:
        checkpoint_dir: our checkpoint folder.
        hf_dir: the same model as a Hugging Face folder.
        items: task items (4 requests each).
        batch_size: the batch size of both.
        output_file: the table is written here (null: only printed).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lit_gpt.harness import LitLM

    importlib.import_module("lm_eval.models")  # registers "hf"
    folder = Path(tempfile.mkdtemp(prefix="lm-eval-bench-"))
    tasks = TaskManager(include_path=str(write_task(folder, items)))
    models = {"ours (lit_gpt_ssa)": lambda: (LitLM(str(checkpoint_dir), batch_size=batch_size), None),
              "lm-eval hf": lambda: ("hf", f"pretrained={hf_dir},trust_remote_code=True,dtype=float32,device=cpu")}
    timings, scores, accuracy = {}, {}, {}
    for name, make in models.items():
        for _ in range(2):
            model, args = make()
            started = time.perf_counter()
            run = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["wiki_choice"], task_manager=tasks,
                                          log_samples=True, batch_size=batch_size)
            timings[name] = time.perf_counter() - started
        samples = run["samples"]["wiki_choice"]
        scores[name] = [r[0] for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
        accuracy[name] = run["results"]["wiki_choice"]["acc,none"]
    requests = 4 * items
    ours, hf = scores["ours (lit_gpt_ssa)"], scores["lm-eval hf"]
    largest = max(abs(float(a) - float(b)) for a, b in zip(ours, hf, strict=True))
    rows = [[name, f"{timings[name]:.1f}", f"{requests / timings[name]:.1f}", f"{accuracy[name]:.3f}"]
            for name in models]
    ratio = timings["lm-eval hf"] / timings["ours (lit_gpt_ssa)"]
    text = (header(f"lm-eval throughput: {checkpoint_dir.name}, {items} 4-choice items, batch {batch_size}") + "\n"
            + table(["model", "seconds", "requests/s", "accuracy"], rows)
            + f"\nOurs against hf: {ratio:.2f}x the requests per second; largest difference of a log-likelihood:"
              f" {largest:.2e} nats. Threads: {torch.get_num_threads()}.\n")
    print(text)
    if output_file is not None:
        write_file(Path(output_file), text)
    return text


if __name__ == "__main__":
    run_cli(main)
