"""lm-evaluation-harness's model interface for any checkpoint of this project (SSA models included, which have no
Hugging Face class): `LitLM`, registered as "lit_gpt_ssa", so lm_eval's own API and command find it once this module
is imported. eval/lm_eval_harness.py is the command line around it.

    from lit_gpt.harness import LitLM
    lm_eval.simple_evaluate(model=LitLM("out/finetune/final", batch_size=16), tasks=["piqa"])
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lit_gpt.generation import generate_texts, load_for_inference, prepare_prompt

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
        """`score` of every (context, continuation), batched. Each pair is cut as `score` cuts it (its last
        max_length + 1 ids); pairs that share a context compute it once: a packed row holds the context, then each
        continuation's ids but the last one after it, every continuation attending to the context and to itself
        only, at the positions it would have alone (a 4-choice item is one row of context + 4 endings, not 4 rows).
        Rows run longest first, up to `batch_size` requests per forward, right-padded (causal attention never lets a
        position see the padding after it). Results come back in the order of `pairs`."""
        config = self.model.config
        limit = min(self.max_length, config.sliding_window or self.max_length)  # slots apart must be positions apart
        # selective attention's F sums over every earlier query, so a row holds one continuation there
        packs = config.selective_mask == "none"
        groups: dict[tuple, dict[tuple, list[int]]] = {}  # context -> continuation -> the pairs asking for it
        for i, (context, continuation) in enumerate(pairs):
            ids = (context + continuation)[-(self.max_length + 1) :]
            head = tuple(ids[: len(ids) - len(continuation)])
            groups.setdefault(head, {}).setdefault(tuple(continuation), []).append(i)
        rows = []  # (context, [continuation, ...]) each fitting `limit` slots
        for head, continuations in groups.items():
            row: list[tuple] = []
            for continuation in sorted(continuations, key=len, reverse=True):
                width = len(head) + sum(len(c) - 1 for c in row) + len(continuation) - 1
                if row and (not packs or width > limit):
                    rows.append((head, row))
                    row = []
                row.append(continuation)
            rows.append((head, row))
        rows.sort(key=lambda r: len(r[0]) + sum(len(c) - 1 for c in r[1]), reverse=True)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        vocab = config.padded_vocab_size
        progress = tqdm(total=len(rows), desc=desc, disable=disable_tqdm)
        start = 0
        while start < len(rows):
            width = len(rows[start][0]) + sum(len(c) - 1 for c in rows[start][1])  # longest first
            end, requests = start, 0
            while end < len(rows) and (end == start or (
                    requests + len(rows[end][1]) <= self.batch_size and (end - start + 1) * width * vocab
                    <= LOGITS_BUDGET)):  # the float32 logits' memory
                requests += len(rows[end][1])
                end += 1
            batch, start = rows[start:end], end
            ids = torch.full((len(batch), width), self.prefix_token_id, dtype=torch.long)
            positions = torch.zeros((len(batch), width), dtype=torch.long)
            segments = torch.full((len(batch), width), -1, dtype=torch.long)  # 0 context, k continuation k, -1 pad
            reads = []  # (row, continuation, the slots whose logits score it)
            for r, (head, continuations) in enumerate(batch):
                ids[r, : len(head)] = torch.tensor(head)
                positions[r, : len(head)] = torch.arange(len(head))
                segments[r, : len(head)] = 0
                offset = len(head)
                for k, continuation in enumerate(continuations, start=1):
                    n = len(continuation) - 1
                    ids[r, offset : offset + n] = torch.tensor(continuation[:-1])
                    positions[r, offset : offset + n] = torch.arange(len(head), len(head) + n)
                    segments[r, offset : offset + n] = k
                    reads.append((r, continuation, [len(head) - 1, *range(offset, offset + n)]))
                    offset += n
                positions[r, offset:] = torch.arange(width - offset) + len(head)
            mask = None
            if any(len(c) > 1 for _, c in batch):
                keys = segments[:, None, None, :]
                mask = ((keys == 0) | (keys == segments[:, None, :, None])).to(self._device)
            out = self.model(ids.to(self._device), mask=mask, position_ids=positions.to(self._device))
            for r, continuation, slots in reads:
                score = self.continuation_score(out[r, slots], list(continuation))
                for i in groups[batch[r][0]][continuation]:
                    results[i] = score
            progress.update(len(batch))
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
        """Requests with the same settings (stop strings, new tokens, temperature) decode together, `batch_size`
        prompts at a time (longest first, left-padded); each completion is the one its prompt gets alone."""
        groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for n, request in enumerate(requests):
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = kwargs.get("max_gen_toks", 256)
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample", False) else 0.0
            ids = prepare_prompt(self.tokenizer, context, max_new, self.model.max_seq_length, truncate=True)[0]
            groups.setdefault((until, max_new, temperature), []).append((n, ids))
        results: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for (until, max_new, temperature), members in groups.items():
            members.sort(key=lambda m: m[1].numel(), reverse=True)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                texts = generate_texts(self.model, self.tokenizer, [ids for _, ids in batch], max_new,
                                       stop=list(until), temperature=temperature)
                for (n, _), text in zip(batch, texts):
                    results[n] = text
                progress.update(len(batch))
        progress.close()
        return results
