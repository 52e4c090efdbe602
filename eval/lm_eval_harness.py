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

LOGITS_BUDGET = 2**28  # float32 logits (1 GiB) a scoring batch may hold: long rows of a large vocabulary batch less


@register_model("lit_gpt_ssa")
class LitLM(LM):
    def __init__(self, checkpoint_dir: str, device: str = "cpu", dtype: str | None = None,
                 max_length: int | None = None, batch_size: int | str = 16, **kwargs) -> None:
        super().__init__()
        self.model, self.tokenizer = load_for_inference(Path(checkpoint_dir), device, dtype)
        self.max_length = max_length or self.model.max_seq_length
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 16
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be 1 or more, got {batch_size}.")
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
        logits = self.model(torch.tensor([ids[:-1]], device=self._device))[0, -len(continuation) :]
        return self.continuation_score(logits, continuation)

    def continuation_score(self, logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """The summed log-probability of `continuation` under its positions' logits, and whether each is the argmax."""
        logprobs = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation, device=self._device)
        return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())

    @torch.inference_mode()
    def score_many(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True,
                   desc: str = "scoring") -> list[tuple[float, bool]]:
        """`score` of every (context, continuation), batched: each pair's model input is its ids (cut to the last
        max_length + 1, as `score` does) minus the last; inputs that are a prefix of a longer one are read from the
        longer one's forward (lm-eval's multiple-choice endings that nest, repeated requests), the rest run longest
        first, `batch_size` at a time, right-padded: causal attention never lets a position see the padding after
        it. Results come back in the order of `pairs`."""
        rows = []
        for context, continuation in pairs:
            ids = (context + continuation)[-(self.max_length + 1) :]
            rows.append((tuple(ids[:-1]), continuation))
        # in lexicographic order an input that is a prefix of another is a prefix of the one right after it
        unique = sorted({ids for ids, _ in rows})
        owner: dict[tuple, tuple] = {}
        for k in range(len(unique) - 1, -1, -1):
            ids, after = unique[k], unique[k + 1] if k + 1 < len(unique) else None
            owner[ids] = owner[after] if after is not None and after[: len(ids)] == ids else ids
        computed = sorted({owner[ids] for ids in owner}, key=len, reverse=True)
        index = {ids: c for c, ids in enumerate(computed)}
        readers: dict[int, list[int]] = {}
        for i, (ids, _) in enumerate(rows):
            readers.setdefault(index[owner[ids]], []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        pad = self.prefix_token_id
        vocab = self.model.config.padded_vocab_size
        progress = tqdm(total=len(computed), desc=desc, disable=disable_tqdm)
        start = 0
        while start < len(computed):
            width = len(computed[start])  # longest first
            size = max(1, min(self.batch_size, LOGITS_BUDGET // (width * vocab)))  # the float32 logits' memory
            batch = list(range(start, min(start + size, len(computed))))
            start = batch[-1] + 1
            progress.update(len(batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            for row, c in enumerate(batch):
                ids[row, : len(computed[c])] = torch.tensor(computed[c])
            out = self.model(ids.to(self._device))
            for row, c in enumerate(batch):
                for i in readers[c]:
                    end, continuation = len(rows[i][0]), rows[i][1]
                    results[i] = self.continuation_score(out[row, end - len(continuation) : end], continuation)
        progress.close()
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            if context:
                pairs.append(self.encode_pair(context, continuation))
            else:
                pairs.append(([self.prefix_token_id], self.encode(continuation)))
        return self.score_many(pairs, disable_tqdm, "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, request in enumerate(requests):
            for window in get_rolling_token_windows(token_list=self.encode(request.args[0]),
                                                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                    context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self.score_many(windows, disable_tqdm, "loglikelihood_rolling")):
            totals[n] += logprob
        return totals

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
        output_file: where to write the results JSON; default <checkpoint_dir>/lm_eval.json.
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
    model = LitLM(str(checkpoint_dir), device=device, dtype=dtype, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_manager,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
    write_file(output_file, json.dumps(results["results"], indent=2, default=str))
    print(json.dumps(results["results"], indent=2, default=str))
    return results["results"]


if __name__ == "__main__":
    run_cli(main)
