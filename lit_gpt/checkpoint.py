"""Checkpoint folders, the one home of checkpoint code: reading and writing them safely, atomically and one tensor at a
time, and the training checkpoints that resume exactly.

A checkpoint folder holds `model.safetensors`, `model_config.yaml` and the tokenizer files (a training checkpoint adds
`training_state.pth` and `hyperparameters.yaml`). It is written under a temporary name and moved into place when
complete (`move_into_place`), so an interrupted write never leaves a folder that later loads. `load_checkpoint` reads
one strictly.
"""

import fcntl
import glob
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lit_gpt.config import CONFIG_FILENAME, Config
from lit_gpt.model import ADDED_MODULES, GPT, WEIGHTS_FILENAME, slope_parameter
from lit_gpt.tokenizer import TOKENIZER_FILES
from lit_gpt.utils import check_fits, check_readable, process_alive, set_interrupt_note

if TYPE_CHECKING:  # only the training scripts need Lightning; the tools that read checkpoints start without it
    import lightning as L

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
STATE_FILENAME = "training_state.pth"
# every file name this project writes into an output folder: --overwrite replaces a folder holding only these
OUTPUT_NAMES = {WEIGHTS_FILENAME, CONFIG_FILENAME, STATE_FILENAME, "hyperparameters.yaml", "meta.json", "train.bin",
                "val.bin", "config.json", "README.md", "ssa_parameters.safetensors", "configuration_lit_gpt_ssa.py",
                "modeling_lit_gpt_ssa.py", "modeling_lit_gpt_hf_ssa.py", "generation_config.json",
                "tokenizer_config.json", "lora.safetensors", "lora.yaml", *TOKENIZER_FILES}


def load_checkpoint(
    checkpoint_dir: str | Path,
    config: Config | None = None,
    allow_added: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> GPT:
    """Build the model a checkpoint folder describes and load its weights strictly.

    `config` replaces the folder's config (to add SSA to a vanilla checkpoint, for instance); with `allow_added` the
    parameters that the temperatures and gates add to the backbone may be missing from the weights, and they keep their
    initialisation (the start that reproduces the checkpoint). Nothing else may be missing or left over."""
    checkpoint_dir = Path(checkpoint_dir)
    config = config or Config.from_file(checkpoint_dir / CONFIG_FILENAME)
    parameters = sum(config.estimated_parameters().values())
    check_fits(f"The model of {str(checkpoint_dir)!r} (model_config.yaml: n_layer {config.n_layer}, n_embd"
               f" {config.n_embd}, {parameters:,} parameters)", 2 * parameters, "check that model_config.yaml is the"
               " checkpoint's own (copy it again), or use a machine with more memory")
    weights = checkpoint_dir / WEIGHTS_FILENAME
    check_readable(weights, "weights")
    try:
        with safe_open(weights, framework="pt", device=str(device)) as file:  # the tensors and the metadata, one read
            metadata = file.metadata() or {}
            state_dict = {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as error:
        raise ValueError(f"{str(weights)!r} is truncated or not a .safetensors file ({error}): convert or download"
                         " it again.") from None
    config.check_stored_slope_form(metadata.get("ssa_slope_form"), str(checkpoint_dir / CONFIG_FILENAME))
    for name, tensor in state_dict.items():
        check_floating(weights, name, tensor)
    damaged = [name for name, tensor in state_dict.items() if not torch.isfinite(tensor).all()]
    if damaged:
        raise ValueError(f"{str(weights)!r} holds NaN or infinite weights in {len(damaged)} tensor(s) (first:"
                         f" {damaged[0]!r}): the checkpoint is damaged (a diverged run?); use an earlier one.")
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    with torch.device("meta"):
        model = GPT(config)
    allow_missing = model.added_parameter_names() if allow_added else set()
    load_state_dict(model, state_dict, allow_missing, source=str(weights))
    materialize_added(model, device, dtype)
    return model


def check_tied(head: torch.Tensor | None, embedding: torch.Tensor | None, source: str, setting: str) -> None:
    """A tied model uses its embedding as the output layer: an output layer in the file may only repeat it."""
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise ValueError(f"{source} holds its own trained output layer (lm_head.weight, unlike the embedding), but"
                         f" {setting} says the two are one: set it to false to use the file's output layer.")


def check_floating(path: Path, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{str(path)!r}: tensor {name!r} is stored as {str(tensor.dtype).removeprefix('torch.')}, but"
                         " a model's weights are floating point: the file's header mislabels it; download or convert"
                         " it again.")


def load_state_dict(model: GPT, state_dict: dict, allow_missing: set[str], source: str) -> None:
    """Strict loading with an explicit allow-list of keys that may be missing. A tied lm_head is the embedding."""
    upgrade_position_parameters(state_dict, model.config)
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
        check_tied(state_dict.pop("lm_head.weight", None), state_dict.get("transformer.wte.weight"), source,
                   "tie_embeddings: true in its model_config.yaml")
    missing = sorted(set(expected) - set(state_dict) - allow_missing)
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model config {model.config.name!r}: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}."
            " Is this checkpoint from another model?"
        )
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects"
                f" {tuple(expected[name].shape)}. Is this checkpoint from another model?"
            )
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()


