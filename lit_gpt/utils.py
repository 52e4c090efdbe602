"""Small helpers shared by the entry points."""

import dataclasses
import errno
import inspect
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


class UserFacingError(RuntimeError):
    """A failure whose message tells the user what happened and what to do (a diverged run, for instance)."""


# errors that mean "the input is wrong" or "the machine refused": the entry points print them in one line instead
# of a traceback (OSError covers a missing file, a read-only folder, a full disk)
USER_ERRORS = (ValueError, OSError, ConnectionError, UserFacingError)

# what an interrupted run says (set by the training loop when it saves a checkpoint)
_interrupt_note = {"text": "nothing was saved."}


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm, Kubernetes and systemd send before they kill), handled as Ctrl-C is: exit status 143."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated in the main thread, so every entry point stops as on Ctrl-C (one
    line, temporary files removed, a run's checkpoint saved) instead of dying at once."""
    import signal
    import threading

    def handler(signum, frame):
        raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def set_interrupt_note(text: str) -> None:
    """The one line that Ctrl-C prints after "Interrupted: ", e.g. where the last checkpoint is."""
    _interrupt_note["text"] = text


class LineProgress(tqdm):
    """tqdm for output that is not a terminal (a log file, a pipe): one whole line per refresh (at most every
    `mininterval` seconds, and at the end), never a carriage return."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        self.fp.write((msg or self.__str__()) + "\n")
        self.fp.flush()
        return True


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A progress bar with its ETA that stays visible everywhere: in a terminal it follows the width (taking 100
    columns where the terminal reports none, as under `script`); redirected to a file it prints a line every 30 s."""
    if not sys.stderr.isatty():
        return LineProgress(iterable, mininterval=kwargs.pop("mininterval", 30.0), ncols=100, ascii=True, **kwargs)
    width = shutil.get_terminal_size(fallback=(0, 0)).columns
    return tqdm(iterable, dynamic_ncols=width > 0, ncols=None if width > 0 else 100, **kwargs)


REPOSITORY = Path(__file__).resolve().parents[1]


def readable_type(text: str) -> str:
    """A type as a person reads it in --help: `path`, `int | null`, `bool | auto | path`, `csv | tensorboard`."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    text = re.sub(r"Literal\[([^\]]*)\]", lambda m: " | ".join(v.strip(" '\"") for v in m.group(1).split(",")), text)
    text = re.sub(r"Optional\[(.*)\]$", r"\1 | null", text)
    while (match := re.search(r"Union\[([^\[\]]*)\]", text)) is not None:
        text = text[: match.start()] + " | ".join(p.strip() for p in match.group(1).split(",")) + text[match.end():]
    return re.sub(r"\bPath\b", "path", text).replace("NoneType", "null")


def run_cli(function: Callable, args: list[str] | None = None) -> Any:
    """jsonargparse CLI over a typed function; bad input ends in one line on stderr and a non-zero exit."""
    from jsonargparse import DefaultHelpFormatter, auto_cli

    class ReadableHelpFormatter(DefaultHelpFormatter):
        def _get_type_str(self, action) -> str | None:
            text = super()._get_type_str(action)
            return None if text is None else readable_type(text)

        def _expand_help(self, action) -> str:  # defaults inside the repository as a user types them
            return super()._expand_help(action).replace(f"{REPOSITORY}{os.sep}", "")

    from argparse import ArgumentError

    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets an escape, not an error
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = expand_bare_flags(sys.argv[1:] if args is None else args, bool_flags(function))
    try:
        with terminate_as_interrupt():
            return auto_cli(function, args=args, as_positional=False, formatter_class=ReadableHelpFormatter,
                            exit_on_error=False)
    except ArgumentError as error:
        print(f"error: {argument_error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a shell tool killed by SIGPIPE does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's last flush does not complain either
        raise SystemExit(141) from None
    except USER_ERRORS as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None
    except RuntimeError as error:
        line = lost_process_line(error)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as error:
        terminated = isinstance(error, Terminated)
        print(f"\n{'Terminated (SIGTERM)' if terminated else 'Interrupted'}: {_interrupt_note['text']}",
              file=sys.stderr)
        raise SystemExit(143 if terminated else 130) from None


def lost_process_line(error: RuntimeError) -> str | None:
    """One line for a collective that failed because another process of the run went away (killed, out of memory,
    crashed): this process only sees a broken connection or a timeout, and its traceback says nothing useful. None
    for any other error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(error)
    reason = re.search(r"(Connection (?:reset|closed|refused)[a-z ]*|[Tt]imed out[^.\n]*|NCCL[^.\n]*)", text)
    if reason is None and not isinstance(error, dist.DistError):
        return None
    reason = reason.group(1) if reason else text.splitlines()[0][:200] if text else type(error).__name__
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} lost another process of the run ({reason}): that"
            f" process stopped first, and its own output above says why; {_interrupt_note['text']}")


