"""Convert a checkpoint folder of ours back to a Hugging Face folder that `AutoModelForCausalLM.from_pretrained`
loads with no extra arguments.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/finetune/final --output_dir out/finetune/hf

A model with an attention temperature (SSA or a baseline) has no Hugging Face class: the conversion refuses unless
`--drop_ssa` is given, which writes the backbone and puts the temperature parameters in a side file.
"""

from lit_gpt.convert import convert_lit_checkpoint
from lit_gpt.utils import run_cli

if __name__ == "__main__":
    run_cli(convert_lit_checkpoint)