def materialize_added(model: GPT, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Materialise what is still on the meta device after loading: newly added temperatures or gates, the buffers."""
    dtype = dtype or model.transformer.wte.weight.dtype
    for module in model.modules():
        if isinstance(module, ADDED_MODULES) and any(p.is_meta for p in module.parameters()):
            module.to_empty(device=device)
            module.reset_parameters()
            module.to(dtype)
    model.reset_rope_cache(torch.device(device))


def upgrade_position_parameters(state_dict: dict, config: Config) -> None:
    """Checkpoints written before the slope forms stored SSA's slope as sigmoid(`position_logit`); convert each to
    the `position_param` of config.ssa_slope_form, which gives the same slope."""
    for key in [k for k in state_dict if k.endswith(".position_logit")]:
        logit = state_dict.pop(key)
        slope = torch.sigmoid(logit.double())
        state_dict[key.removesuffix("logit") + "param"] = slope_parameter(slope, config.ssa_slope_form).to(logit.dtype)


def is_checkpoint(path: Path) -> bool:
    return (path / WEIGHTS_FILENAME).is_file() and (path / CONFIG_FILENAME).is_file()


def check_replaceable(target: Path, overwrite: bool) -> None:
    """An output folder may be replaced only on request (--overwrite), and only when it looks like this project's
    output: files of the names it writes and nothing else (never a folder of unrelated files, never a source)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{str(target)!r} is a file, not a folder: choose another output folder.")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{str(target)!r} already holds files; pass --overwrite to replace them.")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in OUTPUT_NAMES or not p.is_file())
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise FileExistsError(f"{str(target)!r} holds files this project did not write ({shown}); --overwrite replaces"
                              " only its own output: choose another output folder or empty this one yourself.")


def remove_stale_temporaries(target: Path) -> None:
    """Delete the temporary folders that an interrupted write into `target` left beside it (`.NAME.tmp-PID`,
    `.NAME.old-PID`) when their process is gone; an old `target` set aside by a replacement that was killed before the
    new one took its place is put back first (recover_replaced)."""
    recover_replaced(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)$")
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        match = pattern.match(path.name)
        if match and path.is_dir() and not process_alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def readable_by_all(path: Path) -> None:
    """safetensors writes files as 0600; give them the mode any other file of ours gets (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_output_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `target`; renames it to `target` only when the block completes. The output
    is locked for the block (`.NAME.lock` beside it): a second writer into the same place is refused at once."""
    if Path(target).is_symlink():
        raise FileExistsError(f"{str(target)!r} is a symbolic link (to {os.readlink(target)!r}): outputs are written"
                              " as new folders, never through links; choose a real path.")
    target = Path(os.path.abspath(target))  # "." or "out/.." have no name to put a temporary one beside
    check_replaceable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target):
        check_replaceable(target, overwrite)  # again: an earlier writer may have finished meanwhile
        with staged_output_dir(target) as tmp:
            yield tmp


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    path = target.with_name(f".{target.name}.lock")
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{str(target)!r} is being written by another process: wait for it to finish, or"
                                  " choose another output folder.") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(file, fcntl.LOCK_UN)


