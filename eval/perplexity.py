"""Token- and word-level perplexity of a checkpoint on a text, with a sliding window.

    python eval/perplexity.py --checkpoint_dir out/demo/final                    # the bundled Wikipedia sample
    python eval/perplexity.py --checkpoint_dir ckpt --data my_text.txt --window 1024 --stride 512
    python eval/perplexity.py --checkpoint_dir ckpt --dataset wikitext --dataset_config wikitext-2-raw-v1  # internet

Prints and writes JSON: the summed negative log-likelihood, token perplexity, word perplexity (words as
lm-evaluation-harness counts them) and bits per byte.
"""

import json
import math
from pathlib import Path

from lit_gpt.data.prepare import BUNDLED_WIKI, local_files, read_text
from lit_gpt.evaluation import PerplexityResult, count_words, sliding_window_nll
from lit_gpt.generation import load_for_inference
from lit_gpt.utils import (
    at_least,
    check_hub_reachable,
    check_output_files,
    check_writable,
    eval_output,
    run_cli,
    write_file,
)


def load_text(data: Path | None, dataset: str | None, dataset_config: str | None, split: str, text_column: str,
              start_char: int, max_chars: int | None) -> str:
    if dataset is not None:
        import datasets

        try:
            check_hub_reachable(f"the dataset {dataset!r}")
            rows = datasets.load_dataset(dataset, dataset_config, split=split)
        except Exception as error:  # the hub client raises many types; the user needs the one line below
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise ConnectionError(f"Could not load the dataset {dataset!r} ({first}). Without internet, pass --data"
                                  " a local text file or folder.") from None
        text = "\n\n".join(t for t in rows[text_column] if t.strip())
    else:
        path = Path(data) if data is not None else BUNDLED_WIKI
        if not path.exists():
            raise FileNotFoundError(f"Expected a text file or folder at {str(path)!r}, found nothing there.")
        text = "\n\n".join(read_text(f) for f in local_files(path))
    text = text[start_char : None if max_chars is None else start_char + max_chars]
    if not text.strip():
        raise ValueError("The text to evaluate is empty.")
    return text


def main(
    checkpoint_dir: Path,
    data: Path | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "test",
    text_column: str = "text",
    start_char: int = 0,
    max_chars: int | None = None,
    max_tokens: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    output_file: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Perplexity of a checkpoint.

    Args:
        checkpoint_dir: a checkpoint folder.
        data: a text file or folder; default the bundled Wikipedia sample (data/corpus/wiki.utf8.xz).
        dataset: a Hugging Face dataset name instead (needs internet), e.g. wikitext.
        dataset_config: its configuration, e.g. wikitext-2-raw-v1.
        split: its split.
        text_column: its text column.
        start_char: skip this many characters of the text.
        max_chars: evaluate at most this many characters.
        max_tokens: evaluate at most this many tokens (after tokenizing); default all of them (the bundled
            Wikipedia sample is about 820k GPT-2 tokens, minutes on a CPU: --max_tokens 50000 for a quick look).
        window: tokens the model reads at once; default its context, at most 1024.
        stride: how far the window advances; default half the window.
        output_file: where to write the JSON result; default out/eval/<checkpoint>/perplexity.json (a run's
            final/ as <run>-final), never inside the checkpoint.
        device: cpu or cuda; default cuda when available.
        dtype: float32, float16, bfloat16, or auto (bfloat16 where this CPU or GPU multiplies it fast, temperatures
            kept in float32); default the checkpoint's own.
    """
    at_least(1, max_chars=max_chars, max_tokens=max_tokens, window=window, stride=stride)
    if start_char < 0:
        raise ValueError(f"--start_char must be 0 or more, got {start_char}.")
    output_file = Path(output_file) if output_file is not None else eval_output(checkpoint_dir, "perplexity.json")
    check_writable(output_file, "--output_file")
    check_output_files([output_file], "--output_file", [checkpoint_dir, data])
    model, tokenizer = load_for_inference(checkpoint_dir, device, dtype)
    text = load_text(data, dataset, dataset_config, split, text_column, start_char, max_chars)
    ids = tokenizer.encode(text)[:max_tokens]
    if max_tokens is not None:
        text = tokenizer.decode(ids)
    window = window or min(model.max_seq_length, 1024)
    if window > model.max_seq_length:
        raise ValueError(f"--window {window} exceeds the model's context of {model.max_seq_length} tokens.")
    windows = max(1, math.ceil((len(ids) - window) / (stride or max(1, window // 2))) + 1)
    if max_tokens is None and len(ids) > 100_000:  # the whole default text: say what it costs before it starts
        print(f"Scoring all {len(ids):,} tokens ({windows:,} windows of {window}); --max_tokens scores fewer.",
              flush=True)
    nll, count = sliding_window_nll(model, ids, window, stride or max(1, window // 2))
    if not math.isfinite(nll):
        raise ValueError(f"The log-likelihood came out {nll}: the model's outputs are NaN or infinite (its weights, or"
                         " an overflow in a low-precision --dtype); check the checkpoint or use --dtype float32.")
    result = PerplexityResult(nll, count, count_words(text), len(text.encode("utf-8"))).as_dict()
    result.update(checkpoint=str(checkpoint_dir), data=dataset or str(data or BUNDLED_WIKI), window=window,
                  stride=stride or max(1, window // 2))
    write_file(output_file, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
