"""``deepfeat fit | validate | test | predict``: LightningCLI on a recipe YAML (``--config recipe.yaml``).

These commands are parsed by LightningCLI itself (``--print_config``, ``--trainer.max_epochs=2``, ...), not by
argparse: the ``deepfeat`` parser only lists them, and :func:`run` hands the arguments over. ``--config`` takes a
path or a shipped recipe's name (``--config fashion``), as ``deepfeat recipe run`` does; a refused argument is one
line (the key and the reason), not LightningCLI's usage dump.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from deepfeat.recipes.config import resolve_config

__all__ = ["LIGHTNING_COMMANDS", "add_cli", "resolve_config_args", "run"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
_HELP = {
    "fit": "LightningCLI fit: train with a recipe (--config NAME|recipe.yaml; --help for all options)",
    "validate": "LightningCLI validate: retrieval metrics on the validation split (--config, --ckpt_path)",
    "test": "LightningCLI test: retrieval metrics on the test split (--config, --ckpt_path)",
    "predict": "LightningCLI predict: embed every record of the data into Parquet shards "
               "(--config, --ckpt_path; --trainer.callbacks+=... to change the writer)",
}


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--config`` / ``-c`` value that is a shipped recipe's name (``fashion``,
    ``fashion.yaml``, ``recipes/configs/fashion.yaml`` outside the checkout) replaced by the installed YAML's path.

    Raises:
        DataError: a ``--config`` value is neither a file nor a shipped recipe (the shipped names are listed).
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            out += [arg, str(resolve_config(args[i + 1]))]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + str(resolve_config(arg.partition("=")[2]))
        out.append(arg)
        i += 1
    return out


def run(argv: Sequence[str]) -> int:
    """Run ``argv`` (``["fit", "--config", ...]``) through LightningCLI; exit code 0 when it returns."""
    from deepfeat.finetune.training.callbacks import ExportBundle
    from deepfeat.finetune.training.config import run_lightning_cli  # imports Lightning: only when training
    from deepfeat.recipes.cli.recipe import print_test

    cli = run_lightning_cli(resolve_config_args(argv))
    # `fit` ends in ExportBundle: its guard line and the held-out test table (rank 0 holds the result)
    result = next((c.result for c in getattr(cli.trainer, "callbacks", []) if isinstance(c, ExportBundle)), None)
    if result is not None:
        print(result.message)
        print_test(result.test_table(), result.test_message)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """List ``fit``, ``validate``, ``test`` and ``predict`` in ``deepfeat --help`` (LightningCLI parses them)."""
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=_HELP[name], add_help=False)