@contextmanager
def staged_output_dir(target: Path) -> Iterator[Path]:
    remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except OSError as error:  # a full disk, say: name the output, not the temporary folder that is now gone
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno is None or error.filename is not None and not Path(error.filename).is_relative_to(tmp):
            raise
        raise OSError(error.errno, f"{error.strerror} while writing", str(target)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, target)


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename a complete temporary folder to `target`, so that `target` always names a complete folder, the old one or
    the new one. An existing target is swapped with the new folder in one atomic step where the system can (Linux's
    renameat2 RENAME_EXCHANGE), and the old one deleted after; elsewhere it is renamed aside first (`.NAME.old-PID`),
    and a kill between the two renames is undone by `recover_replaced` the next time anything looks for `target`."""
    if not target.exists():
        tmp.rename(target)
    elif exchange(tmp, target):
        shutil.rmtree(tmp)  # it now holds the old folder
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2, RENAME_EXCHANGE); False where the system or file system cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def recover_replaced(target: Path) -> Path | None:
    """Where `target` is missing but a replacement killed between its two renames left the old folder aside
    (`.NAME.old-PID`, its process gone), rename it back: the old checkpoint is complete, the new one may not be.
    Returns the folder put back, if any."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        return None
    pattern = re.compile(rf"\.{re.escape(target.name)}\.old-(\d+)$")
    aside = [p for p in target.parent.glob(f".{glob.escape(target.name)}.old-*")
             if pattern.match(p.name) and p.is_dir() and not process_alive(int(pattern.match(p.name).group(1)))]
    if not aside:
        return None
    newest = max(aside, key=lambda p: p.stat().st_mtime)
    newest.rename(target)
    print(f"Recovered {target} from {newest.name}, set aside by a replacement that was interrupted.")
    return target


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """The tokenizer files of `source` that are regular files inside it, copied (a symbolic link is followed only
    where it stays inside the folder: a link out of it could carry a private file into an export meant for upload)."""
    copied, inside = [], Path(source).resolve()
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if not path.is_file():
            continue
        if path.is_symlink() and inside not in path.resolve().parents:
            print(f"Skipping {path}: a symbolic link to {path.resolve()}, outside {source}.")
            continue
        shutil.copy2(path, Path(destination) / name)
        copied.append(name)
    return copied


def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights as saved: a tied lm_head is the embedding and is stored once."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    return state


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, its I/O failures (a full disk, a folder gone) raised as the OSError they are (the
    library raises its own error type with the reason in its text), so that callers report them in one line and
    clean up as after any other failed write."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as error:
        match = re.search(r"\(os error (\d+)\)", str(error))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def write_model_files(model: GPT, folder: Path, tokenizer_dir: Path | None = None, state: dict | None = None) -> None:
    """Weights, config and tokenizer files into an existing (temporary) folder."""
    save_tensors(state if state is not None else model_state_dict(model), folder / WEIGHTS_FILENAME,
                 metadata={"format": "pt", "ssa_slope_form": model.config.ssa_slope_form})
    readable_by_all(folder / WEIGHTS_FILENAME)
    model.config.save(folder / CONFIG_FILENAME)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, folder)


def save_model_dir(model: GPT, target: Path, tokenizer_dir: Path | None = None, overwrite: bool = False) -> None:
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        write_model_files(model, tmp, tokenizer_dir)


