"""Options shared by the ``nsa`` subcommands and ``nsa.bench``: dtype names and ``--device``.

This module sits below the command line: ``nsa.cli`` and ``nsa.bench`` both import it, and it
imports nothing from either, so no module under the CLI ever needs to import ``nsa.cli``.
"""

from __future__ import annotations

import argparse

__all__ = ["DTYPE_NAMES", "canonical_dtype", "torch_dtype", "resolve_device", "add_dtype_option",
           "add_device_option"]

# Canonical short name -> the spellings accepted for it (the short name and torch's own name).
DTYPE_NAMES = {
    "bf16": ("bf16", "bfloat16"),
    "fp16": ("fp16", "float16"),
    "fp32": ("fp32", "float32"),
    "fp64": ("fp64", "float64"),
}
_ALIASES = {alias: name for name, aliases in DTYPE_NAMES.items() for alias in aliases}


def canonical_dtype(text: str, option: str = "--dtype", allowed=None) -> str:
    """The canonical short name (``bf16``, ``fp16``, ``fp32``, ``fp64``) of a dtype spelling.

    Accepts the short names and torch's names (``bfloat16``, ``float16``, ``float32``,
    ``float64``), in any case. ``allowed`` restricts the result to some canonical names.
    Raises ValueError naming ``option`` for anything else.
    """
    allowed = tuple(allowed) if allowed is not None else tuple(DTYPE_NAMES)
    name = _ALIASES.get(str(text).strip().lower())
    if name not in allowed:
        spelled = ", ".join(f"{n} ({DTYPE_NAMES[n][1]})" for n in allowed)
        raise ValueError(f"{option}: expected one of {spelled}, got {text!r}")
    return name


def torch_dtype(text: str):
    """The ``torch.dtype`` of any accepted spelling (see :func:`canonical_dtype`)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp64": torch.float64}[canonical_dtype(text)]


def resolve_device(text: str | None):
    """The ``torch.device`` a ``--device`` option names (None: cuda when available, else cpu).

    Raises ValueError, naming the option, for a name torch does not parse, a device type other
    than cpu / cuda, or a CUDA device that this machine does not have.
    """
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device: {text} requested but no CUDA device is available")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device: {text} requested but this machine has {count} CUDA device(s)")
    return device


def add_dtype_option(parser: argparse.ArgumentParser, default: str | None, what: str, allowed=None) -> None:
    """``--dtype`` with every accepted spelling; the parsed value is the canonical short name.

    A bad value makes argparse exit with status 2 and a message naming ``--dtype``.
    """
    allowed = tuple(allowed) if allowed is not None else tuple(DTYPE_NAMES)

    def parse(text: str) -> str:
        try:
            return canonical_dtype(text, allowed=allowed)
        except ValueError as e:
            # argparse prefixes "argument --dtype: "; keep only what follows the option name
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    spellings = ", ".join(f"{n}/{DTYPE_NAMES[n][1]}" for n in allowed)
    tail = f"default {default}" if default is not None else "default: the preset's"
    parser.add_argument("--dtype", type=parse, default=default, metavar="DTYPE",
                        help=f"{what}: {spellings} ({tail})")


def add_device_option(parser: argparse.ArgumentParser, default_text: str = "cuda when available, else cpu") -> None:
    """``--device``, resolved later by :func:`resolve_device` (so that ``--help`` needs no torch)."""
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help=f"cpu, cuda or cuda:N (default: {default_text})")
