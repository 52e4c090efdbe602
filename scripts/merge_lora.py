"""Merge a saved adapter (lora.safetensors and lora.yaml of a finetune/lora.py run) into its base checkpoint.

    python scripts/merge_lora.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --lora_dir out/finetune-lora \
        --output_dir checkpoints/SmolLM2-135M-Instruct-lora

The run's own final/ already holds the merged weights; this rebuilds them from the small adapter file, for an
adapter that was shared without them. An adapter trained on another base (another architecture, or other weights of
the same one) is refused, naming what differs.
"""

from pathlib import Path

from safetensors.torch import load_file

from lit_gpt.checkpoint import atomic_output_dir, load_checkpoint, model_state_dict, write_model_files
from lit_gpt.lora import (
    LORA_SETTINGS,
    LORA_WEIGHTS,
    add_lora,
    check_adapter_shapes,
    check_same_base,
    merged_state,
    read_lora_settings,
)
from lit_gpt.utils import check_apart, check_readable, run_cli


def find_adapter(lora_dir: Path) -> Path:
    """The folder holding lora.yaml: the one given, or its final/ (a run folder)."""
    for folder in (lora_dir, lora_dir / "final"):
        if (folder / LORA_SETTINGS).is_file() and (folder / LORA_WEIGHTS).is_file():
            return folder
    raise FileNotFoundError(f"--lora_dir {lora_dir}: expected {LORA_SETTINGS} and {LORA_WEIGHTS} there (or in its"
                            " final/), found none; pass a finetune/lora.py run or its checkpoint folder.")


def merge_lora(checkpoint_dir: Path, lora_dir: Path, output_dir: Path, overwrite: bool = False) -> Path:
    """Write the base with the adapter merged into its weights as a new checkpoint folder.

    Args:
        checkpoint_dir: the base checkpoint the adapter was trained on.
        lora_dir: a finetune/lora.py run folder, or one of its checkpoint folders.
        output_dir: the merged checkpoint folder to write.
        overwrite: replace an output folder that already holds this project's files.
    """
    checkpoint_dir, adapter = Path(checkpoint_dir), find_adapter(Path(lora_dir))
    check_apart(Path(output_dir), "--output_dir", checkpoint_dir, "--checkpoint_dir")
    check_apart(Path(output_dir), "--output_dir", adapter, "--lora_dir")
    settings, args, config = read_lora_settings(adapter / LORA_SETTINGS)
    check_same_base(settings, checkpoint_dir, adapter / LORA_SETTINGS)
    check_readable(adapter / LORA_WEIGHTS, "the adapter's weights")  # before the base is loaded
    model = add_lora(load_checkpoint(checkpoint_dir, config, allow_added=True), args)
    adapters = load_file(adapter / LORA_WEIGHTS)
    check_adapter_shapes(adapters, model, adapter / LORA_WEIGHTS, adapter / LORA_SETTINGS)
    model.load_state_dict(adapters, strict=False)
    with atomic_output_dir(Path(output_dir), overwrite=overwrite) as tmp:
        write_model_files(model, tmp, tokenizer_dir=checkpoint_dir, state=merged_state(model, model_state_dict(model),
                                                                                       args))
    print(f"Wrote {output_dir}: {checkpoint_dir.name} with the adapter of {adapter} merged")
    return Path(output_dir)


if __name__ == "__main__":
    run_cli(merge_lora)
