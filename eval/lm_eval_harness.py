"""Evaluate any checkpoint (SSA models included, which have no Hugging Face class) with lm-evaluation-harness.

    pip install -e ".[eval]"
    python eval/lm_eval_harness.py --checkpoint_dir out/finetune/final \
        --tasks "[wikitext, lambada_openai, piqa, hellaswag, winogrande, arc_easy, arc_challenge]"   # the paper's
    python eval/lm_eval_harness.py --checkpoint_dir ckpt --tasks "[my_task]" --include_path my_tasks/  # local tasks

The adapter is a native `lm_eval.api.model.LM` (registered as "lit_gpt_ssa"), so lm_eval's own command works too
once this module is imported.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lit_gpt.generation import generate_text, load_for_inference
from lit_gpt.utils import check_output_files, check_writable, resolve_device, run_cli, write_file


@register_model("lit_gpt_ssa")
class LitLM(LM):
    def __init__(self, checkpoint_dir: str, device: str = "cpu", dtype: str | None = None,
                 max_length: int | None = None, **kwargs) -> None:
        super().__init__()
        self.model, self.tokenizer = load_for_inference(Path(checkpoint_dir), device, dtype)
        self.max_length = max_length or self.model.max_seq_length
        self._device = torch.device(device)
        prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        if prefix is None:
            raise ValueError(f"The tokenizer of {checkpoint_dir} has neither a BOS nor an EOS token to condition on.")
        self.prefix_token_id = prefix

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False).tolist()

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokenize context + continuation together, so that the continuation is split as the model would see it."""
        trailing = len(context) - len(context.rstrip())
        if trailing:
            context, continuation = context[:-trailing], context[-trailing:] + continuation
        whole, head = self.encode(context + continuation), self.encode(context)
        return head, whole[len(head) :]

    @torch.inference_mode()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Log-probability of `continuation` after `context`, and whether greedy decoding would produce it."""
        ids = (context + continuation)[-(self.max_length + 1) :]
        logits = self.model(torch.tensor([ids[:-1]], device=self._device))[0, -len(continuation) :].float()
        logprobs = F.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation, device=self._device)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        return total, bool((logprobs.argmax(-1) == target).all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = request.args
            if context:
                head, tail = self.encode_pair(context, continuation)
            else:
                head, tail = [self.prefix_token_id], self.encode(continuation)
            results.append(self.score(head, tail))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            windows = get_rolling_token_windows(token_list=self.encode(request.args[0]),
                                                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                context_len=1)
            results.append(sum(self.score(*make_disjoint_window(w))[0] for w in windows))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = kwargs.get("max_gen_toks", 256)
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample", False) else 0.0
            results.append(generate_text(self.model, self.tokenizer, context, max_new, stop=until, truncate=True,
                                         temperature=temperature))
        return results


def main(
    checkpoint_dir: Path,
    tasks: list[str] = ["wikitext"],  # noqa: B006 (jsonargparse shows it as the default)
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: Path | None = None,
    output_file: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 1234,
) -> dict:
    """Run lm-evaluation-harness tasks on a checkpoint.

    Args:
        checkpoint_dir: a checkpoint folder.
        tasks: task names, e.g. wikitext, lambada_openai, piqa, hellaswag, winogrande, arc_easy, arc_challenge.
        num_fewshot: examples in each prompt; default the task's own.
        limit: evaluate only this many documents per task (or this fraction, below 1).
        include_path: a folder of extra task YAML files (local tasks).
        output_file: where to write the results JSON; default <checkpoint_dir>/lm_eval.json.
        device: cpu or cuda; default cuda when available.
        dtype: float32, float16 or bfloat16; default the checkpoint's own.
        seed: seeds lm-evaluation-harness.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    device = resolve_device(device)
    if limit is not None and not limit > 0:
        raise ValueError(f"--limit must be above 0 (documents per task, or a fraction below 1), got {limit}.")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be 0 or more, got {num_fewshot}.")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include_path {include_path}: expected a folder of task YAML files, found"
                                f" {'a file' if Path(include_path).exists() else 'nothing'} there.")
    output_file = Path(output_file) if output_file is not None else Path(checkpoint_dir) / "lm_eval.json"
    check_writable(output_file, "--output_file")
    check_output_files([output_file], "--output_file", [checkpoint_dir, include_path])
    task_manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"Unknown lm-evaluation-harness task(s) {unknown}; see `lm_eval ls tasks`, or pass"
                         " --include_path with your task YAML files.")
    results = lm_eval.simple_evaluate(model=LitLM(str(checkpoint_dir), device=device, dtype=dtype), tasks=tasks,
                                      num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
    write_file(output_file, json.dumps(results["results"], indent=2, default=str))
    print(json.dumps(results["results"], indent=2, default=str))
    return results["results"]


if __name__ == "__main__":
    run_cli(main)
