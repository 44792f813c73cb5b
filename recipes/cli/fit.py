"""``deepfeat fit | validate | test | predict``: LightningCLI on a recipe YAML (``--config recipe.yaml``).

These commands are parsed by LightningCLI itself (``--print_config``, ``--trainer.max_epochs=2``, ...), not by
argparse: the ``deepfeat`` parser only lists them, and :func:`run` hands the arguments over.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["LIGHTNING_COMMANDS", "add_cli", "run"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def run(argv: Sequence[str]) -> int:
    """Run ``argv`` (``["fit", "--config", ...]``) through LightningCLI; exit code 0 when it returns."""
    from deepfeat.finetune.training.config import run_lightning_cli  # imports Lightning: only when training

    run_lightning_cli(list(argv))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """List ``fit``, ``validate``, ``test`` and ``predict`` in ``deepfeat --help`` (LightningCLI parses them)."""
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (--config recipe.yaml; --help for all options)",
                       add_help=False)
