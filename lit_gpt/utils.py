"""Small helpers shared by the entry points."""

import sys
from collections.abc import Callable
from typing import Any

import torch

# errors that mean "the input is wrong": the entry points print them in one line instead of a traceback
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, ConnectionError)


def run_cli(function: Callable, args: list[str] | None = None) -> Any:
    """jsonargparse CLI over a typed function; bad input ends in one line on stderr and a non-zero exit."""
    from jsonargparse import auto_cli

    try:
        return auto_cli(function, args=args, as_positional=False)
    except USER_ERRORS as error:
        message = error.args[0] if error.args else repr(error)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


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
