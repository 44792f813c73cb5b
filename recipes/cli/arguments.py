"""Argument types of the ``deepfeat`` command and the parser class that reports a bad argument in one line.

Every number, device, output path and JSON argument is checked here, by argparse, before a command runs: a bad
value is one ``deepfeat CMD: error: argument --x: ...`` line and exit code 2, never a stack trace from deep inside
a library. Only the standard library is imported here: building the parser must stay
fast; :func:`resolve_device` imports torch (and the runtime resolver) when it is called.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "DEVICE_CHOICES",
    "DeepfeatParser",
    "device",
    "int_at_least",
    "json_object",
    "launched_rank",
    "out_dir",
    "out_file",
    "positive_float",
    "resolve_device",
    "workers",
]

#: What ``--device`` accepts (``cuda:N`` names one GPU); availability is checked when the command runs.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class DeepfeatParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (the usage is in ``--help``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see 'PROG --help')`` on stderr and exit with code 2."""
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")


def int_at_least(minimum: int, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum`` (``what`` says what it counts, for the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            unit = f" {what}" if what else ""
            raise argparse.ArgumentTypeError(f"must be {minimum} or more{unit}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number ``> 0`` (minutes, seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def workers(text: str) -> int | str:
    """``--num-workers``: a count, or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"the number of workers cannot be negative, got {value}")
    return value


def device(text: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether it exists is checked later)."""
    value = text.strip().lower()
    if not _DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    return value


def out_dir(text: str) -> str:
    """An output folder: absent (it is created) or an existing folder; an existing file is refused."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file, and a folder is written here; "
                                         f"name a new or existing folder")
    return text


def out_file(text: str) -> str:
    """An output file: absent or an existing file (replaced); a folder, or a parent that is a file, is refused."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, and a file is written here; name a file, "
                                         f"e.g. {str(path / 'out')!r}")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {text!r} is a file; name a file in a folder")
    return text


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (``'{"ef": 128}'``); a list, a number or bad JSON is refused."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg} at character {exc.pos}) in {text!r}; write an "
                                         f"object, e.g. '{{\"ef\": 128}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"ef\": 128}}', got a "
                                         f"{type(value).__name__}: {text!r}")
    return value


def resolve_device(name: str) -> str:
    """``--device`` by the one runtime rule (:func:`deepfeat.finetune.inference.runtime.resolve_device`): a named
    device > ``$DEEPFEAT_DEVICE`` > ``cuda`` when a GPU is visible, else ``cpu``; ``auto`` counts as not given.

    Raises:
        DataError: ``cuda``/``cuda:N``/``mps`` (from ``--device`` or the environment) where there is none.
    """
    # deferred: the runtime module imports torch, and building the parser must stay fast
    from deepfeat.finetune.inference.runtime import resolve_device as resolve

    return str(resolve(name, flag="--device"))


def launched_rank() -> int:
    """The process's local rank where a DDP launcher (Lightning's, torchrun) started it, else 0: the commands
    that train print their header on rank 0 only, before the trainer knows the rank."""
    try:
        return int(os.environ.get("LOCAL_RANK") or 0)
    except ValueError:
        return 0
