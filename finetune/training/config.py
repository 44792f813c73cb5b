"""The one config system: a recipe YAML parsed by the LightningCLI parser into real objects.

``deepfeat fit|validate|test|predict`` run :class:`DeepfeatCLI` as LightningCLI does. Every other training path
(``deepfeat recipe run``, the quickstart, :func:`build_training` from Python) parses the same YAML with the same
parser in instantiation-only mode (``run=False``) and drives the objects itself through
:func:`~deepfeat.finetune.training.pipeline.guarded_fit`: there is no settings class mirroring the YAML, so a
knob is written once, and a misspelt key is refused by the parser with the nearest valid name.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeTuple
from torch.optim import Optimizer
from typing_extensions import override

from deepfeat.finetune.errors import DataError
from deepfeat.finetune.training.callbacks import FinetuneResult
from deepfeat.finetune.training.datamodule import RetrievalDataModule
from deepfeat.finetune.training.module import MetricLearningModule
from deepfeat.finetune.training.pipeline import exporter_of, guarded_fit
from deepfeat.finetune.training.predict import EmbeddingWriter

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
        # LightningCLI's --optimizer / --lr_scheduler, handed to the module (it keeps its parameter groups and,
        # without --lr_scheduler, the time-budget cosine) instead of replacing its configure_optimizers
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
        parser.link_arguments("optimizer", "model.optimizer", compute_fn=_plain_section)
        parser.link_arguments("lr_scheduler", "model.lr_scheduler", compute_fn=_plain_section)
        parser.add_argument("--recipe", type=self.recipe_type, default=None,
                            help="deepfeat recipe section, read by 'deepfeat recipe run' (ignored by fit)")

    @override
    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except Exception as exc:
            if _is_parser_error(exc):  # the keys the parser knows, for the nearest name (:func:`parser_reason`)
                exc.valid_keys = valid_keys(parser)  # type: ignore[attr-defined]
            raise

    @override
    def before_instantiate_classes(self) -> None:
        # a classification loss (ArcFace, CosFace, ProxyAnchor, ...) whose YAML leaves num_classes / embedding_size
        # out gets 0 for them: sized from the training split and the model at setup (fit_class_loss)
        subcommand = getattr(self, "subcommand", None)
        config = self.config.get(str(subcommand), self.config) if subcommand else self.config
        init = config.get("model.loss.init_args") if isinstance(config, Namespace) else None
        if isinstance(init, Namespace):
            for key in ("num_classes", "embedding_size"):
                if key in init and init[key] is None:
                    init[key] = 0

    def predict(self, **kwargs: Any) -> None:
        """``deepfeat predict``: embed every record of the data into Parquet shards.

        An :class:`~deepfeat.finetune.training.predict.EmbeddingWriter` (``<default_root_dir>/predictions``) is
        added unless the config's callbacks hold a ``BasePredictionWriter`` already; predictions are streamed to
        it, not kept in memory.
        """
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, BasePredictionWriter) for cb in callbacks):
            callbacks.append(EmbeddingWriter())
        kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)


def _plain_section(value: Any) -> dict[str, Any] | None:
    """An ``--optimizer`` / ``--lr_scheduler`` section as the plain dict the module takes (``None`` when unset)."""
    if value is None:
        return None
    return dict(value.as_dict()) if isinstance(value, Namespace) else dict(value)


@contextmanager
def _own_argv() -> Iterator[None]:
    saved = sys.argv
    sys.argv = [saved[0] if saved else "deepfeat"]  # LightningCLI reads args= only; keep sys.argv out of it
    try:
        yield
    finally:
        sys.argv = saved


def run_lightning_cli(args: list[str], cli_class: type[DeepfeatCLI] = DeepfeatCLI) -> DeepfeatCLI:
    """Run ``fit|validate|test|predict`` with LightningCLI arguments (``--config recipe.yaml``).

    Raises:
        DataError: the parser refused an argument or the config (one line: the key and the reason, not the usage).
    """
    with _own_argv():
        try:
            # no abbreviations: `--trainer.max_epoch` must be refused, not taken for max_epochs
            return cli_class(MetricLearningModule, RetrievalDataModule, args=args,
                             parser_kwargs={"allow_abbrev": False, "exit_on_error": False},
                             save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
        except Exception as exc:
            if _is_parser_error(exc):
                command = args[0] if args and not args[0].startswith("-") else "fit"
                raise DataError(f"deepfeat {command}: {_class_failure(exc) or parser_reason(exc)}") from exc
            raise


def _is_parser_error(exc: BaseException) -> bool:
    return (type(exc).__name__ in ("ArgumentError", "NSKeyError") or "jsonargparse" in type(exc).__module__
            or _class_failure(exc) is not None)


def _class_failure(exc: BaseException) -> str | None:
    """One line for a class of the config (a loss, a callback) that failed to build with its init_args: jsonargparse
    wraps the class's own error in a ``ValueError`` listing the union's members."""
    text = str(exc)
    if not (isinstance(exc, ValueError) and text.startswith("Does not validate against any of the Union")):
        return None
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    named = re.search(r"class_path='([\w.]+)'", text)
    what = named.group(1) if named else "a class of the config"
    return (f"cannot build {what} with its init_args: {type(cause).__name__}: {' '.join(str(cause).split())}; fix "
            f"the value it names")


@dataclass
class Training:
    """The objects one config describes, ready to fit: built by :func:`build_training`."""

    module: MetricLearningModule
    datamodule: RetrievalDataModule
    trainer: pl.Trainer
    config: Namespace
    recipe: Any = None

    def fit(self) -> FinetuneResult | None:
        """Fine-tune, guard, measure on the test split and export (:func:`guarded_fit`; ``None`` on a DDP rank > 0)."""
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


def valid_keys(parser: Any) -> list[str]:
    """Every key ``parser`` accepts (``model.image_size``, ``recipe.search.top_k``), its subcommands' included."""
    keys: list[str] = []
    for action in parser._actions:
        dest = str(getattr(action, "dest", ""))
        if isinstance(getattr(action, "choices", None), dict):  # subcommands: fit, validate, ...
            keys += [k for sub in action.choices.values() for k in valid_keys(sub)]
        elif dest and dest not in ("help", "config") and not dest.endswith(".help") and dest != "==SUPPRESS==":
            keys.append(dest)
    return sorted(set(keys))


