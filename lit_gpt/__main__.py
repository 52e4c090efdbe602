"""python -m lit_gpt: the model presets, one per line, with the Hugging Face repository each describes."""

from lit_gpt.config import configs

for row in configs:
    print(f"{row['name']:<28} {row.get('hf_repo') or '(this project)'}")