def eval_output(checkpoint_dir: Path, name: str) -> Path:
    """Where an evaluation tool writes when no output is given: out/eval/<checkpoint>/<name>, in the working folder
    as LitGPT's out/ is. Never inside the checkpoint: a downloaded one may be read-only or shared, an export would
    carry the results, and a run's final/ is replaced when the run continues, taking them with it. <checkpoint> is
    the folder's name, after its run's name for a run's final/ or step-* folder (out/eval/demo-ssa-final/)."""
    folder = Path(os.path.abspath(checkpoint_dir))
    label = folder.name
    if label == "final" or re.fullmatch(r"step-\d+", label):
        label = f"{folder.parent.name}-{label}"
    return Path("out") / "eval" / label / name


def check_readable(path: Path, what: str) -> None:
    """`path` is a regular file this user can read. Libraries that open files themselves report a file they may not
    read as missing (safetensors: "No such file or directory"), so it is checked here first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Expected {what} at {str(path)!r}, found nothing there.")
    if not path.is_file():
        found = "a folder" if path.is_dir() else "something that is not a regular file"
        raise ValueError(f"Expected {what} at {str(path)!r}, found {found}; check the path.")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise PermissionError(f"{str(path)!r} ({what}) exists but cannot be read ({error.strerror}): make it readable"
                              " for this user (chmod a+r) or run as its owner.") from None


def error_line(error: BaseException) -> str:
    """One line for the user: our own messages as they are; an operating-system error as its reason and file, with
    what to do (not `2`, the errno, which is what `error.args[0]` holds)."""
    if isinstance(error, OSError) and error.errno is not None:
        where = f" {str(error.filename)!r}" if error.filename is not None else ""
        hint = {errno.ENOSPC: "free some disk space and run again",
                errno.EACCES: "fix its permissions, or choose a path this user may read and write",
                errno.EROFS: "choose a folder on a writable file system",
                errno.ENOENT: "check the path",
                errno.EEXIST: "a file stands where a folder is expected; check the path",
                errno.ENOTDIR: "a file stands where a folder is expected; check the path",
                errno.EISDIR: "a folder stands where a file is expected; check the path"}.get(error.errno,
                                                                                            "check the path")
        return f"{error.strerror}:{where}; {hint}."
    text = str(error.args[0]) if error.args else type(error).__name__
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def argument_error_line(error: Exception) -> str:
    """jsonargparse's multi-line account of a bad flag, in one line: the flag, the type it takes, the value given."""
    text = str(error)
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if match is None:
        return f"{text.strip().splitlines()[0]} (see --help)"
    key, detail = match.groups()
    given = re.search(r"Given value: (.*)", detail)
    subtypes = re.search(r"Subtypes: \[(.*?)\]\n", detail)
    expected = re.search(r"Expected a (.*)", detail)
    if subtypes:
        kind = " | ".join(readable_type(t.strip()) for t in subtypes.group(1).split(", "))
    elif expected:
        kind = readable_type(expected.group(1).strip())
    else:
        return f"--{key}: {detail.strip().splitlines()[0]} (see --help)"
    return f"--{key} takes {kind}" + (f", got {given.group(1).strip()!r}" if given else "") + " (see --help)."


