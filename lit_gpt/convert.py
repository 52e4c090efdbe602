"""Checkpoint conversion between Hugging Face folders and ours, both ways, one tensor at a time.

Reading streams (safetensors without a memory map; `.bin` files memory-mapped with `weights_only=True`) and so does
writing (into a file whose layout is fixed up front), so peak memory stays near the largest tensor. Outputs appear
under their final name only when complete.
"""

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lit_gpt.checkpoint import (
    TORCH_DTYPES,
    SafetensorsStreamWriter,
    atomic_output_dir,
    check_floating,
    copy_tokenizer_files,
    is_checkpoint,
    iter_safetensors,
    model_state_dict,
    read_safetensors_header,
    readable_by_all,
    safe_torch_load,
    save_tensors,
)
from lit_gpt.config import CONFIG_FILENAME, Config, stored_slope_form
from lit_gpt.export import family_weights_to_lit, without_temperature
from lit_gpt.hf import config_from_hf, hf_config_from_lit, hf_weights_from_lit, lit_weights_from_hf
from lit_gpt.model import GPT, WEIGHTS_FILENAME
from lit_gpt.utils import check_apart, parse_dtype, progress_bar, read_json


def find_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred, in the order of its index where it has one."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "*.bin")):
        index = checkpoint_dir / index_name
        if index.is_file():
            weight_map = read_json(index, required=("weight_map",))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
                raise ValueError(f"{str(index)!r}: weight_map should map tensor names to file names; the file is"
                                 " damaged: download it again.")
            names = sorted(set(weight_map.values()))
            outside = [n for n in names if Path(n).name != n or n in (".", "..")]
            if outside:
                raise ValueError(f"{str(index)!r} names the weight file {outside[0]!r}, which is not a file of this"
                                 " folder: an index may name only files beside it; fix or download the index again.")
            missing = [n for n in names if not (checkpoint_dir / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index_name} lists {missing[0]!r}, which is not in {str(checkpoint_dir)!r}.")
            return [checkpoint_dir / n for n in names]
        files = sorted(p for p in checkpoint_dir.glob(pattern) if p.name != "training_args.bin")
        if files:
            return files
    raise FileNotFoundError(
        f"No weights in {str(checkpoint_dir)!r}: expected *.safetensors or pytorch_model*.bin files there."
    )


def iter_weight_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weight file; a model's weights are floating point, so any other dtype is refused (a header
    that labels float32 bytes I32 would otherwise convert them into integers)."""
    if path.suffix == ".safetensors":
        items = iter_safetensors(path)
    else:
        state = safe_torch_load(path, mmap=True)
        items = ((name, state.pop(name)) for name in list(state))
    for name, tensor in items:
        check_floating(path, name, tensor)
        yield name, tensor


def count_tensors(files: list[Path]) -> int | None:
    if all(f.suffix == ".safetensors" for f in files):
        return sum(len(read_safetensors_header(f)[0]) for f in files)
    return None


def source_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of the first floating-point tensor of the checkpoint."""
    for _, tensor in iter_weight_file(files[0]):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def load_hf_config(checkpoint_dir: Path, model_name: str | None) -> tuple[Config, bool | str]:
    """The model's Config, and whether the folder is one this project exported: True for the wrapper (remote code,
    our weight names), "family" for a family's own folder with SSA's temperatures (lit_gpt.hf_ssa)."""
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(
            f"Expected a Hugging Face model folder at {str(checkpoint_dir)!r}, found nothing there."
        )
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"Expected {str(config_file)!r} (the Hugging Face config), found nothing there.")
    hf_config = read_json(config_file)
    if isinstance(hf_config, dict) and isinstance(hf_config.get("lit_gpt_ssa"), dict):  # a family with SSA (hf_ssa)
        return Config.from_dict(hf_config["lit_gpt_ssa"]), "family"
    if hf_config.get("model_type") == "lit_gpt_ssa":  # exported by this project: its own config, whole
        if not isinstance(hf_config.get("lit_config"), dict):
            raise ValueError(f"{str(config_file)!r} lacks the lit_config that an exported lit_gpt_ssa model holds.")
        return Config.from_dict(hf_config["lit_config"]), True
    try:
        return config_from_hf(hf_config, name=model_name), False
    except KeyError as error:
        raise ValueError(f"{str(config_file)!r} lacks the key {error.args[0]!r} that a {hf_config.get('model_type')}"
                         " config holds; download the complete config.json.") from None


