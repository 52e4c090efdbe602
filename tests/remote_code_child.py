"""Run by tests/test_hf_export.py in a fresh Python process: loads exported folders with transformers alone (this
project cannot be imported here) and saves what they compute, for the test to compare with lit_gpt's own results."""

import json
import sys

sys.modules["lit_gpt"] = None  # any import of this project now fails: the folder must stand on its own

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main(request_file: str, result_file: str) -> None:
    request = json.loads(open(request_file).read())
    results = {}
    for folder in request["folders"]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = torch.tensor(tokenizer(request["texts"]).input_ids[0])[None, : request["length"]]
        short = ids[:, : request["length"] - request["pad"]]
        padded = torch.cat((torch.zeros(1, request["pad"], dtype=torch.long), short), 1)
        batch = torch.cat((ids, padded))
        mask = torch.stack((torch.ones(ids.size(1)), torch.arange(ids.size(1)) >= request["pad"])).long()
        # GPT-2's learned positions: transformers numbers a plain call's tokens from 0 whatever the mask, and its
        # callers pass the positions (generate does); a GPT-2 export is a GPT2LMHeadModel and takes them the same way
        positions = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if model.config.model_type == "gpt2" else {}
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
            batch_greedy = model.generate(batch, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                          do_sample=False, pad_token_id=0)
            short_greedy = model.generate(short, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
            results[folder] = dict(
                ids=ids, logits=model(ids).logits, greedy=greedy[:, ids.size(1):],
                padded_logits=model(batch, attention_mask=mask, **positions).logits[1, request["pad"]:],
                short_logits=model(short).logits[0],
                batch_greedy=batch_greedy[:, batch.size(1):], short_greedy=short_greedy[:, short.size(1):],
                module=type(model).__module__, class_name=type(model).__name__,
                bases=[c.__name__ for c in type(model).__mro__],
            )
        if folder in request.get("train", []):
            results[folder].update(pipeline_peft_and_trainer(model, tokenizer, ids, greedy))
    results["imported lit_gpt"] = any(name.startswith("lit_gpt") and module is not None
                                      for name, module in sys.modules.items())
    torch.save(results, result_file)


def pipeline_peft_and_trainer(model, tokenizer, ids, greedy) -> dict:
    """What a transformers user does next with a loaded model: a text-generation pipeline (its text against
    generate's), then PEFT's LoRA with the added modules in modules_to_save and a step of the Trainer (which of the
    adapters and the added modules moved)."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, pipeline

    text = tokenizer.decode(ids[0])
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    piped = generator(text, max_new_tokens=8, min_new_tokens=8, do_sample=False, return_full_text=False,
                      pad_token_id=0)[0]["generated_text"]
    added = ["query_temperature", "key_temperature", "value_temperature", "gate"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", modules_to_save=added))
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    rows = [{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}] * 4
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=2, max_steps=1, learning_rate=1e-2, report_to=[],
                                 use_cpu=True, save_strategy="no")
        Trainer(model=peft_model, args=args, train_dataset=rows).train()
    moved = sorted(n for n, p in peft_model.named_parameters() if n in trainable and not torch.equal(p, trainable[n]))
    return dict(piped=piped, generated=tokenizer.decode(greedy[0, ids.size(1):ids.size(1) + 8]), moved=moved)


if __name__ == "__main__":
    main(*sys.argv[1:])
