"""The one config system: a recipe YAML parsed by the LightningCLI parser into real objects.

``deepfeat fit|validate|test|predict`` run :class:`DeepfeatCLI` as LightningCLI does. Every other training path
(``deepfeat recipe run``, the quickstart, :func:`build_training` from Python) parses the same YAML with the same
parser in instantiation-only mode (``run=False``) and drives the objects itself through
:func:`~deepfeat.finetune.training.pipeline.guarded_fit`: there is no settings class mirroring the YAML, so a
knob is written once, and a misspelt key is refused by the parser with the nearest valid name.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from deepfeat.finetune.errors import DataError
from deepfeat.finetune.training.callbacks import FinetuneResult
from deepfeat.finetune.training.datamodule import RetrievalDataModule
from deepfeat.finetune.training.module import MetricLearningModule
from deepfeat.finetune.training.pipeline import exporter_of, guarded_fit

__all__ = ["DeepfeatCLI", "Training", "build_training", "overrides_to_args", "run_lightning_cli"]


class DeepfeatCLI(LightningCLI):
    """LightningCLI over :class:`MetricLearningModule` and :class:`RetrievalDataModule`.

    A recipe YAML (recipes/configs/*.yaml) is a LightningCLI config plus a ``recipe:`` section (collection,
    search, the recipe's action). :attr:`recipe_type` is its type: a free mapping here (``fit`` ignores it), a
    typed dataclass in ``deepfeat.recipes.config.RecipeCLI`` (``recipe run`` checks every key of it).
    """

    recipe_type: ClassVar[Any] = dict[str, Any] | None

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        parser.add_argument("--recipe", type=self.recipe_type, default=None,
                            help="deepfeat recipe section, read by 'deepfeat recipe run' (ignored by fit)")


@contextmanager
def _own_argv() -> Iterator[None]:
    saved = sys.argv
    sys.argv = [saved[0] if saved else "deepfeat"]  # LightningCLI reads args= only; keep sys.argv out of it
    try:
        yield
    finally:
        sys.argv = saved


def run_lightning_cli(args: list[str], cli_class: type[DeepfeatCLI] = DeepfeatCLI) -> DeepfeatCLI:
    """Run ``fit|validate|test|predict`` with LightningCLI arguments (``--config recipe.yaml``)."""
    with _own_argv():
        # no abbreviations: `--trainer.max_epoch` must be refused, not taken for max_epochs
        return cli_class(MetricLearningModule, RetrievalDataModule, args=args, parser_kwargs={"allow_abbrev": False},
                         save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


@dataclass
class Training:
    """The objects one config describes, ready to fit: built by :func:`build_training`."""

    module: MetricLearningModule
    datamodule: RetrievalDataModule
    trainer: pl.Trainer
    config: Namespace
    recipe: Any = None

    def fit(self) -> FinetuneResult:
        """Fine-tune, guard, measure on the test split and export (:func:`guarded_fit`)."""
        return guarded_fit(self.module, self.datamodule, self.trainer)

    @property
    def bundle_dir(self) -> Path:
        """Where the bundle is exported (the ExportBundle callback's ``dirpath``)."""
        return Path(exporter_of(self.trainer).dirpath)

    def set_out_dir(self, out: str | Path) -> None:
        """Write checkpoints to ``out/checkpoints`` and the bundle to ``out/bundle`` (a run folder of its own)."""
        out = Path(out)
        for cb in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, pl.callbacks.ModelCheckpoint):
                cb.dirpath = str(out / "checkpoints")
        exporter_of(self.trainer).dirpath = str(out / "bundle")


def overrides_to_args(overrides: Sequence[str]) -> list[str]:
    """``key.path=value`` overrides (``--set``) as parser arguments (``--key.path=value``).

    Raises:
        DataError: an override is not ``key=value``.
    """
    args = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or key.strip().startswith("-"):
            raise DataError(f"override {item!r} is not key=value; write e.g. --set model.image_size=32")
        args.append(f"--{key.strip()}={value}")
    return args


def parser_reason(text: str) -> str:
    """The useful line of a jsonargparse error: the unknown key (with the nearest valid one) or the bad value.

    jsonargparse nests one explanation per union member (``RecipeSection | None``); the first one names the
    real problem, the rest say the value is not ``None``.
    """
    flat = " ".join(text.split())
    unknown = re.search(r"unrecognized arguments: (--?[\w.]+)", flat)
    keys = re.findall(r'Parser key "([\w.]+)"', flat)
    if unknown:
        key = unknown.group(1).lstrip("-").split("=")[0]
        prefix = ".".join(k for k in keys if k)
        full = f"{prefix}.{key}" if prefix and not key.startswith(prefix) else key
        return f"unknown key {full!r}; check its spelling against the section's keys ('deepfeat recipe show NAME')"
    reason = re.split(r" - Expected a <class 'NoneType'>| Subtypes: ", flat)[0]
    if keys:
        given = re.search(r"Given value: (.*?)(?: - |$)", flat)
        first = re.search(r"Errors: - (.*?)(?: Given value| - |$)", flat)
        what = first.group(1) if first else reason
        return f"key {'.'.join(keys)!r}: {what}" + (f" (got {given.group(1)!r})" if given else "")
    return reason


def build_training(config: str | Path, overrides: Sequence[str] = (), *, args: Sequence[str] = (),
                   cli_class: type[DeepfeatCLI] = DeepfeatCLI) -> Training:
    """Parse a YAML config (and ``key=value`` overrides) into the module, data module and trainer it describes.

    The parser is LightningCLI's, in instantiation-only mode: classes are built from ``class_path``/``init_args``
    as ``deepfeat fit`` builds them, ``seed_everything`` is applied, and every unknown key is refused.

    Args:
        config: the YAML file.
        overrides: ``key.path=value`` changes, applied in order (a later one wins).
        args: further raw parser arguments (``--trainer.enable_progress_bar=false``).
        cli_class: the LightningCLI subclass (``deepfeat.recipes.config.RecipeCLI`` types the recipe section).

    Raises:
        DataError: the file is missing, or the parser refused the config (its one-line reason).
    """
    path = Path(config)
    if not path.is_file():
        raise DataError(f"config file {str(path)!r} not found; pass the path of a recipe YAML (see "
                        f"'deepfeat recipe list' for the shipped ones)")
    argv = ["--config", str(path), *overrides_to_args(overrides), *args]
    with _own_argv():
        try:
            cli = cli_class(MetricLearningModule, RetrievalDataModule, args=argv, run=False,
                            save_config_callback=None, auto_configure_optimizers=False,
                            parser_kwargs={"exit_on_error": False, "allow_abbrev": False})
        except SystemExit as exc:  # jsonargparse reports through parser.error, even with exit_on_error off
            raise DataError(f"{path}: the config was refused (see the message above); fix the key or value it "
                            f"names") from exc
        except Exception as exc:
            if type(exc).__name__ in ("ArgumentError", "NSKeyError") or "jsonargparse" in type(exc).__module__:
                raise DataError(f"{path}: the config was refused: {parser_reason(str(exc))}") from exc
            raise
    return Training(cli.model, cli.datamodule, cli.trainer, cli.config, cli.config.get("recipe"))  # type: ignore[arg-type]
