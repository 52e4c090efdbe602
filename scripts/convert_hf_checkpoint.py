"""Convert a Hugging Face model folder (GPT-2, GPT-NeoX/Pythia, Llama family) into a checkpoint folder of ours.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/hf/SmolLM2-135M-Instruct \
        --output_dir checkpoints/SmolLM2-135M-Instruct

It streams: tensors are read one at a time (safetensors without a memory map; `.bin` files memory-mapped with
`weights_only=True`) and written one at a time into a file whose layout is fixed up front, so peak memory stays near
the largest tensor. The output appears under its final name only when complete.
"""

from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.utils import run_cli

if __name__ == "__main__":
    run_cli(convert_hf_checkpoint)
