"""Small helpers shared by the entry points."""

import dataclasses
import inspect
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


class UserFacingError(RuntimeError):
    """A failure whose message tells the user what happened and what to do (a diverged run, for instance)."""


# errors that mean "the input is wrong": the entry points print them in one line instead of a traceback
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ConnectionError,
               UserFacingError)


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

    args = expand_bare_flags(sys.argv[1:] if args is None else args, bool_flags(function))
    try:
        return auto_cli(function, args=args, as_positional=False, formatter_class=ReadableHelpFormatter)
    except USER_ERRORS as error:
        message = error.args[0] if error.args else repr(error)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


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


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {', '.join(dtypes)}.")
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