def unsafe_pickle_error(path: Path, error: Exception) -> ValueError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ValueError(
        f"Refusing to load {str(path)!r}: it holds Python objects beyond tensors, which could run code"
        f" ({first_line}). Use a .safetensors copy of it."
    )


def safe_torch_load(path: Path, mmap: bool = True) -> dict:
    """torch.load that never runs code from the file: only tensors and plain containers are accepted.
    Files in the zip format are memory-mapped; older (legacy pickle) files are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise unsafe_pickle_error(path, error) from None
    except RuntimeError as error:
        if mmap and "mmap can only be used" in str(error):
            return safe_torch_load(path, mmap=False)
        raise


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor index of a .safetensors file and where its data starts, checked as the safetensors library checks
    it and against the file's size: a truncated file (a cut-off download), an unknown dtype, a shape that does not
    match its bytes, entries that overlap or leave gaps are refused before anything is read from it."""
    file_size = Path(path).stat().st_size
    truncated = ValueError(f"{str(path)!r} is truncated or not a .safetensors file ({file_size:,} bytes): download"
                           " or convert it again.")
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise truncated
        (size,) = struct.unpack("<Q", prefix)
        if 8 + size > file_size:
            raise truncated
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise truncated from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r}: its header is a {type(header).__name__}, not a mapping of tensors; the file"
                         " is damaged: download or convert it again.")
    header.pop("__metadata__", None)
    end = 0
    for name, info in sorted(header.items(), key=lambda item: header_offsets(path, *item)[0]):
        begin, stop = header_offsets(path, name, info)
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise ValueError(f"{str(path)!r}: tensor {name!r} {what} (bytes {begin}-{stop}); the file is damaged:"
                             " download or convert it again.")
        end = stop
    if 8 + size + end > file_size:
        raise ValueError(f"{str(path)!r} is truncated: its header describes {8 + size + end:,} bytes but the file"
                         f" has {file_size:,}; download or convert it again.")
    return header, 8 + size