def _unknown_key(flat: str) -> str | None:
    """The unknown key a jsonargparse message names (a ``--set`` override or a key of the YAML), or None."""
    keys = re.findall(r'Parser key "([\w.]+)"', flat)
    unknown = re.search(r"unrecognized arguments: (--?[\w.]+)", flat)
    if unknown:
        key = unknown.group(1).lstrip("-").split("=")[0]
        prefix = ".".join(k for k in keys if k)
        return f"{prefix}.{key}" if prefix and not key.startswith(prefix) else key
    group = re.search(r"Group '([\w.]+)' does not accept (?:nested key|option) '([\w.]+)'", flat)
    if group:
        return f"{group.group(1)}.{group.group(2)}"
    found = re.search(r"does not accept option '([\w.]+)'|Option '([\w.]+)' is not accepted", flat)
    return (found.group(1) or found.group(2)) if found else None


def parser_reason(error: str | BaseException) -> str:
    """The useful line of a jsonargparse error: the unknown key (with the nearest valid one) or the bad value.

    jsonargparse nests one explanation per union member (``RecipeSection | None``); the first one names the
    real problem, the rest say the value is not ``None``. An exception raised by :class:`DeepfeatCLI`'s parser
    carries the keys it accepts, so an unknown key comes with the nearest valid name.
    """
    flat = " ".join(str(error).split())
    keys = re.findall(r'Parser key "([\w.]+)"', flat)
    full = _unknown_key(flat)
    if full:
        near = difflib.get_close_matches(full, getattr(error, "valid_keys", ()), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}?" if near else ("check its spelling against the section's keys "
                                                          "('deepfeat recipe show NAME')")
        return f"unknown key {full!r}; {hint}"
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
            if _is_parser_error(exc):
                raise DataError(f"{path}: the config was refused: {_class_failure(exc) or parser_reason(exc)}") from exc
            raise
    return Training(cli.model, cli.datamodule, cli.trainer, cli.config, cli.config.get("recipe"))  # type: ignore[arg-type]