def bool_flags(function: Callable) -> set[str]:
    """The options of `function` (and of its dataclass arguments) that are plain booleans."""
    flags = set()
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.annotation is bool:
            flags.add(f"--{name}")
        elif dataclasses.is_dataclass(parameter.annotation):
            flags |= {f"--{name}.{f.name}" for f in dataclasses.fields(parameter.annotation) if f.type is bool}
    return flags


def expand_bare_flags(argv: list[str], flags: set[str]) -> list[str]:
    """`--ssa` alone means `--ssa true` (jsonargparse itself wants the value)."""
    expanded = []
    for i, arg in enumerate(argv):
        expanded.append(arg)
        if arg in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            expanded.append("true")
    return expanded


def check_apart(output: Path, output_flag: str, source: Path, source_flag: str) -> None:
    """Refuse an output folder that is, contains or lies inside the input: writing there could destroy the input."""
    out, src = Path(output).resolve(), Path(source).resolve()
    relation = ("is" if out == src else "contains" if out in src.parents
                else "lies inside" if src in out.parents else None)
    if relation is not None:
        raise ValueError(f"{output_flag} {output} {relation} {source_flag} {source}: the output must be apart from the"
                         f" input; choose another {output_flag}.")


def num_parameters(module: torch.nn.Module, requires_grad: bool | None = None) -> int:
    params = {id(p): p for p in module.parameters() if requires_grad is None or p.requires_grad == requires_grad}
    return sum(p.numel() for p in params.values())


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A JSON object from `path`; malformed JSON, another type or a missing key is an error naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}); restore or recreate the file.") from None
    except RecursionError:  # a nesting bomb: [[[[...]]]] deeper than the parser's stack
        raise ValueError(f"{str(path)!r} is nested too deeply to be one of this project's JSON files; restore or"
                         " recreate the file.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} should hold a JSON object, found {type(value).__name__}.")
    missing = [key for key in required if key not in value]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the key(s) {missing}; restore or recreate the file.")
    return value


def machine_memory(device: str = "cpu") -> int:
    """Bytes of memory the work can use: the GPU's for cuda, else the machine's physical memory (or a cgroup's limit
    where lower)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def check_fits(what: str, needed: int, advice: str, device: str = "cpu") -> None:
    """Refuse, before anything is allocated, work whose memory estimate (a lower bound) exceeds what the machine has,
    with what to do (naming the fields that make it so)."""
    have = machine_memory(device)
    if needed > have:
        raise ValueError(f"{what} needs at least {needed / 2**30:,.1f} GiB but this machine has {have / 2**30:,.1f} GiB"
                         f" ({'GPU' if device.startswith('cuda') else 'RAM'}): {advice}.")


SEED_RANGE = (0, 2**32 - 1)  # what numpy and Lightning's seed_everything accept


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed the random generators accept, refused before any work with the flag named."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise ValueError(f"{flag} must be a whole number from {low} to {high:,}, got {seed!r}.")


def check_share(value: float, flag: str, what: str) -> None:
    """`value` (the flag `flag`) is a share strictly between 0 and 1 of `what`, a validation split's."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"{flag} must lie in (0, 1) (the share of {what}), got {value}.")


def at_least(low: float, **values: float | None) -> None:
    """Each named value (a flag, `--NAME`) must be at least `low` where given."""
    for name, value in values.items():
        if value is not None and value < low:
            raise ValueError(f"--{name} must be at least {low}, got {value}.")