def header_offsets(path: Path, name: str, info) -> tuple[int, int]:
    """An entry's byte range, checked: a known dtype, a shape of whole numbers, as many bytes as the shape needs."""
    damaged = f"{str(path)!r}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{damaged} is described by {info!r}, not by its dtype, shape and data_offsets; the file is"
                         " damaged: download or convert it again.")
    if info["dtype"] not in TORCH_DTYPES:
        raise ValueError(f"{damaged} has dtype {info['dtype']!r}, which this project does not read (it reads"
                         f" {', '.join(TORCH_DTYPES)}); convert the file to one of those.")
    shape, offsets = info["shape"], info["data_offsets"]
    whole = lambda values, n=None: (isinstance(values, list) and (n is None or len(values) == n)  # noqa: E731
                                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values))
    if not whole(shape) or not whole(offsets, 2) or offsets[1] < offsets[0]:
        raise ValueError(f"{damaged} has shape {shape!r} and data_offsets {offsets!r}; the file is damaged: download"
                         " or convert it again.")
    expected = math.prod(shape) * TORCH_DTYPES[info["dtype"]].itemsize
    if offsets[1] - offsets[0] != expected:
        raise ValueError(f"{damaged} ({info['dtype']}, shape {shape}) needs {expected:,} bytes but its data_offsets"
                         f" hold {offsets[1] - offsets[0]:,}: the header does not describe the data; download or"
                         " convert it again.")
    return offsets[0], offsets[1]


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Reads tensors one at a time with plain reads (no memory map), so only the current one is resident."""
    header, start = read_safetensors_header(path)
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype = TORCH_DTYPES[info["dtype"]]
            if end == begin:
                yield name, torch.empty(info["shape"], dtype=dtype)
                continue
            data = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(data) != end - begin:
                raise ValueError(f"{str(path)!r} ended inside tensor {name!r}: the file is truncated; download or"
                                 " convert it again.")
            yield name, torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(info["shape"])


class SafetensorsStreamWriter:
    """Writes a .safetensors file one tensor at a time, in any order, into a layout fixed up front from the expected
    names, shapes and dtypes; memory holds the tensor being written, never the whole checkpoint."""

    def __init__(self, path: Path, spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        header, offset = {}, 0
        for name in sorted(spec):
            shape, dtype = spec[name]
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.spec, self.header, self.pending = spec, header, set(spec)
        self.data_start = 8 + len(encoded)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.file.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.spec:
            raise ValueError(f"Unexpected tensor {name!r}: the model config has no such weight.")
        if name not in self.pending:
            raise ValueError(f"Tensor {name!r} was given twice.")
        shape, dtype = self.spec[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"Tensor {name!r} has shape {tuple(tensor.shape)}, the model config expects {tuple(shape)}."
            )
        tensor = tensor.detach().to(dtype).contiguous()
        self.file.seek(self.data_start + self.header[name]["data_offsets"][0])
        if tensor.numel():
            self.file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self.pending.discard(name)

    def close(self) -> None:
        self.file.close()
        if self.pending:
            missing = sorted(self.pending)
            more = " ..." if len(missing) > 5 else ""
            raise ValueError(f"Missing tensor(s) {missing[:5]}{more} in the source checkpoint.")


def module_of(model) -> GPT:
    """The model inside Fabric's wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(fabric: "L.Fabric", state: dict, folder: Path, tokenizer_dir: Path | None, hparams: dict,
                    keep_last: int | None = None, transform=None) -> None:
    """A complete checkpoint folder (weights, config, tokenizer, training state), renamed into place when done;
    then only the `keep_last` latest step-* checkpoints are kept (final/ is never removed). `transform(weights,
    folder)` may write files of its own into the folder and returns the weights to save (LoRA: merged ones)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if fabric.global_rank == 0:
        remove_stale_temporaries(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    rng = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()
    try:
        # the per-step history is not in here: it grows with the run and lives in history.jsonl beside the logs
        training_state = whole_training_state(fabric, state)  # gathered once: the weights below are its own
        if fabric.global_rank == 0:
            torch.save({**training_state, **rng}, tmp / STATE_FILENAME)
            module = module_of(state["model"])
            weights = {k: v.contiguous() for k, v in training_state["model"].items()}
            if module.config.tie_embeddings:  # a tied lm_head is the embedding, stored once
                weights.pop("lm_head.weight", None)
            if transform is not None:
                weights = transform(weights, tmp)
            write_model_files(module, tmp, state=weights)
            if tokenizer_dir is not None:
                copy_tokenizer_files(tokenizer_dir, tmp)
            (tmp / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
    except OSError as error:  # name the checkpoint being written, not a temporary file
        if fabric.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(error.errno, f"{error.strerror} while writing the checkpoint", str(folder)) from None
    if fabric.global_rank == 0:
        move_into_place(tmp, folder)
        if keep_last is not None:
            prune_checkpoints(folder.parent, keep_last)
    fabric.barrier()
    # every rank says the same on Ctrl-C or SIGTERM (rank 1 said "no checkpoint was written yet" beside rank 0's line)
    set_interrupt_note(f"the last checkpoint is {folder}; continue the run with --resume auto.")


STEP_PATTERN = re.compile(r"step-\d{8}$")


def step_checkpoints(out_dir: Path) -> list[Path]:
    """The run's step-XXXXXXXX checkpoints, oldest first."""
    return sorted(p for p in Path(out_dir).glob("step-*") if STEP_PATTERN.match(p.name) and p.is_dir())


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Delete all but the `keep_last` latest step checkpoints this run wrote (folders named step-XXXXXXXX that hold a
    training state); nothing else in out_dir is touched."""
    steps = [p for p in step_checkpoints(out_dir) if (p / STATE_FILENAME).is_file()]
    for old in steps[: max(0, len(steps) - keep_last)]:
        shutil.rmtree(old)


LOCK_FILENAME = ".lock"


class RunLock:
    """An exclusive lock on a run folder (out_dir/.lock, held by one process for the whole run): a second run into
    the same folder is refused at once instead of overwriting the first one's checkpoints and logs."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise FileExistsError(f"--out_dir {self.out_dir} is a file, not a folder: choose another --out_dir.")
        self.created = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]  # deepest first
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / LOCK_FILENAME
        # the lock is the operating system's, on the folder itself: deleting .lock (which only names the holder)
        # cannot let a second run in
        self.folder = os.open(self.out_dir, os.O_RDONLY)
        try:
            fcntl.flock(self.folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.folder)
            holder = named_holder(self.out_dir)
            raise FileExistsError(f"{str(self.out_dir)!r} is in use by another run (process {holder}): wait for it"
                                  " to finish, or choose another --out_dir.") from None
        self.path.write_text(str(os.getpid()))

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        fcntl.flock(self.folder, fcntl.LOCK_UN)
        os.close(self.folder)
        for folder in self.created:  # a run refused before it wrote anything leaves no folder behind
            if any(folder.iterdir()):
                break
            folder.rmdir()


