"""What a retrieval checkpoint of the study does with the answer: exact match and the answer's log-likelihood on
training-style prompts (training keys and filler) and on held-out ones, its greedy answer to one prompt, and a check
that every prompt's answer ids follow the prompt's own ids (the scorer reads the right positions).

    python study/diagnose_answers.py --checkpoint_dir out/study/diagnostic/vanilla-seed0/final

It reads the study's prepared data (out/study/data, made by study/reproduce.py) for its tokenizer.
"""

from pathlib import Path

import torch

from lit_gpt.checkpoint import load_checkpoint
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import run_cli
from study.tasks import score_answers, split_answer, tokenized, training_documents, training_length_prompts


def main(checkpoint_dir: Path, data_dir: Path = Path("out/study/data/corpus"), prompts: int = 64) -> dict:
    """Print what a retrieval checkpoint does with the answer.

    Args:
        checkpoint_dir: a checkpoint of a retrieval run (its final/ or a step-* folder).
        data_dir: the study's prepared corpus folder, whose tokenizer the runs use.
        prompts: prompts of each kind.
    """
    if not any(data_dir.glob("tokenizer*")):
        raise FileNotFoundError(f"--data_dir {data_dir}: no tokenizer there; run study/reproduce.py first.")
    tokenizer = Tokenizer(data_dir)
    model = load_checkpoint(checkpoint_dir).eval()
    block = model.config.block_size
    aligned = 0
    held_documents = training_documents(tokenizer, prompts, block, seed=5, held_out=True)
    for document in held_documents:
        prompt, _ = split_answer(document)
        p, full = tokenizer.encode(prompt, bos=False), tokenizer.encode(document, bos=False)
        aligned += torch.equal(full[: p.numel()], p)
    kinds = {"training-style": tokenized(tokenizer, [split_answer(d) for d in
                                                     training_documents(tokenizer, prompts, block, seed=99)]),
             "held-out": training_length_prompts(tokenizer, prompts, block, seed=5)}
    out = {"answer ids follow the prompt's": f"{aligned} of {len(held_documents)}"}
    for kind, examples in kinds.items():
        scores = score_answers(model, examples)
        out[kind] = dict(exact=sum(s["exact"] for s in scores) / len(scores),
                         log_likelihood=round(sum(s["log_likelihood"] for s in scores) / len(scores), 3))
    p, a = kinds["training-style"][0]
    with torch.inference_mode():
        logits = model(torch.cat((p, a))[None, :-1])[0, p.numel() - 1 :]
    out["one answer"] = dict(expected=tokenizer.decode(a.tolist()), greedy=tokenizer.decode(logits.argmax(-1).tolist()))
    for key, value in out.items():
        print(f"{key}: {value}")
    return out


if __name__ == "__main__":
    run_cli(main)