def resolve_device(device: str | None) -> str:
    """--device: default cuda where available, else cpu; an unknown device or CUDA without a GPU is refused."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"Unknown --device {device!r}: use cpu, cuda or cuda:N.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for CUDA but this machine has no usable GPU: use --device cpu.")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unsupported --device {device!r}: use cpu, cuda or cuda:N.")
    return device


def check_writable(path: Path, flag: str, is_dir: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder is expected (or the other
    way round), or a read-only place. Creates nothing."""
    path = Path(path)
    if not is_dir and path.is_fifo():
        raise ValueError(f"{flag} {path} is a named pipe: writing would wait for a reader forever; expected a regular"
                         f" file, choose another {flag}.")
    if path.exists() and path.is_dir() != is_dir:
        what = "a folder" if is_dir else "a file"
        raise ValueError(f"{flag} {path} should be {what} but {'a file' if is_dir else 'a folder'} is there:"
                         f" choose another {flag}.")
    existing = path if path.exists() else next(p for p in path.parents if p.exists())
    if not existing.is_dir() and existing != path:
        raise ValueError(f"{flag} {path} lies under {existing}, which is a file, not a folder: choose another {flag}.")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable; choose a folder you can write to.")


def check_output_files(files: list[Path], flag: str, inputs: list[Path | None]) -> None:
    """Refuse, before any work, outputs that would replace an input: a file the tool reads (the text, the weights),
    or any file of an input folder but an earlier output of the tool's own, followed through symbolic links.
    `files` are the outputs by the names the tool gives them (perplexity.json, ...): those may be replaced."""
    for file in files:
        target = Path(file).resolve()
        for source in (Path(s).resolve() for s in inputs if s is not None):
            inside = source.is_dir() and source in target.parents and target.exists() and not is_own_output(file)
            if target == source or inside:
                raise ValueError(f"{flag} {file} would replace {'a file of ' if inside else ''}the input {source}:"
                                 f" outputs must be apart from their inputs; choose another {flag}.")


EVALUATION_OUTPUTS = ("perplexity.json", "lm_eval.json", "passkey.json", "passkey.csv", "passkey.png",
                      "attention.json", "attention_stats.png", "attention_maps.png", "temperatures.png",
                      "selective_mask.png")


def is_own_output(file: Path) -> bool:
    return Path(file).name in EVALUATION_OUTPUTS


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to, renamed to `path` when the block completes: a new file, never a
    write through a symbolic link standing at `path` (the link itself is replaced) and never a half-written file.
    Missing folders above `path` are made (as LitGPT's tools make their output folders)."""
    path = Path(path)
    if path.is_fifo():
        raise ValueError(f"{path} is a named pipe: writing would wait for a reader forever; write to a regular file.")
    if path.exists() and not path.is_symlink() and not path.is_file():  # a device (/dev/null): written, not replaced
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)  # check_writable vetted the folders before the work
    remove_stale_files(path)
    tmp = path.with_name(temporary_name(path.name, os.getpid()))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def temporary_name(name: str, pid: int) -> str:
    """`.NAME.tmp-PID`, or where that would pass the file system's 255 bytes (a legal name of 240 bytes or more), a
    name from a hash of NAME that fits."""
    tmp = f".{name}.tmp-{pid}"
    if len(tmp.encode()) <= 255:
        return tmp
    import hashlib

    return f".{hashlib.sha256(name.encode()).hexdigest()[:32]}.tmp-{pid}"


def remove_stale_files(path: Path) -> None:
    """Delete the temporary files an interrupted write of `path` left beside it (their process is gone)."""
    import glob

    prefix = temporary_name(path.name, 0)[:-1]  # ".NAME.tmp-"
    for candidate in path.parent.glob(glob.escape(prefix) + "*"):
        pid = candidate.name[len(prefix):]
        if pid.isdigit() and candidate.is_file() and not candidate.is_symlink() and not process_alive(int(pid)):
            candidate.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_file(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {', '.join(dtypes)} (or auto where the tool"
                         " infers).")
    return dtypes[name]


def check_hub_reachable(what: str) -> None:
    """Fail at once, in one line, where the Hugging Face Hub's host does not resolve (its clients would retry for
    half a minute). Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), which reads the local cache, is let through."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as error:
        raise ConnectionError(
            f"Cannot reach the Hugging Face Hub at {host} ({error}) to fetch {what}: this machine seems to be offline."
        ) from None