def named_holder(out_dir: Path) -> str:
    """The process a locked run folder's .lock names, or "unknown"."""
    try:
        return (Path(out_dir) / LOCK_FILENAME).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def run_holder(out_dir: Path) -> str | None:
    """The process that holds a run folder's lock (as its .lock names it, else "unknown"); None where none does."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    folder = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return named_holder(out_dir)
    else:
        fcntl.flock(folder, fcntl.LOCK_UN)
        return None
    finally:
        os.close(folder)


@contextmanager
def run_lock(fabric: "L.Fabric", out_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the block (rank 0 holds it; every rank learns when it is refused)."""
    lock, error = None, None
    if fabric.global_rank == 0:
        try:
            lock = RunLock(out_dir)
        except FileExistsError as refused:
            error = refused
    error = fabric.broadcast(error, src=0)
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def check_resume_point(resumed_step: int, max_steps: int) -> None:
    """A run continues only forward: refuse to finish at or before the step its checkpoint already reached (which
    would replace final/ with an older or the same state)."""
    if resumed_step >= max_steps:
        raise FileExistsError(
            f"The run being resumed already reached step {resumed_step} and --train.max_steps asks for {max_steps}:"
            " nothing to train. Raise --train.max_steps (or max_tokens) to continue it, or choose another --out_dir"
            " for a new run."
        )


def find_resume_checkpoint(out_dir: Path, resume: bool | Literal["auto"] | Path) -> Path | None:
    """The checkpoint to resume from: the latest in out_dir for "auto" (final/ counts, and is the latest), or the
    given folder."""
    if resume is False or resume is None:
        recover_replaced(Path(out_dir) / "final")
        if Path(out_dir).is_dir() and any(p.name != LOCK_FILENAME for p in Path(out_dir).iterdir()):
            raise FileExistsError(
                f"{str(out_dir)!r} holds an earlier run: pass --resume auto to continue it, or choose another"
                " --out_dir."
            )
        return None
    if resume == "auto" or resume is True:
        recover_replaced(Path(out_dir) / "final")
        candidates = [*step_checkpoints(out_dir), Path(out_dir) / "final"]
        candidates = [p for p in candidates if (p / STATE_FILENAME).is_file()]
        for later, candidate in zip([None, *candidates[::-1]], candidates[::-1]):
            problem = unreadable_checkpoint(candidate)
            if problem is None:
                if later is not None:
                    print(f"Resuming from {candidate}, the latest readable checkpoint.")
                return candidate
            print(f"Skipping {candidate}: {problem}.")
        if candidates:
            raise ValueError(f"No readable checkpoint in {str(out_dir)!r} to resume from (all {len(candidates)} are"
                             " damaged): start a new run in another --out_dir.")
        return None
    resume = Path(resume)
    if not (resume / STATE_FILENAME).is_file():
        raise FileNotFoundError(f"--resume {resume} is not a training checkpoint: it has no {STATE_FILENAME}.")
    problem = unreadable_checkpoint(resume)
    if problem is not None:
        raise ValueError(f"--resume {resume}: {problem}; resume from an earlier checkpoint.")
    return resume


