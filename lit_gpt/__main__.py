"""python -m lit_gpt: the model presets, one per line, with the Hugging Face repository each describes, then the
choices of the attention's fields (--model.FIELD in pretraining and fine-tuning)."""

from lit_gpt.config import ATTENTION_FIELDS, CHOICES, configs

for row in configs:
    print(f"{row['name']:<28} {row.get('hf_repo') or '(this project)'}")
print()
for field in ATTENTION_FIELDS:
    if field in CHOICES:
        print(f"--model.{field:<22} {' | '.join(CHOICES[field])}")
