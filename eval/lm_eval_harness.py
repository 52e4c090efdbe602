"""Evaluate any checkpoint (SSA models included, which have no Hugging Face class) with lm-evaluation-harness.

    pip install -e ".[eval]"
    python eval/lm_eval_harness.py --checkpoint_dir out/finetune/final \
        --tasks "[wikitext, lambada_openai, piqa, hellaswag, winogrande, arc_easy, arc_challenge]"   # the paper's
    python eval/lm_eval_harness.py --checkpoint_dir ckpt --tasks "[my_task]" --include_path my_tasks/  # local tasks

The adapter is a native `lm_eval.api.model.LM`, `lit_gpt.harness.LitLM` (registered as "lit_gpt_ssa"), so lm_eval's
own API and command work too once that module is imported.
"""

import json
from pathlib import Path

from lit_gpt.utils import (
    check_output_files,
    check_seed,
    check_writable,
    eval_output,
    resolve_device,
    run_cli,
    write_file,
)


def main(
    checkpoint_dir: Path,
    tasks: list[str] = ["wikitext"],  # noqa: B006 (jsonargparse shows it as the default)
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: Path | None = None,
    output_file: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 16,
    seed: int = 1234,
) -> dict:
    """Run lm-evaluation-harness tasks on a checkpoint.

    Args:
        checkpoint_dir: a checkpoint folder.
        tasks: task names, e.g. wikitext, lambada_openai, piqa, hellaswag, winogrande, arc_easy, arc_challenge.
        num_fewshot: examples in each prompt; default the task's own.
        limit: evaluate only this many documents per task (or this fraction, below 1).
        include_path: a folder of extra task YAML files (local tasks).
        output_file: where to write the results JSON; default out/eval/<checkpoint>/lm_eval.json (a run's final/
            as <run>-final), never inside the checkpoint.
        device: cpu or cuda; default cuda when available.
        dtype: float32, float16, bfloat16, or auto (bfloat16 where this CPU or GPU multiplies it fast, temperatures
            kept in float32); default the checkpoint's own.
        batch_size: requests scored per forward (log-likelihoods; fewer where long rows would need more than 1 GiB
            of logits).
        seed: seeds lm-evaluation-harness.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    device = resolve_device(device)
    if limit is not None and not limit > 0:
        raise ValueError(f"--limit must be above 0 (documents per task, or a fraction below 1), got {limit}.")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be 1 or more, got {batch_size}.")
    check_seed(seed)
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be 0 or more, got {num_fewshot}.")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include_path {include_path}: expected a folder of task YAML files, found"
                                f" {'a file' if Path(include_path).exists() else 'nothing'} there.")
    output_file = Path(output_file) if output_file is not None else eval_output(checkpoint_dir, "lm_eval.json")
    check_writable(output_file, "--output_file")
    check_output_files([output_file], "--output_file", [checkpoint_dir, include_path])
    task_manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"Unknown lm-evaluation-harness task(s) {unknown}; see `lm_eval ls tasks`, or pass"
                         " --include_path with your task YAML files.")
    from lit_gpt.harness import LitLM

    model = LitLM(str(checkpoint_dir), device=device, dtype=dtype, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_manager,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
    write_file(output_file, json.dumps(results["results"], indent=2, default=str))
    print(json.dumps(results["results"], indent=2, default=str))
    return results["results"]


if __name__ == "__main__":
    run_cli(main)