def convert_hf_checkpoint(
    checkpoint_dir: Path,
    output_dir: Path | None = None,
    model_name: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Hugging Face model folder into a checkpoint folder of ours.

    Args:
        checkpoint_dir: the Hugging Face folder (config.json and *.safetensors or pytorch_model*.bin).
        output_dir: where to write; defaults to a sibling folder named `<checkpoint_dir>-lit`.
        model_name: a preset name; it must agree with config.json. Inferred from config.json when left out.
        dtype: float32, float16 or bfloat16; defaults to the checkpoint's own.
        overwrite: replace an output folder that already holds files.
    """
    checkpoint_dir = Path(os.path.abspath(checkpoint_dir))  # "." has no name to derive an output's from
    output_dir = Path(output_dir) if output_dir is not None else checkpoint_dir.with_name(checkpoint_dir.name + "-lit")
    check_apart(output_dir, "--output_dir", checkpoint_dir, "--checkpoint_dir")
    config, exported = load_hf_config(checkpoint_dir, model_name)
    if exported:  # our exports record the form SSA's slopes are stored in
        config.check_stored_slope_form(stored_slope_form(checkpoint_dir / WEIGHTS_FILENAME),
                                       str(checkpoint_dir / "config.json"))
    files = find_weight_files(checkpoint_dir)
    target_dtype = parse_dtype(dtype) or source_dtype(files)
    with torch.device("meta"):
        spec = {k: (tuple(v.shape), target_dtype) for k, v in model_state_dict(GPT(config)).items()}

    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        writer = SafetensorsStreamWriter(tmp / WEIGHTS_FILENAME, spec, {"ssa_slope_form": config.ssa_slope_form})
        items = (item for f in files for item in iter_weight_file(f))
        progress = progress_bar(total=count_tensors(files), desc="converting", unit="tensor")
        to_lit = {True: remote_weights_to_lit, False: lit_weights_from_hf, "family": family_weights_to_lit}[exported]
        try:
            for name, tensor in to_lit(config, progress_of(items, progress), dtype=target_dtype):
                writer.write(name, tensor)
        finally:
            progress.close()
            writer.file.close()
        writer.close()
        config.save(tmp / CONFIG_FILENAME)
        copied = copy_tokenizer_files(checkpoint_dir, tmp)
    tokenizer = ", ".join(copied) or "none"
    print(f"Wrote {output_dir} ({config.name}, {len(spec)} tensors, {target_dtype}; tokenizer: {tokenizer})")
    return output_dir


def remote_weights_to_lit(config: Config, items, dtype: torch.dtype | None = None):
    """An exported remote-code model's tensors are ours under `model.`; its copy of a tied output layer is dropped."""
    for name, tensor in items:
        if not name.startswith("model."):
            raise ValueError(f"Unexpected tensor {name!r} in an exported lit_gpt_ssa model (expected model.*).")
        name = name.removeprefix("model.")
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        yield name, tensor if dtype is None else tensor.to(dtype)


def progress_of(items, progress):
    for item in items:
        yield item
        progress.update()


SSA_SIDE_FILE = "ssa_parameters.safetensors"


def convert_lit_checkpoint(
    checkpoint_dir: Path,
    output_dir: Path,
    drop_ssa: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint folder of ours into a Hugging Face model folder.

    Args:
        checkpoint_dir: a folder with model.safetensors and model_config.yaml.
        output_dir: the Hugging Face folder to write.
        drop_ssa: write the backbone of a model with an attention temperature as a plain Hugging Face model (its
            temperature parameters go to a side file) instead of exporting it with its own model code.
        dtype: float32, float16 or bfloat16; defaults to the checkpoint's own.
        overwrite: replace an output folder that already holds files.
    """
    checkpoint_dir = Path(os.path.abspath(checkpoint_dir))  # "." has no name to derive an output's from
    check_apart(Path(output_dir), "--output_dir", checkpoint_dir, "--checkpoint_dir")
    if not is_checkpoint(checkpoint_dir):
        raise FileNotFoundError(
            f"Expected a checkpoint folder with {WEIGHTS_FILENAME} and model_config.yaml at {str(checkpoint_dir)!r}."
        )
    config = Config.from_file(checkpoint_dir)
    if not config.vanilla_attention and not drop_ssa:
        return export_remote_model(checkpoint_dir, Path(output_dir), config, parse_dtype(dtype), overwrite)
    backbone = check_temperature(config, drop_ssa)
    with torch.device("meta"):
        model = GPT(config)
    temperature_names = model.added_parameter_names()
    meta_state = {k: v for k, v in model_state_dict(model).items() if k not in temperature_names}
    weights = checkpoint_dir / WEIGHTS_FILENAME
    header, _ = read_safetensors_header(weights)
    source_dtype = TORCH_DTYPES[next(info["dtype"] for n, info in header.items() if n not in temperature_names)]
    out_dtype = parse_dtype(dtype) or source_dtype
    spec = {name: (tuple(t.shape), out_dtype) for name, t in hf_weights_from_lit(backbone, meta_state.items())}

    with atomic_output_dir(Path(output_dir), overwrite=overwrite) as tmp:
        writer, side = SafetensorsStreamWriter(tmp / "model.safetensors", spec), {}
        for name, tensor in progress_bar(iter_safetensors(weights), total=len(header), desc="converting",
                                         unit="tensor"):
            check_floating(weights, name, tensor)
            if name in temperature_names:
                side[name] = tensor
                continue
            for hf_name, hf_tensor in hf_weights_from_lit(backbone, [(name, tensor)]):
                writer.write(hf_name, hf_tensor)
        writer.close()
        hf_config = dict(hf_config_from_lit(backbone), dtype=str(out_dtype).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if side:
            save_tensors(side, tmp / SSA_SIDE_FILE, metadata={"attention_temperature": config.attention_temperature})
            readable_by_all(tmp / SSA_SIDE_FILE)
        copy_tokenizer_files(checkpoint_dir, tmp)
    print(f"Wrote {output_dir} ({hf_config['architectures'][0]}, {len(spec)} tensors, {out_dtype})")
    return Path(output_dir)


def export_remote_model(checkpoint_dir: Path, output_dir: Path, config: Config, dtype: torch.dtype | None,
                        overwrite: bool) -> Path:
    """A model with a temperature, gate or selective mask: a remote-code folder that transformers loads with
    trust_remote_code."""
    from lit_gpt.export import exports_as_family, write_family_model, write_remote_model
    from lit_gpt.hf import ARCHITECTURES, hf_model_type

    family = exports_as_family(config)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        count = (write_family_model if family else write_remote_model)(checkpoint_dir, config, tmp, dtype)
    if family:  # transformers' own class of the family, with the temperatures of lit_gpt.hf_ssa
        name = ARCHITECTURES[hf_model_type(config)].replace("ForCausalLM", "SSAForCausalLM")
        print(f"Wrote {output_dir} ({name}, a {ARCHITECTURES[hf_model_type(config)]} with remote code for the"
              f" temperatures, {count} tensors, attention_temperature={config.attention_temperature!r}): load it with"
              " AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)")
        return output_dir
    print(f"Wrote {output_dir} (LitGPTSSAForCausalLM, remote code, {count} tensors, attention_temperature="
          f"{config.attention_temperature!r}, attention_gate={config.attention_gate!r}, selective_mask="
          f"{config.selective_mask!r}): load it with AutoModelForCausalLM.from_pretrained(..., "
          "trust_remote_code=True)")
    return output_dir


def check_temperature(config: Config, drop_ssa: bool) -> Config:
    """The config to write: the same one, or its backbone when the temperatures are dropped on request."""
    if not drop_ssa:
        return config
    others = [f"{name}={getattr(config, name)!r}" for name in ("attention_gate", "selective_mask")
              if getattr(config, name) != "none"]
    if others:
        raise ValueError(f"--drop_ssa drops the temperatures, but this checkpoint also has {', '.join(others)}, which"
                         " no Hugging Face family computes: export it without --drop_ssa (as remote code).")
    if config.attention_temperature == "none":
        return config
    warnings.warn(
        f"Dropping attention_temperature={config.attention_temperature!r}: the Hugging Face model computes vanilla"
        f" attention and will differ from this checkpoint. The temperature parameters are kept in {SSA_SIDE_FILE}.",
        stacklevel=2,
    )
    return without_temperature(config)