def unreadable_checkpoint(folder: Path) -> str | None:
    """Why a training checkpoint cannot be resumed from (a truncated state or weights file), or None. Cheap: reads
    the zip directory at the end of the state file and the weights file's header."""
    try:
        with zipfile.ZipFile(folder / STATE_FILENAME) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{STATE_FILENAME} is truncated or damaged ({error})"
    try:
        read_safetensors_header(folder / WEIGHTS_FILENAME)
    except (ValueError, OSError) as error:
        return str(error).rstrip(".")
    return None


def check_same_architecture(checkpoint: Path, config: Config) -> None:
    """Resuming continues the same model: refuse a checkpoint whose model_config.yaml differs in any field (the
    optimizer state and the weights would not fit), naming the fields."""
    saved = Config.from_file(Path(checkpoint) / CONFIG_FILENAME).to_dict()
    differ = [k for k, v in config.to_dict().items() if saved.get(k) != v and k != "name"]
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {config.to_dict()[k]!r} now" for k in differ[:3])
        raise ValueError(f"{str(checkpoint)!r} was trained with another model ({shown}): resume with the same model"
                         " settings, or choose another --out_dir for a new run.")


def whole_training_state(fabric: "L.Fabric", state: dict) -> dict:
    """What training_state.pth holds, the same whatever the strategy and the number of processes: the whole weights
    and the whole AdamW state keyed by parameter name (torch's distributed state-dict API, which gathers FSDP2's
    shards; every rank takes part), and the counters. A run saved under DDP resumes under FSDP2 or on another number
    of processes, and the reverse."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    module, optimizer = module_of(state["model"]), optimizer_of(state["optimizer"])
    whole = {"model": get_model_state_dict(module, options=options),
             "optimizer": get_optimizer_state_dict(module, optimizer, options=options)}
    return {**whole, **{k: v for k, v in state.items() if k not in ("model", "optimizer", "history")}}


def optimizer_of(optimizer) -> torch.optim.Optimizer:
    """The optimizer inside Fabric's wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def named_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, module) -> dict:
    """An optimizer state keyed by parameter name. Checkpoints written before names were used key it by position:
    the order of the optimizer's groups and of the parameters in each, which this run's optimizer has too."""
    if not saved["state"] or isinstance(next(iter(saved["state"])), str):
        return saved
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: value for i, value in saved["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in saved["param_groups"]]}


def load_training_state(fabric: "L.Fabric", path: Path, state: dict) -> list[dict]:
    """Restore model, optimizer, counters and RNG (only tensors and plain containers are accepted from the file), on
    any strategy and number of processes. Returns the history a checkpoint of an older version stored inside itself
    (empty for current ones)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    module, optimizer = module_of(state["model"]), optimizer_of(state["optimizer"])
    check_same_architecture(path, module.config)
    try:
        saved = torch.load(path / STATE_FILENAME, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise unsafe_pickle_error(path / STATE_FILENAME, error) from None
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(module, saved.pop("model"), options=options)
    set_optimizer_state_dict(module, optimizer, named_optimizer_state(saved.pop("optimizer"), optimizer, module),
                             options=options)
    for key in [k for k in state if k not in ("model", "optimizer", "history")]:
        state[key] = saved.pop(key)
    torch.set_rng_state(saved["rng"])
    if torch.cuda.is_available() and "cuda_rng" in saved:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return saved.get("history", [])
